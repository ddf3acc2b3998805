"""A batch of sequences decoded together, one token per row per step, that gains and loses rows
between steps (continuous batching) — the engine's core.

Design choices:
- Rows are left-aligned in one KV cache: a row that joins is prefilled on its own (with the other
  newcomers, as one padded batch) and padded on the left to the batch's length, or the batch to its;
  the cache's mask keeps which positions are real, and the model's padding rule (`PoEGPT.padding`)
  gives each row its own rotary positions and hides every other row's padding. So a row computes what
  it computes alone (to float rounding), whatever else is in the batch, and joins or leaves at any
  step.
- Every row keeps its own sampling parameters, budget, stop ids and generator (seeded from its own
  params): a row's tokens do not depend on its batch-mates.
- A row that finishes (a stop token, its budget, or the context limit) leaves the batch before the
  next forward, so finished rows cost nothing; positions that are padding in every row are dropped.
- The last sampled token of a row is never fed: once a row ends its logits would be thrown away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.model import KVCache
from .sampling import SamplingParams, sample_next


@dataclass
class Row:
    """One sequence of a batch: its request, what it produced, and whether it has finished."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    seen: list[int]  # prompt + output: for the repetition penalty
    tokens: list[int] = field(default_factory=list)
    done: bool = False


class Batch:
    """The rows being decoded (see the module docstring). `add` queues a row; `step` prefills what was
    queued, picks one token for every row, and returns [(row, token)]; finished rows leave."""

    def __init__(self, model: torch.nn.Module, *, output: str, exit_stage: int | None = None):
        self.model, self.output, self.exit_stage = model, output, exit_stage
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []  # in cache order
        self.queued: list[Row] = []
        self.cache = KVCache()
        self.logits: torch.Tensor | None = None  # (len(rows), V): each row's next-token scores

    def __len__(self) -> int:
        return len(self.rows) + len(self.queued)

    def add(self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int]) -> Row:
        """Queue a checked request (decoder.check_request); it joins at the next step."""
        generator = (torch.Generator(device=self.device).manual_seed(params.seed) if params.temperature > 0
                     else None)
        row = Row(list(prompt), params, stop_ids, generator, list(prompt))
        self.queued.append(row)
        return row

    def _forward(self, ids: torch.Tensor, cache: KVCache, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(ids, cache=cache, exit_stage=self.exit_stage, output=self.output, attention_mask=mask)
            return out.logits[:, -1].float()

    def _admit(self) -> None:
        """Prefill the queued rows as one left-padded batch and merge them into the running one."""
        rows, self.queued = self.queued, []
        T = max(len(r.prompt) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(rows), T, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            ids[i, T - len(r.prompt):] = torch.tensor(r.prompt, device=self.device)
            mask[i, T - len(r.prompt):] = True
        cache = KVCache()
        logits = self._forward(ids, cache, mask)
        self.cache.extend(cache)
        self.rows += rows
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    def step(self) -> list[tuple[Row, int]]:
        """One token for every row; rows that finish leave the batch."""
        if self.queued:
            self._admit()
        if not self.rows:
            return []
        limit = self.model.config.sequence_len
        emitted, keep, feed = [], [], []
        with torch.inference_mode():
            greedy = self.logits.argmax(dim=-1).tolist()  # every plain-greedy row at once
            for i, r in enumerate(self.rows):
                if r.params.temperature == 0 and r.params.repetition_penalty == 1:
                    token = greedy[i]
                else:
                    seen = torch.tensor(r.seen, device=self.device) if r.params.repetition_penalty != 1 else None
                    token = sample_next(self.logits[i], seen, r.params, r.generator)
                r.tokens.append(token)
                emitted.append((r, token))
                r.done = (token in r.stop_ids or len(r.tokens) >= r.params.max_new_tokens
                          or len(r.prompt) + len(r.tokens) >= limit)
                if not r.done:
                    keep.append(i)
                    feed.append(token)
                    r.seen.append(token)
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.rows = [self.rows[i] for i in keep]
            if self.rows:
                self.cache.select(index)
            else:
                self.cache, self.logits = KVCache(), None
        if self.rows:
            step = torch.tensor(feed, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
            mask = None if self.cache.attention_mask is None else torch.ones_like(step, dtype=torch.bool)
            self.logits = self._forward(step, self.cache, mask)
        return emitted
