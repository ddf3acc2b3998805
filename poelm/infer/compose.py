"""Parallel composition: sibling specialist stages over shared passes of the trunk, combined as a
weighted Log-OP (the model's `logop_score`). Siblings with equal embedding tables share a trunk pass;
the result equals each sibling run alone (docs/inference.md §7).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.cascade import CONFIG
from ..core.files import read_json
from ..core.errors import PoelmError
from ..core.model import logop_score
from .decoder import Decoder, check_output_name
from .sampling import SamplingParams, sample_next
from .. import models


class Composition:
    """Sibling stages sharing trunk passes. `weights` default to 1 each."""

    def __init__(self, stage_dirs: list[str | os.PathLike], weights: list[float] | None = None,
                 device: str | torch.device = "cpu", output: str | None = None):
        if not stage_dirs:
            raise PoelmError("--compose needs at least one stage directory")
        self.weights = list(weights) if weights is not None else [1.0] * len(stage_dirs)
        if len(self.weights) != len(stage_dirs):
            raise PoelmError(f"{len(self.weights)} weights for {len(stage_dirs)} stages")
        check_output_name(output)
        for d in stage_dirs:
            if read_json(Path(d) / CONFIG).get("parent_fingerprint") is None:
                raise PoelmError(f"{Path(d) / CONFIG}: not a stage directory (no parent_fingerprint)")
        chains = [models.open(d) for d in stage_dirs]
        parents = [c.fingerprints[-2] for c in chains]  # computed in one scheme, whichever poelm recorded them
        if len(set(parents)) != 1:
            raise PoelmError(f"{stage_dirs[parents.index(parents[-1])]}: not a sibling of {stage_dirs[0]} "
                             "(their parents differ); composition needs stages on the same parent")
        self.models = [c.model(device) for c in chains]
        c = self.models[0].config
        self.output = output or c.poe_output
        self.trunk_layers = c.n_layer - c.poe_stage_layers[-1]  # the shared parent's layers
        self.trunk_stages = c.n_stages - 1
        # Group siblings by embedding table; `differing` holds the ids whose rows are not all equal.
        tables = [m.transformer.wte.weight for m in self.models]
        self.groups: list[list[int]] = []
        for i, table in enumerate(tables):
            group = next((g for g in self.groups if torch.equal(tables[g[0]], table)), None)
            if group is None:
                self.groups.append([i])
            else:
                group.append(i)
        rows = torch.zeros(tables[0].size(0), dtype=torch.bool, device=tables[0].device)
        for table in tables[1:]:
            rows |= (table != tables[0]).any(dim=1)
        self.differing = rows.nonzero().flatten()

    @torch.no_grad()
    def log_probs(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab) log-probabilities of the weighted Log-OP of the siblings' predictors."""
        shared = not bool(torch.isin(idx, self.differing).any())
        groups = [list(range(len(self.models)))] if shared else self.groups
        predictors, weights = [], []
        for group in groups:
            first = self.models[group[0]]
            c = first.config
            reads = first.readout_stages(c.n_stages - 1, self.output)  # the same for every sibling
            walk, trunk_logits = first.begin(idx), []
            for k in range(self.trunk_stages):  # the parent's stages: one pass for the group
                walk = first.run_layers(walk, c.stage_ends[k] + 1)
                if k in reads:
                    trunk_logits.append(first.readout(walk, k))
            for i in group:  # each sibling's own blocks and head on top
                model = self.models[i]
                own = model.run_layers(walk, model.config.n_layer)
                logits = trunk_logits + [model.readout(own, model.config.n_stages - 1)]
                predictors.append(model.predictor(logits, self.output))
                weights.append(self.weights[i])
        return F.log_softmax(logop_score(predictors, weights), dim=-1)


class ComposedDecoder(Decoder):
    """Decoding from a composition (the decoder protocol, infer/decoder.py): every step runs the trunk
    once per group and each sibling's own blocks, combines in log space, and picks with the engine's
    sampling rules. Uncached: the siblings' caches would have to share the trunk's."""

    def __init__(self, comp: Composition, tokenizer=None, stop_ids: set[int] | None = None):
        super().__init__(comp.models[0], tokenizer, stop_ids=stop_ids, output=comp.output)
        self.comp = comp
        self.name = f"{len(comp.models)} siblings over one trunk pass per token, weights {comp.weights}"

    @classmethod
    def from_mode(cls, model, mode, *, tokenizer=None, stop_ids=None, model_dir=None) -> "ComposedDecoder":
        """The model's directory and its sibling stages (`mode.compose`), weighted by `mode.compose_weights`."""
        if model_dir is None:
            raise PoelmError("a composition loads the model's siblings beside it: give the model's directory")
        weights = list(mode.compose_weights) if mode.compose_weights is not None else None
        comp = Composition([model_dir, *mode.compose], weights, device=next(model.parameters()).device,
                           output=mode.output)
        return cls(comp, tokenizer, stop_ids)

    def _stream(self, prompt_ids: list[int], params: SamplingParams):
        generator = self._generator(params)
        seq, produced = list(prompt_ids), 0
        while produced < params.max_new_tokens and len(seq) < self.config.sequence_len:
            with torch.no_grad():
                scores = self.comp.log_probs(torch.tensor([seq], device=self.device))[0, -1]
            token = sample_next(scores, torch.tensor(seq, device=self.device), params, generator)
            seq.append(token)
            produced += 1
            yield token
            if token in self.stop_ids:
                return
