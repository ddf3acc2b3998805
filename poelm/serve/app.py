"""`poelm serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the batching worker.

Design choices:
- The app answers at once; the models load in a background thread (`/health` and every endpoint
  answer 503 until they are ready). If loading fails, the error is printed as one line and the
  server stops with it (`serve` raises it).
- Every request is validated (protocol.py) before anything reaches the worker; a job's checks
  (decode mode, sampling settings, prompt length against the context) run before it is queued, so
  a bad request is a 400 naming the field, and nothing is half-submitted: a request whose `n` rows
  do not all fit the queue is cancelled whole (429).
- Each request's rows send their events from the worker thread into one asyncio queue of the
  request (`loop.call_soon_threadsafe`). A streamed response is server-sent events ending with
  `data: [DONE]`; a client that disconnects (the response generator is closed, or a non-streamed
  request sees `is_disconnected`) cancels its rows at once, and a row stopped by a stop string is
  cancelled too.
- `--api-key KEY`: every `/v1/` route needs `Authorization: Bearer KEY` (401 otherwise).
- One log line per request on stderr: method, path, status, seconds, and the model when known.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from ..core.errors import PoelmError
from ..infer.modes import DecodeMode
from ..infer.sampling import SamplingParams
from ..infer.stops import TextStream
from .models import ServedModel, load_served
from .protocol import (ApiError, ChatRequest, CompletionRequest, chat_logprobs, chunk, completion_logprobs,
                       field_name, new_id, now, usage)
from .scheduler import Job, QueueFull, Scheduler


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


class Guard:
    """ASGI middleware (plain ASGI: Starlette's BaseHTTPMiddleware would add a task switch to every
    streamed chunk): the API key and the loading state for `/v1/` routes, and one log line per request
    (method, path, status, seconds; a stream's line comes when it ends)."""

    def __init__(self, app, state: ServerState, api_key: str | None):
        self.app, self.state, self.api_key = app, state, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        refusal = None
        if scope["path"].startswith("/v1/"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if self.api_key is not None and auth != f"Bearer {self.api_key}":
                refusal = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                   "authentication_error", code="invalid_api_key")
            elif not self.state.ready.is_set():
                refusal = loading_error(self.state)
        if refusal is not None:
            await error_response(refusal)(scope, receive, sending)
        else:
            await self.app(scope, receive, sending)
        print(f"{scope['method']} {scope['path']} {status[0]} {time.perf_counter() - t0:.3f}s", file=sys.stderr,
              flush=True)


def create_app(directories: list[str], names: list[str] | None = None, *, max_batch: int = 16,
               max_queue: int = 64, api_key: str | None = None, device: str = "cpu") -> FastAPI:
    state = ServerState()

    def load() -> None:
        try:
            served = load_served(directories, names, device=device)
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

    app = FastAPI(title="poelm", lifespan=lifespan)
    app.state.poelm = state

    app.add_middleware(Guard, state=state, api_key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # still OpenAI's shape, and one log line
        print(f"poelm serve: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return error_response(ApiError(500, f"{type(e).__name__}: {e}", "server_error"))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": ("body",), "msg": "invalid body"}
        name = field_name(first.get("loc", ()))
        return error_response(ApiError(400, f"{name}: {first.get('msg')}", param=name))

    @app.get("/health")
    async def health():
        if not state.ready.is_set():
            raise loading_error(state)
        return {"status": "ok", "models": list(state.served)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "poelm",
                                            "root": str(s.directory)} for name, s in state.served.items()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        served = model_of(state, body.model)
        tok = served.tokenizer
        prompts = text_prompts(body.prompt, tok)
        if body.max_tokens == 0 and (not body.echo or body.stream):
            raise ApiError(400, "max_tokens: 0 generates nothing; with echo=true and stream=false it scores the "
                           "prompt", param="max_tokens")
        choices = [(p, i) for p in prompts for i in range(body.n)]
        runs = await Run.start(state, served, body, [p for p, _ in choices], body.max_tokens,
                               body.logprobs if body.stream else None)
        if body.stream:
            return sse(runs.completion_events(body, tok), runs)
        results = await runs.wait(request)
        out = []
        for index, ((prompt, _), result) in enumerate(zip(choices, results)):
            text = (tok.decode(prompt) if body.echo else "") + result.text
            logprobs = None
            if body.logprobs is not None:
                scores = await runs.score(prompt + result.tokens, body.logprobs)
                first = 0 if body.echo else len(prompt)
                logprobs = completion_logprobs(tok, scores, first, len(prompt) + result.kept)
            out.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": result.reason})
        return {"id": runs.id, "object": "text_completion", "created": runs.created, "model": body.model,
                "choices": out, "usage": usage(sum(map(len, prompts)), sum(r.count for r in results))}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatRequest)
        served = model_of(state, body.model)
        tok = served.tokenizer
        try:
            prompt = tok.render_prompt([m.model_dump(exclude_none=True) for m in body.messages])
        except PoelmError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or served.model.config.sequence_len - len(prompt)
        runs = await Run.start(state, served, body, [prompt] * body.n, max(max_tokens, 1),
                               (body.top_logprobs or 0) if body.stream and body.logprobs else None)
        if body.stream:
            return sse(runs.chat_events(body, tok), runs)
        results = await runs.wait(request)
        out = []
        for index, result in enumerate(results):
            logprobs = None
            if body.logprobs:
                scores = await runs.score(prompt + result.tokens, body.top_logprobs or 0)
                logprobs = chat_logprobs(tok, scores[len(prompt):len(prompt) + result.kept])
            out.append({"index": index, "message": {"role": "assistant", "content": result.text},
                        "logprobs": logprobs, "finish_reason": result.reason})
        return {"id": runs.id, "object": "chat.completion", "created": runs.created, "model": body.model,
                "choices": out, "usage": usage(len(prompt), sum(r.count for r in results))}

    return app


# ---- helpers ---------------------------------------------------------------------------------------

def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def loading_error(state: ServerState) -> ApiError:
    if state.error is not None:
        return ApiError(503, f"the models failed to load: {state.error}", "server_error", code="load_failed")
    return ApiError(503, "the models are still loading", "server_error", code="loading")


async def parse(request: Request, kind: type) -> Any:
    """The request body as `kind`, or a 400 naming the first bad field (bad JSON included)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body: not valid JSON ({e})", param="body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body: expected a JSON object", param="body")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        name = field_name(first["loc"])
        raise ApiError(400, f"{name}: {first['msg']}", param=name) from None


def model_of(state: ServerState, name: str) -> ServedModel:
    if name not in state.served:
        raise ApiError(404, f"model {name!r} does not exist; this server has {', '.join(state.served)}",
                       param="model", code="model_not_found")
    return state.served[name]


def text_prompts(prompt: Any, tok) -> list[list[int]]:
    """A completions `prompt` as token id lists (text after <|bos|>; ids as given)."""
    if isinstance(prompt, str):
        return [[tok.bos_id] + tok.encode(prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise ApiError(400, "prompt: empty", param="prompt")
    return [[tok.bos_id] + tok.encode(p) if isinstance(p, str) else list(p) for p in prompt]


@dataclass
class Result:
    """One choice once its row has ended."""

    tokens: list[int]  # every token produced (a final stop token included)
    text: str
    reason: str  # "stop" or "length"
    kept: int  # tokens behind the text (before a stop token or string)

    @property
    def count(self) -> int:
        return len(self.tokens)


class Run:
    """The rows of one request: submitted together, their events in one queue."""

    def __init__(self, state: ServerState, served: ServedModel, body: Any):
        self.state, self.served, self.body = state, served, body
        self.id = new_id("cmpl" if isinstance(body, CompletionRequest) else "chatcmpl")
        self.created = now()
        self.outbox = state.outbox_for(asyncio.get_running_loop())
        self.events: asyncio.Queue = asyncio.Queue()
        self.jobs: list[Job] = []
        self.finished: set[int] = set()
        self.stop_ids: frozenset[int] = frozenset()

    @classmethod
    async def start(cls, state: ServerState, served: ServedModel, body: Any, prompts: list[list[int]],
                    max_tokens: int, logprobs: int | None = None) -> "Run":
        """Check and submit one row per prompt; `logprobs`: stream each token's log-probability with that
        many alternatives."""
        run = cls(state, served, body)
        mode = DecodeMode(exit_stage=body.exit_stage, speculative=body.speculative, draft_stage=body.draft_stage)
        base_seed = body.seed if body.seed is not None else secrets.randbits(31)
        for index, prompt in enumerate(prompts):
            try:
                params = SamplingParams(max_new_tokens=max(max_tokens, 1), temperature=body.temperature,
                                        top_p=None if body.top_p >= 1 else body.top_p, seed=base_seed + index)
                job = Job(served.name, prompt, params, mode, run.sink(index), logprobs=logprobs)
                state.scheduler.check(job)
            except PoelmError as e:
                raise ApiError(400, str(e)) from None
            run.jobs.append(job)
        run.stop_ids = state.scheduler.decoder(served.name, mode).stop_ids  # the tokens that end a row
        if max_tokens == 0:  # scoring only (echo): nothing to decode
            for index in range(len(prompts)):
                run.events.put_nowait((index, "done", "length"))
            run.jobs = []
            return run
        try:
            for job in run.jobs:
                state.scheduler.submit(job)
        except QueueFull as e:
            run.cancel()
            raise ApiError(429, f"the server is busy: {e}", "rate_limit_error", code="queue_full") from None
        return run

    def sink(self, index: int):
        return lambda kind, value: self.outbox.post(self.events, (index, kind, value))

    def cancel(self) -> None:
        for i, job in enumerate(self.jobs):
            if i not in self.finished:
                self.state.scheduler.cancel(job)

    async def next_events(self, request: Request | None = None) -> list[tuple[int, str, Any]]:
        """Every event that has arrived (at least one; a non-streamed request checks for a client that
        went away while it waits)."""
        while True:
            try:
                events = [await asyncio.wait_for(self.events.get(), timeout=0.5)]
                while not self.events.empty():
                    events.append(self.events.get_nowait())
                return events
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    raise ApiError(499, "the client went away") from None

    async def wait(self, request: Request) -> list[Result]:
        """Every row's result (non-streamed responses)."""
        n = len(self.jobs) if self.jobs else self.events.qsize()
        tokens: list[list[int]] = [[] for _ in range(n)]
        texts = [TextStream(self.served.tokenizer, self.body.stops(), self.stop_ids) for _ in range(n)]
        reasons: list[str | None] = [None] * n
        kept = [0] * n
        while len(self.finished) < n:
            for index, kind, value in await self.next_events(request):
                if kind == "error":
                    self.cancel()
                    raise ApiError(500, f"decoding failed: {value}", "server_error")
                if index in self.finished:
                    continue  # a stop string ended it; its cancel is on its way
                if kind == "token":
                    tokens[index].append(value)
                    texts[index].push(value)
                    if value not in self.stop_ids:
                        kept[index] = len(tokens[index])
                    if texts[index].stopped:
                        reasons[index] = "stop"
                        self.finished.add(index)
                        self.state.scheduler.cancel(self.jobs[index])
                elif kind == "done":
                    reasons[index] = value
                    self.finished.add(index)
        return [Result(t, s.text if s.stopped else s.text + s.finish(), r, k)
                for t, s, r, k in zip(tokens, texts, reasons, kept)]


    async def score(self, ids: list[int], top: int) -> list[dict]:
        """Log-probabilities of `ids` (the worker's scoring job)."""
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(self.served.name, ids, SamplingParams(), DecodeMode(exit_stage=self.body.exit_stage),
                  lambda kind, value: self.outbox.post(queue, (kind, value)), score=top)
        try:
            self.state.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", "rate_limit_error", code="queue_full") from None
        kind, value = await queue.get()
        if kind != "scores":
            raise ApiError(500, f"scoring failed: {value}", "server_error")
        return value

    async def stream(self) -> AsyncIterator[list[tuple[int, str | None, list[dict]]]]:
        """Per batch of arrived events: [(choice index, text piece, logprob entries)], a row's end as
        (index, None, entries) after its last piece. A piece carries the entries of the tokens that
        arrived since the row's last piece (none for stop tokens, which are never text). Stop strings
        cancel their row."""
        n = len(self.jobs)
        texts = [TextStream(self.served.tokenizer, self.body.stops(), self.stop_ids) for _ in range(n)]
        pending: list[list[dict]] = [[] for _ in range(n)]
        self.reasons: list[str | None] = [None] * n
        self.counts = [0] * n

        def take(index: int) -> list[dict]:
            entries, pending[index] = pending[index], []
            return [e for e in entries if e["token"] not in self.stop_ids]

        while len(self.finished) < n:
            out: list[tuple[int, str | None, list[dict]]] = []
            for index, kind, value in await self.next_events():
                if kind == "error":
                    self.cancel()
                    raise RuntimeError(value)
                if index in self.finished:
                    continue
                if kind == "logprob":
                    pending[index].append(value)
                elif kind == "token":
                    self.counts[index] += 1
                    piece = texts[index].push(value)
                    if piece:
                        out.append((index, piece, take(index)))
                    if texts[index].stopped:
                        self.reasons[index] = "stop"
                        self.finished.add(index)
                        self.state.scheduler.cancel(self.jobs[index])
                        out.append((index, None, take(index)))
                elif kind == "done":
                    piece = texts[index].finish()
                    if piece:
                        out.append((index, piece, take(index)))
                    self.reasons[index] = value
                    self.finished.add(index)
                    out.append((index, None, take(index)))
            if out:
                yield out

    async def completion_events(self, body: CompletionRequest, tok) -> AsyncIterator[list[dict]]:
        prompts = [job.prompt for job in self.jobs]
        offsets = [0] * len(prompts)  # text_offset of each choice's next token

        def logprobs(index: int, entries: list[dict]) -> dict | None:
            if body.logprobs is None:
                return None
            out = completion_logprobs(tok, entries, 0, len(entries), offsets[index])
            offsets[index] += sum(len(t) for t in out["tokens"])
            return out

        if body.echo:
            echoed = []
            for index, prompt in enumerate(prompts):
                scores = await self.score(prompt, body.logprobs) if body.logprobs is not None else []
                echoed.append(chunk("text_completion", self.id, body.model, self.created,
                                    [{"index": index, "text": tok.decode(prompt), "logprobs": logprobs(index, scores),
                                      "finish_reason": None}]))
            yield echoed
        async for pieces in self.stream():
            yield [chunk("text_completion", self.id, body.model, self.created,
                         [{"index": index, "text": piece or "", "logprobs": logprobs(index, entries),
                           "finish_reason": None if piece is not None else self.reasons[index]}])
                   for index, piece, entries in pieces]
        if body.stream_options is not None and body.stream_options.include_usage:
            yield [chunk("text_completion", self.id, body.model, self.created, [],
                         {"usage": usage(sum(map(len, prompts[::body.n])), sum(self.counts))})]

    async def chat_events(self, body: ChatRequest, tok) -> AsyncIterator[list[dict]]:
        kind = "chat.completion.chunk"

        def logprobs(entries: list[dict]) -> dict | None:
            return chat_logprobs(tok, entries) if body.logprobs else None

        yield [chunk(kind, self.id, body.model, self.created,  # the first delta of each choice carries the role
                     [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}]) for index in range(len(self.jobs))]
        async for pieces in self.stream():
            yield [chunk(kind, self.id, body.model, self.created,
                         [{"index": index, "delta": {"content": piece}, "logprobs": logprobs(entries),
                           "finish_reason": None}
                          if piece is not None else
                          {"index": index, "delta": {}, "logprobs": logprobs(entries) if entries else None,
                           "finish_reason": self.reasons[index]}])
                   for index, piece, entries in pieces]
        if body.stream_options is not None and body.stream_options.include_usage:
            yield [chunk(kind, self.id, body.model, self.created, [],
                         {"usage": usage(len(self.jobs[0].prompt), sum(self.counts))})]


