"""Decoding modes: one spec of how to decode, one rule of which options combine, one factory.

Design choices:
- A `DecodeMode` names a decoder and its settings: the engine at full depth or stopping after an exit
  stage (prefix pruning), self-speculative decoding (K drafts per round from a draft stage), adaptive
  depth, or a composition with sibling stages; plus the predictor (`output`: the last stage or the
  Log-OP; default the model's `poe_output`). The command line, the demo, the benchmarks and (next)
  the server build decoders only through `make_decoder(model, mode, ...)`.
- `check` holds the rules in one place: which options go together, and (through the decoder class's
  own `check_params`) which sampling settings the chosen decoder takes; it needs no model, so a
  command fails on bad flags before loading one. The stage numbers are checked against the model
  when the decoder is built.
- Adaptive depth reads its bounds from `adaptive.json` beside the model (`poelm calibrate`), and a
  composition loads its sibling directories; both need `model_dir`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core.errors import PoelmError
from ..common.options import option
from .adaptive import AdaptiveDecoder, load_calibration
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
    """The decoder `mode` names, for `model` (loaded from `model_dir` when adaptive or composed)."""
    mode.check()
    if mode.speculative is not None:
        return SpeculativeDecoder(model, mode.draft_stage, mode.speculative, stop_ids, output=mode.output,
                                  tokenizer=tokenizer)
    if mode.adaptive:
        if model_dir is None:
            raise PoelmError("adaptive depth reads its bounds beside the model: give its directory")
        bounds = load_calibration(model_dir, model.config.n_stages)
        return AdaptiveDecoder(model, bounds, stop_ids, tokenizer=tokenizer)
    if mode.compose:
        from .compose import Composition, ComposedDecoder

        if model_dir is None:
            raise PoelmError("a composition loads the model's siblings beside it: give the model's directory")
        weights = list(mode.compose_weights) if mode.compose_weights is not None else None
        comp = Composition([model_dir, *mode.compose], weights, device=next(model.parameters()).device,
                           output=mode.output)
        return ComposedDecoder(comp, tokenizer, stop_ids)
    return Engine(model, tokenizer, stop_ids=stop_ids, output=mode.output, exit_stage=mode.exit_stage)
