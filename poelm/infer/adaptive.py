"""Adaptive depth: per token, run stages in order and stop as soon as the later stages cannot change
the top token of the Log-OP (WAND-style early exit), with bounds calibrated once per model.

Design choices:
- The decoded predictor is the Log-OP of all stages (score = sum_k log p_k; the 1/K**(1-alpha)
  factor does not move the argmax). After stage k the running score's top-1 margin is compared with
  the sum of the remaining stages' bounds B_j: stage j can lower the top token's lead over any other
  by at most max_y (log p_j(y) - log p_j(top)), and B_j is a high percentile of that on calibration
  text (`poelm calibrate`, stored as `adaptive.json` beside the model). With infinite bounds nothing
  exits and the output is full-depth Log-OP decoding (tested); with calibrated bounds, agreement is
  measured, not assumed.
- Layers a token skipped still get their keys and values, deferred: the skipped token keeps its
  residual state, and the next token that goes deeper first carries every pending token through each
  layer it needs, in one block with itself (the same computation the full model would have done, in
  a block). So later tokens always attend to exact keys; skipping saves work only until a deeper
  token comes, and the exit histogram says how much.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import PoelmError
from ..model import KVCache, PoEGPT, rotary_tables

CALIBRATION = "adaptive.json"


@torch.no_grad()
def calibrate(model: PoEGPT, batches, percentile: float = 99.9) -> list[float]:
    """Per stage j >= 1: the `percentile` of max_y (log p_j(y) - log p_j(top)) over calibration
    positions, where top is the running Log-OP's top token before stage j. Stage 0's bound is 0."""
    K = model.config.n_stages
    moves: list[list[torch.Tensor]] = [[] for _ in range(K)]
    for x, *_ in batches:
        logps = [F.log_softmax(l.float(), -1) for l in model(x, return_stages=True).stage_logits]
        running = logps[0]
        for j in range(1, K):
            top = running.argmax(-1, keepdim=True)
            moves[j].append((logps[j].max(-1).values - logps[j].gather(-1, top).squeeze(-1)).flatten())
            running = running + logps[j]
    bounds = [0.0]
    for j in range(1, K):
        values = torch.cat(moves[j])
        bounds.append(float(torch.quantile(values, percentile / 100.0)) if len(values) else math.inf)
    return bounds


def save_calibration(directory: str | os.PathLike, bounds: list[float], percentile: float, tokens: int) -> Path:
    path = Path(directory) / CALIBRATION
    tmp = path.with_name(f".{CALIBRATION}.tmp")
    tmp.write_text(json.dumps({"bounds": bounds, "percentile": percentile, "tokens": tokens}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_calibration(directory: str | os.PathLike, n_stages: int) -> list[float]:
    path = Path(directory) / CALIBRATION
    if not path.is_file():
        raise PoelmError(f"{path}: missing; run `poelm calibrate {directory} --data ...` first")
    try:
        bounds = json.loads(path.read_text())["bounds"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise PoelmError(f"{path}: expected a JSON object with 'bounds'") from None
    if len(bounds) != n_stages:
        raise PoelmError(f"{path}: {len(bounds)} bounds for a model of {n_stages} stages")
    return [float(b) for b in bounds]


@dataclass
class AdaptiveStats:
    exits: list[int] = field(default_factory=list)  # per stage: tokens that stopped there

    def histogram(self) -> dict[int, int]:
        return {k: n for k, n in enumerate(self.exits)}


class AdaptiveDecoder:
    """Greedy adaptive-depth decoding of the Log-OP predictor with per-stage bounds."""

    def __init__(self, model: PoEGPT, bounds: list[float], stop_ids: set[int] | None = None):
        if len(bounds) != model.config.n_stages:
            raise PoelmError(f"{len(bounds)} bounds for a model of {model.config.n_stages} stages")
        self.model, self.bounds = model, bounds
        self.remaining = [sum(bounds[k + 1:]) for k in range(len(bounds))]  # what stages after k can move
        self.stop_ids = stop_ids or set()
        self.stats = AdaptiveStats(exits=[0] * model.config.n_stages)

    def _step(self, token: int, cache: KVCache, pending: list[dict]) -> int:
        """Decode one position; tokens that exit early join `pending` for a deferred fill."""
        m, c = self.model, self.model.config
        device = m.lm_head.weight.device
        idx = torch.tensor([[token]], device=device)
        x = m.embed(idx, cache)
        me = {"idx": idx, "x": x, "x0": x, "x_backout": None}
        score = None
        ends = {end: k for k, end in enumerate(c.stage_ends)}
        for i in range(c.n_layer):
            block = [p for p in pending if p["done"] == i - 1] + [me]  # pending tokens needing layer i
            start = cache.get_seq_length(i)
            cos, sin = rotary_tables(start, len(block), c.head_dim, c.rope_base, x.device, x.dtype)
            cat = lambda key: torch.cat([b[key] for b in block], dim=1)  # noqa: E731
            out = m.layer(i, cat("x"), cat("x0"), cat("idx"), cos, sin, cache)
            for j, b in enumerate(block):
                b["x"] = out[:, j:j + 1]
                if i == c.backout_layer:
                    b["x_backout"] = b["x"]
                b["done"] = i
            pending[:] = [p for p in pending if p["done"] < c.n_layer - 1]
            k = ends.get(i)
            if k is None:
                continue
            logp = F.log_softmax(m.stage_logits(me["x"], k, me["x_backout"])[0, -1], -1)
            score = logp if score is None else score + logp
            top2 = score.topk(2).values
            if float(top2[0] - top2[1]) > self.remaining[k] or k == c.n_stages - 1:
                self.stats.exits[k] += 1
                if i < c.n_layer - 1:
                    pending.append(me)  # its deeper layers are filled when a later token goes deeper
                return int(score.argmax())
        raise AssertionError("unreachable: the last stage always exits")

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        return list(self.stream(prompt_ids, max_new_tokens))

    def stream(self, prompt_ids: list[int], max_new_tokens: int):
        """Yield each token as it is decided."""
        c = self.model.config
        if not prompt_ids or len(prompt_ids) >= c.sequence_len:
            raise PoelmError(f"the prompt must hold 1..{c.sequence_len - 1} tokens, got {len(prompt_ids)}")
        return self._stream(prompt_ids, max_new_tokens)

    def _stream(self, prompt_ids: list[int], max_new_tokens: int):
        m, c = self.model, self.model.config
        cache, pending = KVCache(), []
        device = m.lm_head.weight.device
        with torch.no_grad():
            token = int(m(torch.tensor([prompt_ids], device=device), cache=cache, output="logop").logits[0, -1].argmax())
        produced = 1
        yield token
        while produced < max_new_tokens and token not in self.stop_ids and len(prompt_ids) + produced < c.sequence_len:
            with torch.no_grad():
                token = self._step(token, cache, pending)
            produced += 1
            yield token
