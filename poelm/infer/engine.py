"""The generation engine: KV-cached decoding of one prompt, greedy or seeded sampling.

Design choices:
- One sequence at a time (batch 1), following the decoder protocol (decoder.py); the cached path
  stays obviously equal to the plain loop (tested: engine greedy == uncached argmax).
- Prefill the whole prompt in one forward into a fresh `KVCache`, then one forward of one token per
  new token; the model's contract is that chunked feeding equals one uncached forward.
- The last sampled token is never fed back: once generation ends its logits would be thrown away.
- Generation ends after a stop token, at `max_new_tokens`, or when prompt + generated reaches
  `config.sequence_len` (rotary and windows are only trained that far).
- `exit_stage=k` decodes stage k's predictor (prefix pruning): the layers after stage k never run.
- Every forward runs under its own `torch.inference_mode()`: holding one across `yield`s would leak
  inference mode into the caller's code between tokens.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ..core.model import KVCache
from .decoder import Decoder, check_request
from .sampling import SamplingParams, sample_next


class Engine(Decoder):
    """KV-cached generation for one `PoEGPT`, at full depth or stopping after `exit_stage`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any | None = None, *, stop_ids: set[int] | None = None,
                 output: str | None = None, exit_stage: int | None = None):
        super().__init__(model, tokenizer, stop_ids=stop_ids, output=output)
        check_request(self.config, [0], 1, exit_stage)  # the stage, before any prompt
        self.exit_stage = exit_stage
        self.name = "engine" if exit_stage is None else f"engine, exit stage {exit_stage}"

    def describe(self) -> str:
        s = self.last_stats
        return f"{self.name}; prompt {s.prompt_tokens} tokens" if s else self.name

    def _logits(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(ids, cache=cache, exit_stage=self.exit_stage, output=self.output).logits[0, -1].float()

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        generator = self._generator(params)
        seen = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)  # (T,): for the repetition penalty
        cache = KVCache()
        logits = self._logits(seen[None], cache)  # prefill, (V,)
        n = 0
        while True:
            with torch.inference_mode():
                token = sample_next(logits, seen, params, generator)
            n += 1
            yield token
            if token in self.stop_ids or n >= params.max_new_tokens or len(prompt_ids) + n >= self.config.sequence_len:
                return
            step = torch.tensor([[token]], dtype=torch.long, device=self.device)  # (1, 1)
            seen = torch.cat([seen, step[0]])
            logits = self._logits(step, cache)
