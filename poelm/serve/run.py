"""The rows of one request (`Run`): submitted together after every check, their events from the worker
thread in one queue, folded into text once (`Run.stream`). A streamed response sends the pieces as
they come (`sse`), a whole one joins the same pieces (`Run.wait`), so both give the same text, stop
strings included. A client that goes away cancels its rows at once (docs/serving.md)."""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..core.errors import PoelmError
from ..infer.modes import DecodeMode
from ..infer.sampling import SamplingParams
from ..infer.stops import TextStream
from .models import ServedModel
from .prompts import Prompt
from .protocol import (ApiError, ChatRequest, CompletionRequest, chat_logprobs, chunk, completion_logprobs, new_id, now,
                       usage)
from .scheduler import Job, QueueFull
from .state import ServerState


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
                submit(state, job)
        except ApiError:
            run.cancel()  # nothing half-submitted: the rows already queued leave with the others
            raise
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
        submit(self.state, job)
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


def submit(state: ServerState, job: Job) -> None:
    """Queue one job; a full queue is a 429."""
    try:
        state.scheduler.submit(job)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}", "rate_limit_error", code="queue_full") from None


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
