"""Batches of sequences decoded together that gain and lose rows between steps (continuous batching):
what every batched decoder shares, and the engine's batch. Rows are left-padded in one
`BatchKVCache`, each with its own sampling state, so a row computes what it computes alone whatever
else is in the batch; a row's failure ends that row only (docs/inference.md §2).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .cache import BatchKVCache
from .fleet import Fleet, Route
from .sampling import SamplingParams, sample_next


@dataclass(eq=False)  # a row is itself: two requests with the same fields are two rows
class Row:
    """One sequence of a batch: its request, what it produced, and whether it has finished."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    seen: list[int]  # prompt + output: for the repetition penalty
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    route: Route | None = None  # the engine's batches: which model, stage and predictor the row decodes
    logprobs: int | None = None  # the engine's batches: report each token's log-probability and this many alternatives
    logprob: dict | None = None  # ... of the token emitted last (`token_logprob`)
    error: str | None = None  # why the row ended without finishing (`fail`): "ExceptionType: message"

    def emit(self, token: int, limit: int) -> bool:
        """Record a produced token; whether the row has finished (a stop token, its budget, or prompt +
        output reaching the context limit `limit`)."""
        self.tokens.append(token)
        self.done = (token in self.stop_ids or len(self.tokens) >= self.params.max_new_tokens
                     or len(self.prompt) + len(self.tokens) >= limit)
        return self.done

    def fail(self, e: Exception) -> None:
        """End this row alone: picking its token raised `e` (module docstring)."""
        self.error = f"{type(e).__name__}: {e}"
        self.done = True


