"""The OpenAI-compatible HTTP server: FastAPI app factory, API-key check, and `run_server` for `pagedllm serve`."""

from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import pagedllm
from pagedllm.config import EngineArgs, create_engine_config
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.core_client import EngineDeadError
from pagedllm.entrypoints.openai.metrics import PrometheusStatLogger
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_engine import OpenAIError, as_openai_error, run_unless_disconnected
from pagedllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger("pagedllm.entrypoints.openai.api_server")


@dataclass
class ServerSettings:
    """The server-level options of `pagedllm serve` (the engine's own come from EngineArgs)."""

    served_model_names: list[str]
    max_logprobs: int = 20
    api_key: str | None = None
    chat_template: str | None = None


class ApiKeyMiddleware:
    """401 for /v1/* requests without `Authorization: Bearer <api key>`; other paths stay open.

    A plain ASGI middleware (not BaseHTTPMiddleware), so streaming and disconnect detection
    pass through untouched.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(auth, self.expected):
                if auth:
                    message = "Incorrect API key provided."
                else:
                    message = "Missing API key: send 'Authorization: Bearer <key>'."
                error = OpenAIError(message, 401, code="invalid_api_key")
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """A 400 naming the first invalid field of a request body."""
    errors = exc.errors()
    if not errors:
        return OpenAIError("Invalid request body.", 400)
    first = errors[0]
    # Drop "body" and the union-member tags pydantic adds to locations ("str", "list[int]", ...).
    path = [str(p) for p in first.get("loc", ()) if p != "body"
            and not re.fullmatch(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*)", str(p))]
    param = ".".join(path) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return OpenAIError(f"The request body is not valid JSON: {message}.", 400)
    return OpenAIError(f"Invalid value for '{param}': {message}." if param else f"{message}.", 400,
                       param=path[0] if path else None)


def build_app(engine: AsyncLLM, settings: ServerSettings, stat_logger: PrometheusStatLogger | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the OpenAI API."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()  # the output handler must live on the server's event loop
        yield
        # Here, not after uvicorn returns: uvicorn re-raises SIGTERM once it has shut down.
        engine.shutdown()

    app = FastAPI(title="pagedllm OpenAI-compatible server", version=pagedllm.__version__, lifespan=lifespan)
    names = settings.served_model_names
    completion = OpenAIServingCompletion(engine, names, settings.max_logprobs)
    chat = OpenAIServingChat(engine, names, settings.max_logprobs, settings.chat_template)
    tokenization = OpenAIServingTokenization(engine, names, settings.chat_template)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).to_response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(str(exc.detail), exc.status_code).to_response()

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return as_openai_error(exc).to_response()

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return OpenAIError("The engine core is not running.", 503, code="engine_dead").to_response()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pagedllm.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        if stat_logger is None:
            return Response("", media_type="text/plain")
        body, content_type = stat_logger.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> ModelList:
        root = engine.config.model_config.model
        return ModelList(data=[ModelCard(id=name, root=root, max_model_len=engine.max_model_len) for name in names])

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        response = await run_unless_disconnected(raw_request, lambda: completion.create_completion(request))
        return response if response is not None else Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        response = await run_unless_disconnected(raw_request, lambda: chat.create_chat_completion(request))
        return response if response is not None else Response(status_code=499)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> Response:
        return JSONResponse(tokenization.tokenize(request).model_dump())

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> Response:
        return JSONResponse(tokenization.detokenize(request).model_dump())

    return app


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file holding a Jinja template, or the template itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template.")
    return value


def default_served_model_name(model_arg: str | None, model_path: str) -> str:
    """The model argument as given; for the embedded default, the model's name (file name up to the first dot)."""
    if model_arg:
        return model_arg
    return os.path.basename(model_path).split(".")[0]


def run_server(args: argparse.Namespace) -> int:
    """`pagedllm serve`: start the engine core, then serve HTTP until interrupted."""
    engine_args = EngineArgs.from_cli_args(args)
    config = create_engine_config(engine_args)
    names = args.served_model_name or [default_served_model_name(engine_args.model, config.model_config.model)]
    settings = ServerSettings(
        served_model_names=names,
        max_logprobs=args.max_logprobs,
        api_key=args.api_key or os.environ.get("PAGEDLLM_API_KEY") or None,
        chat_template=load_chat_template(args.chat_template),
    )
    if settings.max_logprobs < 0:
        raise ValueError(f"--max-logprobs must be >= 0, got {settings.max_logprobs}.")
    stat_logger = PrometheusStatLogger(names[0])
    log_level = logging.getLogger().getEffectiveLevel()
    engine = AsyncLLM(config, log_level=log_level, stat_loggers=[stat_logger])
    try:
        info = engine.kv_cache_info
        stat_logger.kv_cache_tokens.set(info.num_kv_tokens)
        logger.info("Serving %s (max_model_len %d). KV cache: %d tokens, maximum concurrency %.2fx requests "
                    "of %d tokens.", ", ".join(names), info.max_model_len, info.num_kv_tokens, info.max_concurrency,
                    info.max_model_len)
        app = build_app(engine, settings, stat_logger)
        uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=log_level,
                                        access_log=not args.disable_access_log, timeout_keep_alive=5)
        uvicorn.Server(uvicorn_config).run()
    except KeyboardInterrupt:
        pass  # uvicorn has shut down gracefully and re-raised Ctrl-C
    finally:
        engine.shutdown()
    return 0
