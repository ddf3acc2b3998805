"""Adaptive depth: per token, run stages in order and stop as soon as the later stages cannot change
the top token of the Log-OP (calibrated per-stage bounds, `adaptive.json`); skipped layers' keys and
values are filled later, exactly, so later tokens attend to exact keys (docs/inference.md §6).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.files import read_json, read_manifest, update_manifest, write_json
from ..core.errors import PoelmError
from ..core.model import PoEGPT, Walk, logop_score
from .batch import Row, RowBatch
from .decoder import Decoder
from .sampling import SamplingParams

CALIBRATION = "adaptive.json"


@torch.no_grad()
def calibrate(model: PoEGPT, batches, percentile: float = 99.9) -> list[float]:
    """Per stage j >= 1: the `percentile` of max_y (log p_j(y) - log p_j(top)) over calibration
    positions, where top is the running Log-OP's top token before stage j. Stage 0's bound is 0."""
    K = model.config.n_stages
    moves: list[list[torch.Tensor]] = [[] for _ in range(K)]
    for x, *_ in batches:
        stage_logits = model(x, return_stages=True).stage_logits
        logps = [F.log_softmax(l.float(), -1) for l in stage_logits]
        for j in range(1, K):
            top = logop_score(stage_logits[:j]).argmax(-1, keepdim=True)  # the running Log-OP's top token
            moves[j].append((logps[j].max(-1).values - logps[j].gather(-1, top).squeeze(-1)).flatten())
    bounds = [0.0]
    for j in range(1, K):
        values = torch.cat(moves[j])
        bounds.append(float(torch.quantile(values, percentile / 100.0)) if len(values) else math.inf)
    return bounds


def save_calibration(directory: str | os.PathLike, bounds: list[float], percentile: float, tokens: int) -> Path:
    """Write `adaptive.json` beside the model (atomically) and record it in the directory's digests."""
    path = Path(directory) / CALIBRATION
    write_json(path, {"bounds": bounds, "percentile": percentile, "tokens": tokens})
    if read_manifest(directory) is not None:  # a directory without digests gets none for one file
        update_manifest(directory, [CALIBRATION])
    return path


def load_calibration(directory: str | os.PathLike, n_stages: int) -> list[float]:
    path = Path(directory) / CALIBRATION
    if not path.is_file():
        raise PoelmError(f"{path}: missing; run `poelm calibrate {directory} --data ...` first")
    bounds = read_json(path).get("bounds")  # checked against the directory's digests
    if not isinstance(bounds, list) or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                               and not math.isnan(b) and b >= 0 for b in bounds):
        raise PoelmError(f"{path}: expected 'bounds', a list of non-negative numbers (one per stage)")
    if len(bounds) != n_stages:
        raise PoelmError(f"{path}: {len(bounds)} bounds for a model of {n_stages} stages")
    return [float(b) for b in bounds]


@dataclass
class AdaptiveStats:
    exits: list[int] = field(default_factory=list)  # per stage: tokens that stopped there

    def histogram(self) -> dict[int, int]:
        return {k: n for k, n in enumerate(self.exits)}


class AdaptiveDecoder(Decoder):
    """Greedy adaptive-depth decoding of the Log-OP predictor with per-stage bounds."""

    name = "adaptive depth (Log-OP)"

    def __init__(self, model: PoEGPT, bounds: list[float], stop_ids: set[int] | None = None,
                 output: str | None = "logop", tokenizer=None):
        if output != "logop":
            raise PoelmError(f"adaptive depth decodes the Log-OP of the stages (output='logop'), not {output!r}")
        super().__init__(model, tokenizer, stop_ids=stop_ids, output=output)
        if len(bounds) != model.config.n_stages:
            raise PoelmError(f"{len(bounds)} bounds for a model of {model.config.n_stages} stages")
        self.bounds = bounds
        self.remaining = [sum(bounds[k + 1:]) for k in range(len(bounds))]  # what stages after k can move
        self.stats = AdaptiveStats(exits=[0] * model.config.n_stages)

    @classmethod
    def from_mode(cls, model, mode, *, tokenizer=None, stop_ids=None, model_dir=None) -> "AdaptiveDecoder":
        if model_dir is None:
            raise PoelmError("adaptive depth reads its bounds beside the model: give its directory")
        return cls(model, load_calibration(model_dir, model.config.n_stages), stop_ids, tokenizer=tokenizer)

    @classmethod
    def check_params(cls, params: SamplingParams) -> None:
        if params.temperature != 0 or params.top_k is not None or params.top_p is not None \
                or params.repetition_penalty != 1:
            raise PoelmError("adaptive depth decodes the Log-OP greedily: drop --temperature, --top-k, --top-p "
                             "and --repetition-penalty")

    def describe(self) -> str:
        return f"Log-OP, exits per stage {self.stats.histogram()}"

    def batch(self) -> "AdaptiveBatch":
        return AdaptiveBatch(self)


