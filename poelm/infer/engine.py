"""The generation engine: KV-cached decoding of one prompt or of a batch, greedy or seeded sampling, at
full depth or stopping after an exit stage (prefix pruning). Every call decodes through a `Batch`, so a
prompt alone and among others run the same code; every forward runs under its own inference mode, never
held across a `yield` (docs/inference.md §3).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core.kvcache import KVCache
from .batch import Batch
from .decoder import Decoder
from .fleet import Fleet
from .sampling import SamplingParams


class Engine(Decoder):
    """KV-cached generation for one `PoEGPT`, at full depth or stopping after `exit_stage`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any | None = None, *, stop_ids: set[int] | None = None,
                 output: str | None = None, exit_stage: int | None = None):
        super().__init__(model, tokenizer, stop_ids=stop_ids, output=output)
        self.config.last_stage(exit_stage)  # the stage, before any prompt
        self.exit_stage = exit_stage
        self.name = "engine" if exit_stage is None else f"engine, exit stage {exit_stage}"

    @classmethod
    def from_mode(cls, model, mode, *, tokenizer=None, stop_ids=None, model_dir=None) -> "Engine":
        return cls(model, tokenizer, stop_ids=stop_ids, output=mode.output, exit_stage=mode.exit_stage)

    def describe(self) -> str:
        s = self.last_stats
        return f"{self.name}; prompt {s.prompt_tokens} tokens" if s else self.name

    def scores(self, prompt_ids: Sequence[int], tokens: Sequence[int] = ()) -> torch.Tensor:
        """The scores (V,) float32 of the token after `prompt_ids + tokens`, for one sequence fed as
        generation feeds it: the prompt in one forward, then one token per forward."""
        cache, device = KVCache(), self.device
        with torch.inference_mode():
            for ids in [list(prompt_ids)] + [[t] for t in tokens]:
                out = self.model(torch.tensor([ids], device=device), cache=cache, exit_stage=self.exit_stage,
                                 output=self.output)
        return out.logits[0, -1].float()

    def batch(self) -> Batch:
        """An empty batch decoding with this engine's model, predictor and exit stage (a fleet of one)."""
        fleet = Fleet([self.model])
        return Batch(fleet, fleet.route(self.model, self.exit_stage, self.output))


def greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, stop_ids=frozenset(),
           **engine) -> list[int]:
    """The engine's greedy continuation of `prompt_ids` (a final stop token included), the model in eval
    mode for the call and its mode restored after: a training run's logged sample. `engine`: the
    Engine's options (`output`, `exit_stage`)."""
    was_training = model.training
    model.eval()
    try:
        engine = Engine(model, stop_ids=set(stop_ids), **engine)
        return engine.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens))
    finally:
        model.train(was_training)
