"""Parallel composition: sibling specialist stages over one shared pass of the trunk, combined in
log space (the paper's composition of stages as a product of experts).

Design choices:
- Siblings are stages whose parents are the same model: every sibling's config records the same
  `parent_fingerprint`, and the parent's layers are run once; each sibling then runs only its own
  blocks and heads from that state.
- Combination is a weighted Log-OP: score = sum_i w_i log_softmax(logits_i), renormalised with
  logsumexp; with one sibling (any weight) it is exactly that sibling's distribution.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .cascade import CONFIG, read_json
from .errors import PoelmError
from .modeldir import load_model


class Composition:
    """Sibling stages sharing one trunk pass. `weights` default to 1 each."""

    def __init__(self, stage_dirs: list[str | os.PathLike], weights: list[float] | None = None,
                 device: str | torch.device = "cpu"):
        if not stage_dirs:
            raise PoelmError("--compose needs at least one stage directory")
        self.weights = list(weights) if weights is not None else [1.0] * len(stage_dirs)
        if len(self.weights) != len(stage_dirs):
            raise PoelmError(f"{len(self.weights)} weights for {len(stage_dirs)} stages")
        parents = []
        for d in stage_dirs:
            data = read_json(Path(d) / CONFIG)
            if data.get("parent_fingerprint") is None:
                raise PoelmError(f"{Path(d) / CONFIG}: not a stage directory (no parent_fingerprint)")
            parents.append(data["parent_fingerprint"])
        if len(set(parents)) != 1:
            raise PoelmError(f"{stage_dirs[parents.index(parents[-1])]}: not a sibling of {stage_dirs[0]} "
                             "(their parents differ); composition needs stages on the same parent")
        self.models = [load_model(d, device=device) for d in stage_dirs]
        c = self.models[0].config
        self.trunk_layers = c.n_layer - c.poe_stage_layers[-1]  # the shared parent's layers

    @torch.no_grad()
    def log_probs(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab) log-probabilities of the weighted Log-OP of the siblings."""
        state = self.models[0].trunk(idx, self.trunk_layers)
        score = None
        for w, model in zip(self.weights, self.models):
            part = w * F.log_softmax(model.continue_from(idx, state), dim=-1)
            score = part if score is None else score + part
        return F.log_softmax(score, dim=-1)


def generate_composed(comp: Composition, prompt_ids: list[int], params, stop_ids: set[int]) -> list[int]:
    return list(stream_composed(comp, prompt_ids, params, stop_ids))


def stream_composed(comp: Composition, prompt_ids: list[int], params, stop_ids: set[int]):
    """Decode from the composition, yielding each token: every step runs the shared trunk once and
    each sibling's own blocks, combines in log space, and picks with the engine's sampling rules (no
    KV cache: the siblings' caches would have to share the trunk's, which is left for later)."""
    from .infer.engine import sample_next

    device = comp.models[0].lm_head.weight.device
    g = torch.Generator(device=device).manual_seed(params.seed)
    seq, produced = list(prompt_ids), 0
    limit = comp.models[0].config.sequence_len
    while produced < params.max_new_tokens and len(seq) < limit:
        with torch.no_grad():
            scores = comp.log_probs(torch.tensor([seq], device=device))[0, -1]
        token = sample_next(scores, torch.tensor(seq, device=device), params, g)
        seq.append(token)
        produced += 1
        yield token
        if token in stop_ids:
            return
