"""`poelm serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the batching worker
(docs/serving.md says what it guarantees and why).

- The app answers at once; the models load in a background thread (`/health` and every endpoint answer
  503 until they are ready). If loading fails, the error is one line and the server stops with it.
- The pieces: guard.py (key, loading state, body size, the last word on exceptions, the log line),
  routes.py (the API), run.py (one request's rows and the one fold of their events), scheduler.py (the
  worker), models.py (the base held once), protocol.py (the API's shapes), options.py (what it allows).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from fastapi import FastAPI

from ..core.errors import PoelmError
from .guard import Guard
from .models import load_served
from .options import DEFAULTS, LIMITS, Limits, ServeOptions
from .routes import ERROR_HANDLERS, router
from .scheduler import Scheduler
from .state import ServerState

KEY_ENV = "POELM_API_KEY"


def create_app(directories: list[str], names: list[str] | None = None, *, max_batch: int = DEFAULTS.max_batch,
               max_queue: int = DEFAULTS.max_queue, api_key: str | None = None, device: str = DEFAULTS.device,
               dtype: str | None = DEFAULTS.dtype, limits: Limits = LIMITS) -> FastAPI:
    """The app: its routes answer at once, the models load in a thread when it starts."""
    state = ServerState(api_key=api_key, limits=limits)

    def load() -> None:
        try:
            served = load_served(directories, names, device=device, dtype=dtype)
            scheduler = Scheduler(served, max_batch=max_batch, max_queue=max_queue)
            scheduler.start()
            state.served, state.scheduler = served, scheduler
            state.ready.set()
            print(f"poelm serve: ready: {', '.join(served)}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - reported as one line, then the server stops
            state.error = str(e) if isinstance(e, PoelmError) else f"{type(e).__name__}: {e}"
            print(f"poelm serve: error: {state.error}", file=sys.stderr, flush=True)
            if state.on_failure is not None:
                state.on_failure()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, name="poelm-load", daemon=True).start()
        yield
        if state.scheduler is not None:
            state.scheduler.stop()

    app = FastAPI(title="poelm", version="1", lifespan=lifespan,
                  description="An OpenAI-compatible API over a poelm base and its specialist stages.")
    app.state.poelm = state
    app.add_middleware(Guard, state=state)
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    app.include_router(router)
    return app


def resolve_api_key(key: str | None = None, key_file: str | os.PathLike | None = None) -> str | None:
    """The key from `--api-key`, `--api-key-file` (its first line) or `$POELM_API_KEY`, at most one of them
    given; None: no key."""
    given = [name for name, value in (("--api-key", key), ("--api-key-file", key_file)) if value is not None]
    if len(given) > 1:
        raise PoelmError("give the key once: --api-key or --api-key-file")
    if key_file is not None:
        path = Path(key_file)
        try:
            key = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
        except (OSError, UnicodeDecodeError) as e:
            raise PoelmError(f"--api-key-file {path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
        if not key:
            raise PoelmError(f"--api-key-file {path}: empty; expected the key on its first line")
    elif key is None:
        key = os.environ.get(KEY_ENV) or None
    if key is not None and (not key or any(c.isspace() for c in key)):
        raise PoelmError("the API key must be non-empty and hold no whitespace")
    return key


@contextlib.contextmanager
def background(directories: list[str], names: list[str] | None = None, *, host: str = DEFAULTS.host,
               ready_timeout: float = 300, **kw) -> Iterator[tuple[str, FastAPI]]:
    """A server in a thread of this process, on a free port of `host`, for tests, the demo and the
    benchmarks: yields (base URL, app) once the models are loaded, and stops it (worker included) on
    exit. Raises PoelmError if the models fail to load."""
    import socket

    import uvicorn

    app = create_app([str(d) for d in directories], names, **kw)
    state: ServerState = app.state.poelm
    sock = socket.socket()
    sock.bind((host, 0))  # the port is ours before the server starts: no race for it
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    state.on_failure = lambda: setattr(server, "should_exit", True)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="poelm-server", daemon=True)
    thread.start()
    try:
        deadline = time.time() + ready_timeout
        while not (state.ready.is_set() and server.started) and state.error is None and thread.is_alive():
            if time.time() > deadline:
                raise PoelmError(f"poelm serve: not ready after {ready_timeout:.0f}s")
            time.sleep(0.02)
        if state.error is not None:
            raise PoelmError(state.error)
        yield f"http://{host}:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def serve(directories: list[str], names: list[str] | None = None, options: ServeOptions = DEFAULTS) -> None:
    """Run the server until interrupted (the key from the options or $POELM_API_KEY); raise PoelmError on bad
    options or if the models fail to load."""
    if options.max_body_bytes < 1024:
        raise PoelmError(f"--max-body-bytes {options.max_body_bytes}: expected at least 1024")
    api_key = resolve_api_key(options.api_key, options.api_key_file)
    import uvicorn

    app = create_app(directories, names, max_batch=options.max_batch, max_queue=options.max_queue, api_key=api_key,
                     device=options.device, dtype=options.dtype,
                     limits=replace(LIMITS, body_bytes=options.max_body_bytes))
    host, port = options.host, options.port
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    state: ServerState = app.state.poelm
    state.on_failure = lambda: setattr(server, "should_exit", True)
    print(f"poelm serve: http://{host}:{port}/v1 (loading {', '.join(map(str, directories))}"
          f"{'; API key required' if api_key else ''})", file=sys.stderr, flush=True)
    server.run()
    if state.error is not None:
        raise PoelmError(state.error)
