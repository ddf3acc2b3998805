"""`poelm serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the batching worker.

Design choices:
- The app answers at once; the models load in a background thread (`/health` and every endpoint
  answer 503 until they are ready). If loading fails, the error is printed as one line and the
  server stops with it (`serve` raises it).
- Bounded before it costs (protocol.LIMITS): a body larger than `body_bytes` is refused (413) by its
  Content-Length, or as it arrives, before it is parsed; the schema bounds every list and number; a
  prompt is checked against the model's context before it is tokenized. Tokenizing and rendering
  run in a thread, never on the event loop, so `/health` answers while large requests are prepared.
- Every request is validated (protocol.py) before anything reaches the worker; a job's checks
  (decode mode, sampling settings, prompt length against the context) run before it is queued, so
  a bad request is a 400 naming the field, and nothing is half-submitted: a request whose `n` rows
  do not all fit the queue is cancelled whole (429).
- One way to fold a request's events into text (`Run.stream`): the streamed response sends its
  pieces as they come, a non-streamed one joins the same pieces (`Run.wait`), so both give the same
  text, stop strings included.
- Each request's rows send their events from the worker thread into one asyncio queue of the
  request (`loop.call_soon_threadsafe`). A client that disconnects cancels its rows at once: a
  streamed response when its generator is closed, a non-streamed one through a task that waits for
  the disconnect message itself (no polling). A row stopped by a stop string is cancelled too. One
  row that fails (the worker reports an error for it) fails its own request only.
- No request can take the server down with it: any exception the routes do not turn into an error
  response becomes a 500 in OpenAI's shape and one log line, and the connection stays usable.
- Keys: `--api-key`, `--api-key-file` or `$POELM_API_KEY`; compared in constant time. With a key,
  everything needs `Authorization: Bearer KEY` (the API, `/docs`, `/redoc`, `/openapi.json`) but a
  bare liveness answer at `/health` (the model list only with the key).
- One log line per request on stderr: method, path, status, seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import PoelmError
from ..infer.modes import DecodeMode
from ..infer.sampling import SamplingParams
from ..infer.stops import TextStream
from .models import ServedModel, load_served
from .protocol import (LIMITS, STREAMED, ApiError, ChatCompletion, ChatRequest, Completion, CompletionRequest, Health,
                       Limits, ModelList, chat_logprobs, chunk, completion_logprobs, errors, field_name, new_id, now,
                       usage)
from .scheduler import Job, QueueFull, Scheduler

KEY_ENV = "POELM_API_KEY"


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


class Guard:
    """ASGI middleware (plain ASGI: Starlette's BaseHTTPMiddleware would add a task switch to every
    streamed chunk): the API key, the loading state for `/v1/` routes, the body's size, the last word
    on any exception, and one log line per request (method, path, status, seconds; a stream's line
    comes when it ends)."""

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
            return loading_error(self.state), receive
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
                return None, _replay([], receive, disconnected=True)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return too_big, receive
        return None, _replay(chunks, receive)


def _replay(chunks: list[bytes], receive, disconnected: bool = False):
    """A receive channel that gives the body read so far, then what the client sends next (its disconnect)."""
    pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}] if not disconnected else \
        [{"type": "http.disconnect"}]

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed


def create_app(directories: list[str], names: list[str] | None = None, *, max_batch: int = 16,
               max_queue: int = 64, api_key: str | None = None, device: str = "cpu",
               limits: Limits = LIMITS) -> FastAPI:
    state = ServerState(api_key=api_key, limits=limits)

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

    app = FastAPI(title="poelm", version="1", lifespan=lifespan,
                  description="An OpenAI-compatible API over a poelm base and its specialist stages.")
    app.state.poelm = state
    app.add_middleware(Guard, state=state)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": ("body",), "msg": "invalid body"}
        if first.get("type") == "json_invalid":
            name, message = "body", f"not valid JSON ({(first.get('ctx') or {}).get('error', first.get('msg'))})"
        else:
            name, message = field_name(first.get("loc", ())), str(first.get("msg")).removeprefix("Value error, ")
        return error_response(ApiError(400, f"{name}: {message}", param=name))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # unknown paths, methods, unparsable bodies
        if e.status_code == 400:  # FastAPI could not parse the body: too deep, an integer past 4300 digits, ...
            cause = f" ({type(e.__cause__).__name__}: {str(e.__cause__)[:200]})" if e.__cause__ else ""
            return error_response(ApiError(400, f"body: not valid JSON{cause}", param="body"))
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind))

    @app.get("/health", response_model=Health, response_model_exclude_none=True, responses=errors(503))
    async def health(request: Request):
        """Liveness: `{"status": "ok"}` once the models are loaded; their names too when the request
        carries the key (or none is set)."""
        if not state.ready.is_set():
            raise loading_error(state)
        if not state.authorized(request.scope["headers"]):
            return {"status": "ok"}
        return {"status": "ok", "models": list(state.served)}

    @app.get("/v1/models", response_model=ModelList, responses=errors(401, 503))
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "poelm",
                                            "root": str(s.directory)} for name, s in state.served.items()]}

    @app.post("/v1/completions", response_model=Completion,
              responses={200: {"content": STREAMED}, **errors(400, 401, 404, 413, 429, 500, 503)})
    async def completions(body: CompletionRequest, request: Request):
        served = model_of(state, body.model)
        tok = served.tokenizer
        if body.max_tokens == 0 and (not body.echo or body.stream):
            raise ApiError(400, "max_tokens: 0 generates nothing; with echo=true and stream=false it scores the "
                           "prompt", param="max_tokens")
        prompts = await asyncio.to_thread(prompts_of, body.prompt, served)
        choices = [p for p in prompts for _ in range(body.n)]
        runs = await Run.start(state, served, body, [p.ids for p in choices], body.max_tokens,
                               body.logprobs if body.stream else None)
        if body.stream:
            return sse(runs.completion_events(body, tok, choices), runs)
        results = await runs.wait(request)
        out = []
        for index, (prompt, result) in enumerate(zip(choices, results)):
            logprobs = None
            if body.logprobs is not None:
                scores = await runs.score(prompt.ids + result.tokens, body.logprobs)
                first = prompt.start if body.echo else len(prompt.ids)
                logprobs = completion_logprobs(tok, scores, first, len(prompt.ids) + result.kept)
            out.append({"index": index, "text": (prompt.text if body.echo else "") + result.text,
                        "logprobs": logprobs, "finish_reason": result.reason})
        return {"id": runs.id, "object": "text_completion", "created": runs.created, "model": body.model,
                "choices": out, "usage": usage(sum(len(p.ids) for p in prompts), sum(r.count for r in results))}

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": STREAMED}, **errors(400, 401, 404, 413, 429, 500, 503)})
    async def chat(body: ChatRequest, request: Request):
        served = model_of(state, body.model)
        tok = served.tokenizer
        messages = [m.rendered() for m in body.messages]
        check_fits(sum(len(m["content"].encode()) for m in messages), served, "messages")
        try:
            prompt = await asyncio.to_thread(tok.render_prompt, messages)
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


def model_of(state: ServerState, name: str) -> ServedModel:
    if name not in state.served:
        raise ApiError(404, f"model {name!r} does not exist; this server has {', '.join(state.served)}",
                       param="model", code="model_not_found")
    return state.served[name]


def check_fits(nbytes: int, served: ServedModel, param: str) -> None:
    """Refuse, before tokenizing, a text that cannot fit the context whatever its tokens: more bytes than
    sequence_len tokens of the longest token's bytes."""
    config = served.model.config
    most = config.sequence_len * served.longest_token
    if nbytes > most:
        raise ApiError(400, f"{param}: {nbytes} bytes of text cannot fit the model's context of "
                       f"{config.sequence_len} tokens (at most {most} bytes)", param=param)


