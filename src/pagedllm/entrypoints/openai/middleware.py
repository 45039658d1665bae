"""ASGI middlewares of the server: API key, request-body limit, and the lifecycle gate.

All are plain ASGI callables (not BaseHTTPMiddleware), so streaming responses and disconnect
detection pass through untouched. The app stacks them, outermost first: CORS (only with
--allowed-origins), API key, body limit, lifecycle gate.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedllm.entrypoints.openai.serving_engine import OpenAIError

if TYPE_CHECKING:
    from pagedllm.entrypoints.openai.lifecycle import ServerLifecycle

# Probes and introspection: answered in every phase, without the API key.
OPEN_PATHS = frozenset({"/health", "/ready", "/v2/health/ready", "/version", "/metrics", "/openapi.json",
                        "/docs", "/docs/oauth2-redirect", "/redoc"})
# A body over the limit is still read (and dropped) up to this many times the limit before the
# 413 goes out: closing a socket with unread data makes the kernel send a reset, which the
# client may see instead of the response (nginx's "lingering close" does the same).
_DRAIN_FACTOR = 16


class ApiKeyMiddleware:
    """401 for /v1/* requests without `Authorization: Bearer <api key>`; other paths stay open.

    Both sides are hashed before the constant-time comparison, so neither the key's content nor
    its length shows in the response time.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = hashlib.sha256(f"Bearer {api_key}".encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(hashlib.sha256(auth).digest(), self.expected):
                if auth:
                    message = "Incorrect API key provided."
                else:
                    message = "Missing API key: send 'Authorization: Bearer <key>'."
                error = OpenAIError(message, 401, code="invalid_api_key")
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestBodyLimitMiddleware:
    """413 for request bodies over `max_bytes`; 400 for a body that is not UTF-8.

    The declared Content-Length is checked before anything is read; a body without one
    (chunked) is counted as it arrives. The body is read here in full (the JSON parser would
    read it all anyway) and handed to the app unchanged; later receive() calls (disconnect
    detection) go to the server.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await OpenAIError("The Content-Length header is not a number.", 400).to_response()(
                    scope, receive, send)
                return
            if int(declared) > self.max_bytes * _DRAIN_FACTOR:
                await self._too_large(int(declared), scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            body = message.get("body", b"")
            size += len(body)
            more_body = message.get("more_body", False)
            if size <= self.max_bytes:
                chunks.append(body)
            elif size > self.max_bytes * _DRAIN_FACTOR:
                break  # stop reading: this client is not worth a clean close
        if size > self.max_bytes:
            await self._too_large(size, scope, receive, send)
            return
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            error = OpenAIError(f"The request body is not valid UTF-8: {e.reason} at byte {e.start}.", 400)
            await error.to_response()(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _too_large(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        error = OpenAIError(f"The request body has {size} bytes, more than the {self.max_bytes} this server accepts "
                            "(--max-request-body-bytes).", 413, code="request_too_large",
                            headers={"Connection": "close"})
        await error.to_response()(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that returns the already-read body once, then defers to the server's."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class LifecycleMiddleware:
    """Refuses requests while the server loads, drains or has lost its engine (503), and counts
    the requests in flight so that a drain knows when they are done. Probes always pass."""

    def __init__(self, app: ASGIApp, lifecycle: ServerLifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        refusal = self.lifecycle.refusal()
        if refusal is not None:
            await refusal.to_response()(scope, receive, send)
            return
        self.lifecycle.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.request_finished()
