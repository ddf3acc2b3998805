"""The generation engine: KV-cached decoding of one prompt or of a batch, greedy or seeded sampling.

Design choices:
- Every call decodes through a `Batch` (batch.py): one prompt is a batch of one, so a prompt decoded
  alone and the same prompt decoded among others run the same code, and a row's output does not
  depend on its batch-mates (tested: batch == each row alone, greedy and seeded sampling).
- Prefill the prompts in one forward into a fresh `KVCache`, then one forward of one token per row
  per step; the model's contract is that chunked feeding equals one uncached forward (tested: engine
  greedy == uncached argmax).
- Generation of a row ends after a stop token, at its `max_new_tokens`, or when its prompt + output
  reaches `config.sequence_len` (rotary and windows are only trained that far).
- `exit_stage=k` decodes stage k's predictor (prefix pruning): the layers after stage k never run.
- Every forward runs under its own `torch.inference_mode()`: holding one across `yield`s would leak
  inference mode into the caller's code between tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.model import KVCache
from .batch import Batch
from .decoder import Decoder, check_request
from .fleet import Fleet


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
        """One row's next-token scores after feeding `ids` (1, T) into `cache`: (V,)."""
        with torch.inference_mode():
            return self.model(ids, cache=cache, exit_stage=self.exit_stage, output=self.output).logits[0, -1].float()

    def batch(self) -> Batch:
        """An empty batch decoding with this engine's model, predictor and exit stage (a fleet of one)."""
        fleet = Fleet([self.model])
        return Batch(fleet, fleet.route(self.model, self.exit_stage, self.output))