@dataclass
class Prompt:
    """What the model reads (`ids`: <|bos|> and the prompt's tokens), and what the client sent: its text
    (`text`) and where its own tokens begin in `ids` (`start`: 1 when poelm added the <|bos|>)."""

    ids: list[int]
    start: int
    text: str


def prompts_of(prompt: Any, served: ServedModel) -> list[Prompt]:
    """A completions `prompt` (text, texts, token ids, lists of token ids) as Prompts (in a thread: it
    tokenizes)."""
    tok = served.tokenizer
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    out = []
    for item in items:
        if isinstance(item, str):
            check_fits(len(item.encode()), served, "prompt")
            out.append(Prompt([tok.bos_id] + tok.encode(item), 1, item))
        else:
            added = 0 if item[:1] == [tok.bos_id] else 1
            bad = [i for i in item if i >= tok.vocab_size]
            if bad:
                raise ApiError(400, f"prompt: token ids {bad[:5]} are not in [0, {tok.vocab_size})", param="prompt")
            out.append(Prompt([tok.bos_id] * added + list(item), added, tok.decode(item)))
    return out


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


class ClientGone(Exception):
    """The client of a non-streamed request disconnected: its rows are cancelled."""


class Run:
    """The rows of one request: submitted together, their events in one queue, folded into text once."""

    def __init__(self, state: ServerState, served: ServedModel, body: Any):
        self.state, self.served, self.body = state, served, body
        self.id = new_id("cmpl" if isinstance(body, CompletionRequest) else "chatcmpl")
        self.created = now()
        self.outbox = state.outbox_for(asyncio.get_running_loop())
        self.events: asyncio.Queue = asyncio.Queue()
        self.jobs: list[Job] = []
        self.n = 0
        self.finished: set[int] = set()
        self.stop_ids: frozenset[int] = frozenset()

    @classmethod
    async def start(cls, state: ServerState, served: ServedModel, body: Any, prompts: list[list[int]],
                    max_tokens: int, logprobs: int | None = None) -> "Run":
        """Check and submit one row per prompt; `logprobs`: stream each token's log-probability with that
        many alternatives."""
        run = cls(state, served, body)
        run.n = len(prompts)
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

    async def stream(self) -> AsyncIterator[list[tuple[int, str | None, list[dict]]]]:
        """Per batch of arrived events: [(choice index, text piece, logprob entries)], a row's end as
        (index, None, entries) after its last piece. A piece carries the entries of the tokens that
        arrived since the row's last piece (none for stop tokens, which are never text). Stop strings
        cancel their row. Records each row's tokens, kept tokens and finish reason as it goes."""
        n = self.n
        texts = [TextStream(self.served.tokenizer, self.body.stops(), self.stop_ids) for _ in range(n)]
        pending: list[list[dict]] = [[] for _ in range(n)]
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.kept = [0] * n
        self.reasons: list[str | None] = [None] * n

        def take(index: int) -> list[dict]:
            entries, pending[index] = pending[index], []
            return [e for e in entries if e["token"] not in self.stop_ids]

        while len(self.finished) < n:
            out: list[tuple[int, str | None, list[dict]]] = []
            events = [await self.events.get()]
            while not self.events.empty():
                events.append(self.events.get_nowait())
            for index, kind, value in events:
                if kind == "gone":
                    raise ClientGone()
                if kind == "error":
                    self.cancel()
                    raise RuntimeError(value)
                if index in self.finished:
                    continue
                if kind == "logprob":
                    pending[index].append(value)
                elif kind == "token":
                    self.tokens[index].append(value)
                    if value not in self.stop_ids:
                        self.kept[index] = len(self.tokens[index])
                    piece = texts[index].push(value)
                    if piece:
                        out.append((index, piece, take(index)))
                    if texts[index].stopped:
                        self.reasons[index] = "stop"
                        self.finished.add(index)
                        self.state.scheduler.cancel(self.jobs[index])
                        out.append((index, None, take(index)))
                elif kind == "done":
                    piece = texts[index].finish()  # the held-back tail; it may complete a stop string
                    if piece:
                        out.append((index, piece, take(index)))
                    self.reasons[index] = "stop" if texts[index].stopped else value
                    self.finished.add(index)
                    out.append((index, None, take(index)))
            if out:
                yield out

    async def wait(self, request: Request) -> list[Result]:
        """Every row's result (non-streamed responses): the pieces `stream` gives, joined. A client that
        goes away cancels the rows at once (a task waits for its disconnect message)."""
        watcher = asyncio.create_task(disconnected(request))
        watcher.add_done_callback(lambda task: None if task.cancelled() else self.gone())
        texts = [""] * self.n
        try:
            async for pieces in self.stream():
                for index, piece, _ in pieces:
                    texts[index] += piece or ""
        except ClientGone:
            raise ApiError(499, "the client went away") from None
        except RuntimeError as e:
            raise ApiError(500, f"decoding failed: {e}", "server_error") from None
        finally:
            watcher.cancel()
        return [Result(self.tokens[i], texts[i], self.reasons[i], self.kept[i]) for i in range(self.n)]

    def gone(self) -> None:
        self.cancel()
        self.events.put_nowait((-1, "gone", None))

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

    async def completion_events(self, body: CompletionRequest, tok, prompts: list[Prompt]) -> AsyncIterator[list[dict]]:
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
                scores = (await self.score(prompt.ids, body.logprobs))[prompt.start:] if body.logprobs is not None \
                    else []
                echoed.append(chunk("text_completion", self.id, body.model, self.created,
                                    [{"index": index, "text": prompt.text, "logprobs": logprobs(index, scores),
                                      "finish_reason": None}]))
            yield echoed
        async for pieces in self.stream():
            yield [chunk("text_completion", self.id, body.model, self.created,
                         [{"index": index, "text": piece or "", "logprobs": logprobs(index, entries),
                           "finish_reason": None if piece is not None else self.reasons[index]}])
                   for index, piece, entries in pieces]
        if body.stream_options is not None and body.stream_options.include_usage:
            yield [chunk("text_completion", self.id, body.model, self.created, [],
                         {"usage": usage(sum(len(p.ids) for p in prompts[::body.n]),
                                         sum(map(len, self.tokens)))})]

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
                         {"usage": usage(len(self.jobs[0].prompt), sum(map(len, self.tokens)))})]


async def disconnected(request: Request) -> None:
    """Return when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
          max_batch: int = 16, max_queue: int = 64, api_key: str | None = None, device: str = "cpu",
          limits: Limits = LIMITS) -> None:
    """Run the server until interrupted; raise PoelmError if the models fail to load."""
    import uvicorn

    app = create_app(directories, names, max_batch=max_batch, max_queue=max_queue, api_key=api_key, device=device,
                     limits=limits)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    state: ServerState = app.state.poelm
    state.on_failure = lambda: setattr(server, "should_exit", True)
    print(f"poelm serve: http://{host}:{port}/v1 (loading {', '.join(map(str, directories))}"
          f"{'; API key required' if api_key else ''})", file=sys.stderr, flush=True)
    server.run()
    if state.error is not None:
        raise PoelmError(state.error)
