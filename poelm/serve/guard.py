"""The ASGI guard in front of every route: the API key, the loading state, the body's size, the last
word on any exception, and one log line per request (docs/serving.md).

Plain ASGI: Starlette's BaseHTTPMiddleware would add a task switch to every streamed chunk.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from fastapi.responses import JSONResponse

from .protocol import ApiError
from .state import ServerState


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Guard:
    """ASGI middleware: refusals before the app sees the request; a 500 in OpenAI's shape (and one log
    line) for any exception the routes did not turn into a response, if nothing was sent yet; one line
    per request (method, path, status, seconds; a stream's line comes when it ends)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal, receive = await self.admit(scope, receive)
            if refusal is not None:
                await error_response(refusal)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - the last word: one line, a 500 if nothing was sent yet
            print(f"poelm serve: error: {scope['method']} {scope['path']}: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            if not status[0]:
                await error_response(ApiError(500, f"{type(e).__name__}: {e}", "server_error"))(scope, receive,
                                                                                               sending)
        print(f"{scope['method']} {scope['path']} {status[0]} {time.perf_counter() - t0:.3f}s", file=sys.stderr,
              flush=True)

    async def admit(self, scope, receive) -> tuple[ApiError | None, Any]:
        """(a refusal or None, the receive channel the app reads): the key, the loading state, and the
        body read here up to the limit, then replayed to the app."""
        path = scope["path"]
        if path != "/health" and not self.state.authorized(scope["headers"]):
            return ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
                            code="invalid_api_key"), receive
        if path.startswith("/v1/") and not self.state.ready.is_set():
            return self.state.unavailable(), receive
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None, receive
        limit = self.state.limits.body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = ApiError(413, f"body: larger than {limit} bytes, the most this server accepts", param="body",
                           code="body_too_large")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return too_big, receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, replay([], receive, disconnected=True)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return too_big, receive
        return None, replay(chunks, receive)


def replay(chunks: list[bytes], receive, disconnected: bool = False):
    """A receive channel that gives the body read so far, then what the client sends next (its disconnect)."""
    pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}] if not disconnected else \
        [{"type": "http.disconnect"}]

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed
