"""The server's model worker: continuous batching of every request, one thread owning the models
(docs/serving.md, "The worker").

- Every forward runs in the one worker thread; requests join their batch at its next step and leave
  when they finish or are cancelled. Rows of the base and of its specialists share one batch (a
  `Fleet`: the base's layers run once per step for all of them).
- Back-pressure: at most `max_batch` rows decode and at most `max_queue` requests wait (QueueFull: 429).
- A row decodes exactly what it decodes alone, so a seeded request does not depend on what else runs.
- Events go to each job's `sink` from the worker thread: ("logprob", entry), ("token", id), ("done",
  "stop" | "length"), ("scores", list), or ("error", message) as its last; a failure fails only the
  rows it touched.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..core.errors import PoelmError
from ..infer.batch import Batch, Row, RowBatch, token_logprob
from ..infer.decoder import Decoder, check_request
from ..infer.fleet import Fleet
from ..infer.modes import DecodeMode, make_decoder
from ..infer.sampling import SamplingParams
from .models import ServedModel
from .options import DEFAULTS

Sink = Callable[[str, Any], None]


class QueueFull(Exception):
    """More requests are waiting than `max_queue` allows."""


@dataclass(eq=False)
class Job:
    """One row to decode (or, with `score`, a prompt to score with its top-`score` alternatives)."""

    model: str
    prompt: list[int]
    params: SamplingParams
    mode: DecodeMode
    sink: Sink
    score: int | None = None
    logprobs: int | None = None  # stream each token's log-probability with this many alternatives (engine modes)
    row: Row | None = None


@torch.inference_mode()
def score_prompt(model: torch.nn.Module, prompt: list[int], top: int, exit_stage: int | None = None) -> list[dict]:
    """Per prompt token: its log-probability under the model's predictor (stage `exit_stage`'s, else the
    full model's) given the tokens before it (None for the first) and the `top` most likely tokens
    there: [{"token", "logprob", "top"}] (`token_logprob`)."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    logits = model(ids, exit_stage=exit_stage).logits[0]  # (T, V): position t predicts token t + 1
    return [{"token": prompt[0], "logprob": None, "top": []}] + [
        token_logprob(logits[t - 1], prompt[t], top) for t in range(1, len(prompt))]