class AdaptiveBatch(RowBatch):
    """Rows decoded with adaptive depth together, each exiting at its own stage (so each decodes what it
    decodes alone); a step runs as deep as its deepest row, and its walk waits in `pending` only when
    every row exited early. Pending positions are filled (`_flush`) before rows join or leave."""

    def __init__(self, decoder: AdaptiveDecoder):
        super().__init__(decoder.model)
        self.decoder = decoder
        self.pending: list[Walk] = []  # positions (all rows, in order) whose deeper layers wait

    def step(self) -> list[tuple[Row, int]]:
        if self.queued:  # newcomers: prefill, first token; the running rows wait one step
            self._flush()
            return self._start(lambda scores, r: int(scores.argmax()), output="logop")
        if not self.rows:
            return []
        rows = self.rows
        with torch.inference_mode():
            tokens = self._step([r.tokens[-1] for r in rows])  # each row's last token: produced, not yet fed
        for r, token in zip(rows, tokens):
            r.emit(token, self.limit)
        self._keep([i for i, r in enumerate(rows) if not r.done])
        return list(zip(rows, tokens))

    def _keep(self, keep: list[int]) -> None:
        if len(keep) < len(self.rows):
            self._flush()
        super()._keep(keep)

    def _flush(self) -> None:
        """Carry every pending position through the layers it still lacks."""
        if self.pending:
            with torch.inference_mode():
                self._through(None, self.model.config.n_layer)

    def _through(self, me: Walk | None, stop: int) -> Walk | None:
        """Carry `me` (None: only the pending positions) through layers up to stop-1; at each layer the
        pending positions that still lack it (earlier positions, so they go first) run in one block
        with `me`."""
        m, pending = self.model, self.pending
        start = me.layer if me is not None else min(p.layer for p in pending)
        for i in range(start, stop):
            waiting = [j for j, p in enumerate(pending) if p.layer == i]
            group = [pending[j] for j in waiting] + ([me] if me is not None else [])
            if not group:
                continue
            block = m.run_layers(Walk.cat(group), i + 1, self.cache)
            for n, j in enumerate(waiting):
                pending[j] = block.part(n, n + 1)
            if me is not None:
                me = block.part(len(waiting), len(waiting) + 1)
        pending[:] = [p for p in pending if p.layer < m.config.n_layer]
        return me

    def _step(self, tokens: list[int]) -> list[int]:
        """Decode one position of every row; if all exit early, the walk joins `pending`."""
        d, m, c = self.decoder, self.model, self.model.config
        ids, mask = self._feed(tokens)
        me = m.begin(ids, self.cache, attention_mask=mask)
        chosen: list[int | None] = [None] * len(tokens)
        logits = []
        for k, end in enumerate(c.stage_ends):
            me = self._through(me, end + 1)
            logits.append(m.readout(me, k)[:, -1])  # (B, vocab)
            score = logop_score(logits)  # the running Log-OP: its argmax and margin, unscaled
            top2 = score.topk(2, dim=-1).values
            margins, best = (top2[:, 0] - top2[:, 1]).tolist(), score.argmax(dim=-1).tolist()
            for b, token in enumerate(chosen):
                if token is None and (margins[b] > d.remaining[k] or k == c.n_stages - 1):
                    chosen[b] = best[b]
                    d.stats.exits[k] += 1
            if all(token is not None for token in chosen):
                if me.layer < c.n_layer:
                    self.pending.append(me)  # its deeper layers are filled when a later step goes deeper
                return chosen
        raise AssertionError("unreachable: the last stage always exits")
