"""Decoding modes: one spec of how to decode (`DecodeMode`), one rule of which options combine (`check`,
no model needed, so bad flags fail before a load), one dispatch (`decoder_class`) and one factory
(`make_decoder`, through the class's `from_mode`) (docs/inference.md §1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core.errors import PoelmError
from ..common.options import option
from .adaptive import AdaptiveDecoder
from .decoder import Decoder, check_output_name
from .engine import Engine
from .sampling import SamplingParams
from .speculative import SpeculativeDecoder


@dataclass(frozen=True)
class DecodeMode:
    """How to decode (see the module docstring). The default is the engine at full depth."""

    exit_stage: int | None = option(None, "stop after stage K and decode its predictor (default: the last)",
                                    metavar="K", resume=None)
    speculative: int | None = option(None, "self-speculative decoding: draft K tokens per round with --draft-stage",
                                     metavar="K", resume=None)
    draft_stage: int | None = option(None, "the stage that drafts (with --speculative)", metavar="S", resume=None)
    adaptive: bool = option(False, "per-token early exit of the Log-OP (bounds from `poelm calibrate`)", resume=None)
    compose: tuple[str, ...] = option((), "sibling stages of MODELDIR: decode from their log-space combination",
                                      metavar="STAGEDIR", resume=None)
    compose_weights: tuple[float, ...] | None = option(
        None, "one weight per stage, MODELDIR first (default: all 1)", metavar="W,W,...", resume=None,
        parse=lambda text: tuple(float(v) for v in text.split(",")))
    output: str | None = option(None, "decode the last stage or the Log-OP of the stages (default: the model's "
                                "poe_output; --adaptive always decodes the Log-OP)", flag="--poe-output",
                                choices=("last", "logop"), resume=None)

    @property
    def decoder_class(self) -> type[Decoder]:
        """The one dispatch from a mode to its decoder: `make_decoder` builds this class (`from_mode`)."""
        if self.speculative is not None:
            return SpeculativeDecoder
        if self.adaptive:
            return AdaptiveDecoder
        if self.compose:
            from .compose import ComposedDecoder

            return ComposedDecoder
        return Engine

    @property
    def batches(self) -> bool:
        """Whether this mode's decoder decodes batches (`Decoder.batch`): all but compositions."""
        return self.decoder_class.batch is not Decoder.batch

    def check(self, params: SamplingParams | None = None) -> None:
        """Raise PoelmError (naming the flags) unless these options and sampling settings combine."""
        check_output_name(self.output)
        if sum([self.speculative is not None, self.adaptive, bool(self.compose)]) > 1:
            raise PoelmError("choose one of --speculative, --adaptive and --compose")
        if self.draft_stage is not None and self.speculative is None:
            raise PoelmError("--draft-stage goes with --speculative K")
        if self.speculative is not None and self.draft_stage is None:
            raise PoelmError("--speculative K needs --draft-stage S")
        if self.exit_stage is not None and self.decoder_class is not Engine:
            raise PoelmError("--exit-stage decodes one stage's predictor with the engine: drop --speculative, "
                             "--adaptive or --compose")
        if self.adaptive and self.output == "last":
            raise PoelmError("--adaptive decodes the Log-OP: drop --poe-output last")
        if self.compose_weights is not None and not self.compose:
            raise PoelmError("--compose-weights goes with --compose STAGEDIR ...")
        if params is not None:
            self.decoder_class.check_params(params)


def make_decoder(model: torch.nn.Module, mode: DecodeMode = DecodeMode(), *, tokenizer=None,
                 stop_ids: set[int] | None = None, model_dir: str | os.PathLike | None = None) -> Decoder:
    """The decoder `mode` names, for `model` (adaptive depth and compositions read `model_dir`)."""
    mode.check()
    return mode.decoder_class.from_mode(model, mode, tokenizer=tokenizer, stop_ids=stop_ids, model_dir=model_dir)
