"""What the server's routes, guard and runs share: the models and the worker once loaded (or the loading
error), the API key, the limits, and the one channel from the worker thread to the event loop."""

from __future__ import annotations

import asyncio
import hmac
import threading
from dataclasses import dataclass, field
from typing import Any

from .models import ServedModel
from .options import LIMITS, Limits
from .protocol import ApiError
from .scheduler import Scheduler


class Outbox:
    """Events from the worker thread to the event loop, with one wake-up for everything posted while
    the loop has not yet run (a step of 16 rows wakes it once, not 16 times)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.items, self.scheduled = loop, threading.Lock(), [], False

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


@dataclass
class ServerState:
    """What the routes read: the models and the worker once loaded, or the loading error."""

    api_key: str | None = None
    limits: Limits = LIMITS
    served: dict[str, ServedModel] | None = None
    scheduler: Scheduler | None = None
    error: str | None = None
    on_failure: Any = None  # called (no arguments) when loading fails: stops the server
    ready: threading.Event = field(default_factory=threading.Event)
    outbox: Outbox | None = None

    def outbox_for(self, loop: asyncio.AbstractEventLoop) -> Outbox:
        if self.outbox is None or self.outbox.loop is not loop:
            self.outbox = Outbox(loop)
        return self.outbox

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether the request may pass: no key set, or `Authorization: Bearer KEY` (constant time)."""
        if self.api_key is None:
            return True
        auth = dict(headers).get(b"authorization", b"")
        return hmac.compare_digest(auth, b"Bearer " + self.api_key.encode())

    def model(self, name: str) -> ServedModel:
        """The served model of that id, or a 404 naming the ones this server has."""
        if name not in self.served:
            raise ApiError(404, f"model {name!r} does not exist; this server has {', '.join(self.served)}",
                           param="model", code="model_not_found")
        return self.served[name]

    def unavailable(self) -> ApiError:
        """The 503 of a server whose models are not ready: still loading, or failed to load."""
        if self.error is not None:
            return ApiError(503, f"the models failed to load: {self.error}", "server_error", code="load_failed")
        return ApiError(503, "the models are still loading", "server_error", code="loading")
