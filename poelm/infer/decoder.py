"""What every decoder is: one protocol (`stream`/`generate`/`generate_batch`), one request check, one
way to count what was produced. Every decoder decodes the predictor its `output` names, so each mode
produces what the engine produces for that request; requests are checked before the first token
(docs/inference.md §1).
"""

from __future__ import annotations

import time
from abc import ABC
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..core.config import POE_OUTPUTS
from ..core.errors import PoelmError
from .batch import RowBatch
from .sampling import SamplingParams


@dataclass
class GenerationStats:
    """What the last `stream`/`generate` call did; `seconds` covers prefill and decoding."""

    prompt_tokens: int
    generated_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def check_request(config: Any, prompt_ids: list[int], max_new_tokens: int, exit_stage: int | None = None) -> None:
    """Raise PoelmError unless a decoder can serve this request on a model with `config` (a PoEConfig)."""
    config.last_stage(exit_stage)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PoelmError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
    if not prompt_ids:
        raise PoelmError("prompt: no tokens; expected at least one (e.g. <|bos|>)")
    bad = [i for i in prompt_ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < config.vocab_size]
    if bad:
        raise PoelmError(f"prompt: token ids {bad[:5]} are not in [0, {config.vocab_size})")
    if len(prompt_ids) >= config.sequence_len:
        raise PoelmError(f"prompt: {len(prompt_ids)} tokens leave no room to generate within the model's "
                         f"sequence_len {config.sequence_len}")


def check_output_name(output: str | None) -> None:
    if output is not None and output not in POE_OUTPUTS:
        raise PoelmError(f"output={output!r}: expected one of {', '.join(POE_OUTPUTS)}")


class Decoder(ABC):
    """The decoding protocol (see the module docstring); each decoder implements `_stream`."""

    name = "decoder"
    exit_stage: int | None = None  # the engine's prefix pruning; every other decoder runs all stages

    def __init__(self, model: torch.nn.Module, tokenizer: Any | None = None, *,
                 stop_ids: set[int] | None = None, output: str | None = None):
        check_output_name(output)
        self.model, self.config = model, model.config
        self.output = output or model.config.poe_output
        if stop_ids is None:
            stop_ids = set() if tokenizer is None else {tokenizer.token_id("assistant_end"), tokenizer.bos_id}
        self.stop_ids: frozenset[int] = frozenset(int(i) for i in stop_ids)
        self.last_stats: GenerationStats | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_mode(cls, model: torch.nn.Module, mode: Any, *, tokenizer: Any | None = None,
                  stop_ids: set[int] | None = None, model_dir: Any | None = None) -> "Decoder":
        """This decoder as `mode` (a modes.DecodeMode) sets it up for `model`: what `make_decoder` calls."""
        raise NotImplementedError(f"{cls.__name__} is not built from a DecodeMode")

    @classmethod
    def check_params(cls, params: SamplingParams) -> None:
        """Raise PoelmError unless this decoder takes these sampling settings (all, by default)."""

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[int]:
        params = params or SamplingParams()
        prompt_ids = list(prompt_ids)
        self.check_params(params)
        check_request(self.config, prompt_ids, params.max_new_tokens, self.exit_stage)
        return self._counted(prompt_ids, params)

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> list[int]:
        """All of `stream`'s tokens as a list (a final stop token included)."""
        return list(self.stream(prompt_ids, params))

    def describe(self) -> str:
        return self.name

    def _counted(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        t0, n = time.perf_counter(), 0
        try:
            for token in self._stream(prompt_ids, params):
                n += 1
                yield token
        finally:
            self.last_stats = GenerationStats(len(prompt_ids), n, time.perf_counter() - t0)

    def batch(self) -> RowBatch:
        """An empty batch decoding like this decoder (rows added and removed between steps)."""
        raise PoelmError(f"{self.name} decodes one prompt at a time: no batches")

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """The tokens of one checked request: a batch of one (decoders without batches override it)."""
        batch = self.batch()
        row = batch.add(prompt_ids, params, self.stop_ids)
        while not row.done:
            for _, token in batch.step():
                yield token
        if row.error is not None:  # the batch ended this row: picking its token failed (a bug, not bad input)
            raise RuntimeError(f"decoding failed: {row.error}")

    def generate_batch(self, prompts: list[list[int]],
                       params: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        """Each prompt's tokens (what `generate` gives it alone), decoded as one batch; `params` is one
        for all rows or one per row. Every request is checked before the first forward."""
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise PoelmError(f"{len(params)} sampling settings for {len(prompts)} prompts")
        batch = self.batch()
        requests = [list(prompt) for prompt in prompts]
        for prompt, p in zip(requests, params):
            self.check_params(p)
            check_request(self.config, prompt, p.max_new_tokens, self.exit_stage)
        rows = [batch.add(prompt, p, self.stop_ids) for prompt, p in zip(requests, params)]
        t0 = time.perf_counter()
        while len(batch):
            batch.step()
        self.last_stats = GenerationStats(sum(map(len, requests)), sum(len(r.tokens) for r in rows),
                                          time.perf_counter() - t0)
        failed = [(i, r.error) for i, r in enumerate(rows) if r.error is not None]
        if failed:
            raise RuntimeError(f"decoding failed for prompt {failed[0][0]}: {failed[0][1]}")
        return [r.tokens for r in rows]

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        """The one source of randomness of a call, seeded from the params (None when greedy)."""
        return torch.Generator(device=self.device).manual_seed(params.seed) if params.temperature > 0 else None