class Scheduler:
    """The worker (see the module docstring). `start()` it once the models are loaded."""

    def __init__(self, served: dict[str, ServedModel], max_batch: int = DEFAULTS.max_batch,
                 max_queue: int = DEFAULTS.max_queue):
        if max_batch < 1 or max_queue < 1:
            raise PoelmError(f"--max-batch {max_batch} and --max-queue {max_queue}: expected at least 1 each")
        self.served, self.max_batch, self.max_queue = served, max_batch, max_queue
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._cancelled: list[Job] = []
        self._batches: dict[tuple, RowBatch] = {}  # ("fleet", i) or (model id, speculative mode)
        self._fleets: list[Fleet] = []
        self._fleet_of: dict[str, int] = {}
        for name, model in served.items():  # models that cannot share a batch get a fleet of their own
            index = next((i for i, f in enumerate(self._fleets) if f.admits(model.model)), len(self._fleets))
            if index == len(self._fleets):
                self._fleets.append(Fleet([model.model]))
            self._fleets[index].join(model.model)
            self._fleet_of[name] = index
        self.shared_steps = 0  # steps of a batch holding rows of more than one model
        self._jobs: dict[int, tuple[Job, RowBatch]] = {}  # id(row) -> its job and batch
        self._stopping = False
        self.cancelled_rows = 0  # rows freed before their end (a client went away, a stop string)
        self._thread: threading.Thread | None = None

    # ---- called from the API (any thread) ----------------------------------------------------
    def decoder(self, name: str, mode: DecodeMode) -> Decoder:
        served = self.served[name]
        if mode not in served.decoders:
            served.decoders[mode] = make_decoder(served.model, mode, tokenizer=served.tokenizer,
                                                 model_dir=served.directory)
        return served.decoders[mode]

    def check(self, job: Job) -> None:
        """Raise PoelmError unless the job's model, mode, sampling settings and prompt can be served."""
        mode = job.mode
        mode.check(job.params)
        if mode.compose or mode.adaptive:
            raise PoelmError("the server decodes with the engine, exit_stage or speculative decoding")
        if job.logprobs is not None and mode.speculative is not None:
            raise PoelmError("logprobs while streaming come from the engine's steps: drop speculative, or "
                             "set stream=false")
        check_request(self.served[job.model].model.config, job.prompt, job.params.max_new_tokens, mode.exit_stage)
        self.decoder(job.model, mode)  # stage numbers against the model

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        with self._cond:
            self._cancelled.append(job)
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="poelm-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def active(self) -> int:
        return sum(len(b) for b in self._batches.values())

    # ---- the worker ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._cancelled or self.active
                           or (self._waiting and self.active < self.max_batch)):
                    self._cond.wait()
                if self._stopping:
                    break
                cancelled, self._cancelled = self._cancelled, []
                self._waiting = deque(job for job in self._waiting if job not in cancelled)
                admitted = []
                while self._waiting and self.active + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            for job in cancelled:
                if job.row is not None and id(job.row) in self._jobs:
                    self._jobs.pop(id(job.row))[1].cancel(job.row)
                    self.cancelled_rows += 1
            for job in admitted:
                self._admit(job)
            for key, batch in list(self._batches.items()):
                if len(batch):
                    self._step(batch)
                else:
                    del self._batches[key]
        for job, _ in self._jobs.values():
            job.sink("error", "the server is shutting down")

    def _admit(self, job: Job) -> None:
        served = self.served[job.model]
        try:
            if job.score is not None:
                job.sink("scores", score_prompt(served.model, job.prompt, job.score, job.mode.exit_stage))
                return
            decoder = self.decoder(job.model, job.mode)
            if job.mode.speculative is None:
                fleet = self._fleet_of[job.model]
                batch = self._batches.setdefault(("fleet", fleet), Batch(self._fleets[fleet]))
                route = self._fleets[fleet].route(served.model, job.mode.exit_stage, decoder.output)
                job.row = batch.add(job.prompt, job.params, decoder.stop_ids, route)
                job.row.logprobs = job.logprobs
            else:
                batch = self._batches.setdefault((job.model, job.mode), decoder.batch())
                job.row = batch.add(job.prompt, job.params, decoder.stop_ids)
            self._jobs[id(job.row)] = (job, batch)
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the worker
            job.sink("error", f"{type(e).__name__}: {e}")

    def _step(self, batch: RowBatch) -> None:
        if len({id(r.route.model) for r in batch.rows if r.route is not None}) > 1:
            self.shared_steps += 1
        try:
            emitted = batch.step()
        except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving the others
            for job, owner in list(self._jobs.values()):
                if owner is batch:
                    del self._jobs[id(job.row)]
                    job.sink("error", f"{type(e).__name__}: {e}")
            for key in [k for k, b in self._batches.items() if b is batch]:
                del self._batches[key]
            return
        for key, (job, owner) in list(self._jobs.items()):  # rows that failed alone (batch.py)
            if owner is batch and job.row.error is not None:
                del self._jobs[key]
                job.sink("error", job.row.error)
        last: dict[int, tuple[Row, int]] = {}
        for row, token in emitted:
            entry = self._jobs.get(id(row))
            if entry is not None:
                if row.logprob is not None:
                    entry[0].sink("logprob", row.logprob)
                entry[0].sink("token", token)
                last[id(row)] = (row, token)
        for row, token in last.values():
            if row.done:
                job, _ = self._jobs.pop(id(row))
                job.sink("done", "stop" if token in row.stop_ids else "length")