def sse(events: AsyncIterator[list[dict]], run: Run) -> StreamingResponse:
    """Server-sent events: one `data: {json}` per event (the events that arrived together in one write),
    then `data: [DONE]`; closing the stream early (the client went away) cancels the request's rows."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for batch in events:
                yield "".join(f"data: {json.dumps(event)}\n\n" for event in batch).encode()
            yield b"data: [DONE]\n\n"
        except RuntimeError as e:  # a decoding error mid-stream: an error event, then the end
            yield f"data: {json.dumps(ApiError(500, f'decoding failed: {e}', 'server_error').body())}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            run.cancel()

    return StreamingResponse(body(), media_type="text/event-stream")


@contextlib.contextmanager
def background(directories: list[str], names: list[str] | None = None, *, host: str = "127.0.0.1",
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


def serve(directories: list[str], names: list[str] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 16, max_queue: int = 64, api_key: str | None = None, device: str = "cpu") -> None:
    """Run the server until interrupted; raise PoelmError if the models fail to load."""
    import uvicorn

    app = create_app(directories, names, max_batch=max_batch, max_queue=max_queue, api_key=api_key, device=device)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    state: ServerState = app.state.poelm
    state.on_failure = lambda: setattr(server, "should_exit", True)
    print(f"poelm serve: http://{host}:{port}/v1 (loading {', '.join(map(str, directories))})", file=sys.stderr,
          flush=True)
    server.run()
    if state.error is not None:
        raise PoelmError(state.error)
