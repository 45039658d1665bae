"""The OpenAI-compatible HTTP server: FastAPI app factory and `run_server` for `pagedllm serve`.

Middlewares (API key, body limit, lifecycle gate) are in middleware.py; loading, readiness,
the SIGTERM drain and the exit on engine death in lifecycle.py.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import pagedllm
from pagedllm.config import EngineArgs, create_engine_config
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.core_client import EngineDeadError
from pagedllm.entrypoints.openai.lifecycle import GracefulServer, ServerLifecycle, ServerPhase
from pagedllm.entrypoints.openai.metrics import PrometheusStatLogger
from pagedllm.entrypoints.openai.middleware import ApiKeyMiddleware, LifecycleMiddleware, RequestBodyLimitMiddleware
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
from pagedllm.entrypoints.openai.serving_engine import (
    OpenAIError,
    RequestLimits,
    as_openai_error,
    run_unless_disconnected,
)
from pagedllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger("pagedllm.entrypoints.openai.api_server")

# Large enough for a 128k-token prompt as token ids; a 10 MB body is refused with 413.
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class ServerSettings:
    """The server-level options of `pagedllm serve` (the engine's own come from EngineArgs)."""

    served_model_names: list[str]
    max_logprobs: int = 20
    api_key: str | None = None
    chat_template: str | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    shutdown_timeout: float = 30.0
    allowed_origins: list[str] = field(default_factory=list)
    trust_request_chat_template: bool = False


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """A 400 naming the first invalid field of a request body."""
    errors = exc.errors()
    if not errors:
        return OpenAIError("Invalid request body.", 400)
    first = errors[0]
    # Drop "body" and the union-member tags pydantic adds to locations ("str", "list[int]", ...).
    path = [str(p) for p in first.get("loc", ()) if p != "body"
            and not re.fullmatch(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*)", str(p))]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return OpenAIError(f"The request body is not valid JSON: {message}.", 400)
    if not path and ":" in message:  # a whole-body check names the field itself: "prompt.0: ..."
        field_path = message.split(":", 1)[0]
        if re.fullmatch(r"[\w.]+", field_path):
            return OpenAIError(f"Invalid value for '{field_path}'{message[len(field_path):]}.", 400,
                               param=field_path.split(".")[0])
    param = ".".join(path) or None
    return OpenAIError(f"Invalid value for '{param}': {message}." if param else f"{message}.", 400,
                       param=path[0] if path else None)


def build_app(lifecycle: ServerLifecycle, settings: ServerSettings, create_engine: Callable[[], AsyncLLM],
              stat_logger: PrometheusStatLogger | None = None) -> FastAPI:
    """The FastAPI app serving the OpenAI API.

    `create_engine` runs on a worker thread when the app starts, while probes are answered
    (see lifecycle.py); requests are served once it returns.
    """
    names = settings.served_model_names
    handlers: dict[str, Any] = {}

    def on_ready(engine: AsyncLLM) -> None:
        limits = settings.limits
        handlers["completion"] = OpenAIServingCompletion(engine, names, settings.max_logprobs, limits)
        handlers["chat"] = OpenAIServingChat(engine, names, settings.max_logprobs, settings.chat_template, limits,
                                             settings.trust_request_chat_template)
        handlers["tokenization"] = OpenAIServingTokenization(engine, names, settings.chat_template)
        if stat_logger is not None:
            stat_logger.kv_cache_tokens.set(engine.kv_cache_info.num_kv_tokens)
        info = engine.kv_cache_info
        logger.info("Serving %s (max_model_len %d). KV cache: %d tokens, maximum concurrency %.2fx requests "
                    "of %d tokens.", ", ".join(names), info.max_model_len, info.num_kv_tokens, info.max_concurrency,
                    info.max_model_len)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        lifecycle.load_in_background(create_engine, on_ready)
        yield
        # Here, not after uvicorn returns: the engine's output handler lives on this loop.
        if lifecycle.engine is not None:
            lifecycle.engine.shutdown()

    app = FastAPI(title="pagedllm OpenAI-compatible server", version=pagedllm.__version__, lifespan=lifespan)
    # Added innermost first: the gate, the body limit, the API key, then CORS outermost (so that
    # even a 401 carries CORS headers for an allowed origin).
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle)
    app.add_middleware(RequestBodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).to_response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if message == "There was an error parsing the body":  # FastAPI's words for any JSON parser failure
            message = "The request body could not be parsed as JSON (invalid syntax, encoding, or nested too deep)."
        return OpenAIError(message, exc.status_code).to_response()

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return as_openai_error(exc).to_response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return as_openai_error(exc).to_response()  # logged there; the body has no traceback

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 200 while the process and its engine core live (also while loading)."""
        if not lifecycle.is_alive:
            return OpenAIError("The engine core is not running.", 503, code="engine_dead").to_response()
        return Response(status_code=200)

    @app.get("/ready")
    @app.get("/v2/health/ready")
    async def ready() -> Response:
        """Readiness: 200 only while requests are served (503 while loading, draining or dead)."""
        phase = lifecycle.phase if lifecycle.is_alive else ServerPhase.DEAD
        return JSONResponse({"status": phase.value}, status_code=200 if phase == ServerPhase.READY else 503)

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
        engine = lifecycle.engine
        assert engine is not None  # the gate lets requests through only once it is ready
        root = engine.config.model_config.model
        return ModelList(data=[ModelCard(id=name, root=root, max_model_len=engine.max_model_len) for name in names])

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        completion: OpenAIServingCompletion = handlers["completion"]
        response = await run_unless_disconnected(raw_request, lambda: completion.create_completion(request))
        return response if response is not None else Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        chat: OpenAIServingChat = handlers["chat"]
        response = await run_unless_disconnected(raw_request, lambda: chat.create_chat_completion(request))
        return response if response is not None else Response(status_code=499)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> Response:
        return JSONResponse(handlers["tokenization"].tokenize(request).model_dump())

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> Response:
        return JSONResponse(handlers["tokenization"].detokenize(request).model_dump())

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
    """`pagedllm serve`: listen at once, load the engine in the background, serve until SIGTERM.

    Returns the exit status: 0 after a drain, 1 when the engine died or failed to load.
    """
    engine_args = EngineArgs.from_cli_args(args)
    config = create_engine_config(engine_args)
    names = args.served_model_name or [default_served_model_name(engine_args.model, config.model_config.model)]
    settings = ServerSettings(
        served_model_names=names,
        max_logprobs=args.max_logprobs,
        api_key=args.api_key or os.environ.get("PAGEDLLM_API_KEY") or None,
        chat_template=load_chat_template(args.chat_template),
        limits=RequestLimits(max_waiting_requests=args.max_waiting_requests, request_timeout=args.request_timeout,
                             log_requests=args.log_requests),
        max_request_body_bytes=args.max_request_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        allowed_origins=list(args.allowed_origins or []),
        trust_request_chat_template=args.trust_request_chat_template,
    )
    check_server_settings(settings)
    stat_logger = PrometheusStatLogger(names[0])
    log_level = logging.getLogger().getEffectiveLevel()
    lifecycle = ServerLifecycle(settings.shutdown_timeout)

    def create_engine() -> AsyncLLM:
        return AsyncLLM(config, log_level=log_level, stat_loggers=[stat_logger])

    app = build_app(lifecycle, settings, create_engine, stat_logger)
    # uvicorn's own graceful-shutdown wait only covers connections left after the drain.
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=log_level,
                                    access_log=not args.disable_access_log, timeout_keep_alive=5,
                                    timeout_graceful_shutdown=5)
    try:
        GracefulServer(uvicorn_config, lifecycle).run()
    finally:
        if lifecycle.engine is not None:
            lifecycle.engine.shutdown()
    return lifecycle.exit_code


def check_server_settings(settings: ServerSettings) -> None:
    """ValueError naming the flag for any invalid server option."""
    if settings.max_logprobs < 0:
        raise ValueError(f"--max-logprobs must be >= 0, got {settings.max_logprobs}.")
    if settings.limits.max_waiting_requests < 0:
        raise ValueError(f"--max-waiting-requests must be >= 0, got {settings.limits.max_waiting_requests}.")
    timeout = settings.limits.request_timeout
    if timeout is not None and not timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {timeout}.")
    if settings.max_request_body_bytes < 1:
        raise ValueError(f"--max-request-body-bytes must be >= 1, got {settings.max_request_body_bytes}.")
    if not settings.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {settings.shutdown_timeout}.")