def token_logprob(scores: torch.Tensor, token: int, top: int) -> dict:
    """What is reported of a token chosen from a predictor's scores (V,): {"token", "logprob" (its
    log-softmax), "top": the `top` most likely [(id, logprob)]}."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    best = logp.topk(top) if top > 0 else None
    return {"token": token, "logprob": float(logp[token]),
            "top": [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))}


class RowBatch(ABC):
    """What every batched decoder shares (see the module docstring): `add` queues a row, `step` admits
    what was queued and advances every row; finished rows leave."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.limit = model.config.sequence_len
        self.rows: list[Row] = []  # in cache order
        self.queued: list[Row] = []
        self.cache = BatchKVCache()

    def __len__(self) -> int:
        return len(self.rows) + len(self.queued)

    def add(self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int]) -> Row:
        """Queue a checked request (decoder.check_request); it joins at the next step."""
        generator = (torch.Generator(device=self.device).manual_seed(params.seed) if params.temperature > 0
                     else None)
        row = Row(list(prompt), params, stop_ids, generator, list(prompt))
        self.queued.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """Stop decoding `row` now (a client that went away): it leaves the batch before the next step."""
        if row.done:
            return
        row.done = True
        if any(r is row for r in self.queued):
            self.queued = [r for r in self.queued if r is not row]
        else:
            self._keep([i for i, r in enumerate(self.rows) if not r.done])

    @abstractmethod
    def step(self) -> list[tuple[Row, int]]:
        """Advance every row; the tokens produced, in order."""

    def _prefill(self, **forward) -> tuple[list[Row], torch.Tensor]:
        """Prefill the queued rows as one left-padded batch, merge them into the running one, and
        return them with their next-token scores (n, vocab) float32 (`forward`: the model's options)."""
        rows, self.queued = self.queued, []
        T = max(len(r.prompt) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(rows), T, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            ids[i, T - len(r.prompt):] = torch.tensor(r.prompt, device=self.device)
            mask[i, T - len(r.prompt):] = True
        cache = BatchKVCache()
        with torch.inference_mode():
            logits = self._scores(ids, cache, mask, rows, **forward)
        self.cache.extend(cache)
        self.rows += rows
        return rows, logits

    def _scores(self, ids: torch.Tensor, cache: BatchKVCache, mask: torch.Tensor | None, rows: list[Row],
                **forward) -> torch.Tensor:
        """Feed `ids` (B, T) of `rows` into `cache`: each row's next-token scores (B, V) float32."""
        return self.model(ids, cache=cache, attention_mask=mask, **forward).logits[:, -1].float()

    def _start(self, pick, **forward) -> list[tuple[Row, int]]:
        """The step of decoders whose running rows wait while newcomers join: prefill the queued rows,
        give each its first token (`pick(scores (vocab,), row) -> token`), and drop those already done.
        A row's last token (`row.tokens[-1]`) is then what it feeds next."""
        rows, logits = self._prefill(**forward)
        emitted = []
        for r, scores in zip(rows, logits):
            try:
                token = pick(scores, r)
            except Exception as e:  # noqa: BLE001 - this row ends alone (module docstring)
                r.fail(e)
                continue
            r.emit(token, self.limit)
            emitted.append((r, token))
        self._keep([i for i, r in enumerate(self.rows) if not r.done])
        return emitted

    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`, in that order; an empty batch starts a fresh cache."""
        if keep == list(range(len(self.rows))):
            return
        self.rows = [self.rows[i] for i in keep]
        if self.rows:
            self.cache.select(torch.tensor(keep, dtype=torch.long, device=self.device))
        else:
            self.cache = BatchKVCache()

    def _feed(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per row as a step's input: ids (B, 1), and its mask when the cache holds padding."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        return ids, None if self.cache.attention_mask is None else torch.ones_like(ids, dtype=torch.bool)


class Batch(RowBatch):
    """The engine's batch: one token per row per step, each row along its own route through a fleet of
    models (fleet.py: rows of different models share the layers their models have in common). An
    engine's batch is a fleet of its one model with one route: full depth or stopping after an exit
    stage. Rows are kept sorted by route (`Route.key`), as the fleet's walk needs."""

    def __init__(self, fleet: Fleet, route: Route | None = None):
        super().__init__(fleet.trunk)
        self.fleet, self.route = fleet, route
        self.logits: torch.Tensor | None = None  # (len(rows), V): each row's next-token scores

    def add(self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int],
            route: Route | None = None) -> Row:
        """Queue a checked request along `route` (default: the batch's own)."""
        route = route or self.route
        if route is None:
            raise ValueError("Batch.add: this batch has no default route; give the row's")
        row = super().add(prompt, params, stop_ids)
        row.route = route
        return row

    def _scores(self, ids, cache, mask, rows, **forward) -> torch.Tensor:
        return self.fleet.forward(ids, cache, [r.route for r in rows], attention_mask=mask)

    def _keep(self, keep: list[int]) -> None:
        if self.logits is not None and keep != list(range(len(self.rows))):
            self.logits = self.logits[keep] if keep else None
        super()._keep(keep)

    def _pick(self, r: Row, scores: torch.Tensor, greedy: int) -> int:
        """Row r's next token from its scores (V,) (`greedy`: their argmax), and its reported logprob."""
        if r.params.temperature == 0 and r.params.repetition_penalty == 1:
            token = greedy
        else:
            seen = torch.tensor(r.seen, device=self.device) if r.params.repetition_penalty != 1 else None
            token = sample_next(scores, seen, r.params, r.generator)
        if r.logprobs is not None:
            r.logprob = token_logprob(scores, token, r.logprobs)
        return token

    def step(self) -> list[tuple[Row, int]]:
        """One token for every row; rows that finish (or fail) leave the batch."""
        if self.queued:
            self.queued.sort(key=lambda r: r.route.key)
            _, logits = self._prefill()
            self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
            self._keep(sorted(range(len(self.rows)), key=lambda i: self.rows[i].route.key))
        if not self.rows:
            return []
        emitted, keep, feed = [], [], []
        with torch.inference_mode():
            greedy = self.logits.argmax(dim=-1).tolist()  # every plain-greedy row at once
            for i, r in enumerate(self.rows):
                try:
                    token = self._pick(r, self.logits[i], greedy[i])
                except Exception as e:  # noqa: BLE001 - this row ends alone (module docstring)
                    r.fail(e)
                    continue
                emitted.append((r, token))
                if not r.emit(token, self.limit):
                    keep.append(i)
                    feed.append(token)
                    r.seen.append(token)
        self._keep(keep)
        if not self.rows:
            self.logits = None
            return emitted
        step, mask = self._feed(feed)
        with torch.inference_mode():
            self.logits = self.fleet.forward(step, self.cache, [r.route for r in self.rows], attention_mask=mask)
        return emitted
