"""Stage-parallel pretraining: each process owns a contiguous run of PoE stages; activations flow
forward only (`poelm pretrain --stage-parallel P` under torchrun, world size P x D).
docs/training.md, "Stage parallelism", explains the ranks, what flows and what is held.

Design choices:
- Rank r is pipeline position r % P of data replica r // P; a replica's P ranks read the same
  micro-batches, so only activations travel between them.
- Ranks own stages split by compute (`rank_stages`, the FLOPs of flops.py).
- Flat training detaches the residual between stages anyway, so rank p sends p + 1 the residual (and
  the backout residual) detached and nothing flows backward; micro-batches stream through.
- Every rank builds the full model from the seed, then drops what it does not own (`strip`); the
  shared tensors (embedding, shared head, scalars) take gradients summed over the world, so one step
  equals one process's flat training (to float rounding; tests/test_stage_parallel.py).
- The loss (core's `combine_stage_losses`), the Log-OP (core's `logop_of_score`) and the bpb sums
  (eval/bpb.py) are their owners' functions, applied to the stages a rank holds.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..core.errors import PoelmError
from ..core.model import PoEGPT, Walk, combine_stage_losses, logop_of_score, logop_score
from ..eval.bpb import bpb_names, evaluating, scored_nats, target_bytes
from .dist import Dist, all_reduce_sum
from .flops import stage_flops
from .loop import step_tokens


def rank_stages(config, P: int) -> list[tuple[int, int]]:
    """[first, last] stage of each of P pipeline ranks: contiguous, the largest compute share smallest
    (not core.config.split_stages, which splits layers into stages)."""
    K = config.n_stages
    if not 1 < P <= K:
        raise PoelmError(f"--stage-parallel {P}: this model has {K} stages; expected 2..{K} pipeline ranks")
    cost = stage_flops(config)
    best = None
    for cuts in itertools.combinations(range(1, K), P - 1):
        bounds = (0, *cuts, K)
        share = max(sum(cost[a:b]) for a, b in zip(bounds, bounds[1:]))
        if best is None or share < best[0]:
            best = (share, bounds)
    bounds = best[1]
    return [(a, b - 1) for a, b in zip(bounds, bounds[1:])]


@dataclass
class Pipeline:
    """This rank's place: pipeline position and replica, its stages and layers, the process groups."""

    d: Dist
    P: int
    D: int
    pipe: int
    replica: int
    stages: tuple[int, int]  # [first, last] stage owned
    layers: tuple[int, int]  # [start, stop) layers owned
    data_group: object | None  # the D ranks holding the same stages (None when D == 1)

    @property
    def first(self) -> bool:
        return self.pipe == 0

    @property
    def last(self) -> bool:
        return self.pipe == self.P - 1

    def rank_of(self, pipe: int, replica: int | None = None) -> int:
        return (self.replica if replica is None else replica) * self.P + pipe


def make_pipeline(d: Dist, config, P: int) -> Pipeline:
    if d.world_size % P:
        raise PoelmError(f"--stage-parallel {P}: the world size {d.world_size} is not a multiple of it "
                         f"(torchrun --nproc_per_node x nodes = P x data-parallel replicas)")
    D = d.world_size // P
    pipe, replica = d.rank % P, d.rank // P
    first, last = rank_stages(config, P)[pipe]
    data_group = None
    if D > 1:  # every rank creates every group, in the same order
        for p in range(P):
            group = dist.new_group([r * P + p for r in range(D)])
            if p == pipe:
                data_group = group
    return Pipeline(d, P, D, pipe, replica, (first, last),
                    (config.stage_starts[first], config.stage_ends[last] + 1), data_group)


def owned_names(config, pipe: Pipeline | tuple[int, int]) -> set[str]:
    """The parameter names of the blocks, value embeddings and stage heads a rank owns."""
    first, last = pipe.stages if isinstance(pipe, Pipeline) else pipe
    start, stop = config.stage_starts[first], config.stage_ends[last] + 1
    names = set()
    for name in _all_names(config):
        parts = name.split(".")
        if parts[:2] == ["transformer", "h"] and start <= int(parts[2]) < stop:
            names.add(name)
        elif parts[0] == "value_embeds" and start <= int(parts[1]) < stop:
            names.add(name)
        elif parts[0] == "stage_heads" and first <= int(parts[1]) <= last:
            names.add(name)
    return names


def _all_names(config) -> list[str]:
    with torch.device("meta"):
        return [n for n, _ in PoEGPT(config).named_parameters()]


def strip(model: PoEGPT, pipe: Pipeline) -> None:
    """Drop what this rank does not own (blocks, value embeddings, stage heads of other stages)."""
    c = model.config
    start, stop = pipe.layers
    for i in range(c.n_layer):
        if not start <= i < stop:
            model.transformer.h[i] = nn.Module()  # an empty placeholder: the walk never reaches it
            if str(i) in model.value_embeds:
                del model.value_embeds[str(i)]
    if c.poe_stage_heads:
        for k in range(c.n_stages):
            if not pipe.stages[0] <= k <= pipe.stages[1]:
                del model.stage_heads[str(k)]


def shared_parameters(model: PoEGPT, pipe: Pipeline) -> list[torch.nn.Parameter]:
    own = owned_names(model.config, pipe)
    return [p for n, p in model.named_parameters() if n not in own]


# ---- the walk across ranks -------------------------------------------------------------------------
def _wire(x: torch.Tensor) -> torch.dtype:
    """The residual's dtype between ranks: float32 whatever the compute dtype (bf16 autocast), float64
    for a float64 model (its embedding, where every walk starts, has the model's dtype)."""
    return torch.promote_types(x.dtype, torch.float32)


def _receive(model: PoEGPT, pipe: Pipeline, walk: Walk, extra: torch.Tensor | None = None) -> Walk:
    """Continue `walk` (the embedding, recomputed here) from the previous rank's residual stream."""
    c = model.config
    x = torch.empty(walk.x.shape, dtype=_wire(walk.x), device=walk.x.device)
    dist.recv(x, src=pipe.rank_of(pipe.pipe - 1))
    backout = None
    if c.backout and c.backout_layer < pipe.layers[0]:
        backout = torch.empty_like(x)
        dist.recv(backout, src=pipe.rank_of(pipe.pipe - 1))
    if extra is not None:
        dist.recv(extra, src=pipe.rank_of(pipe.pipe - 1))
    return dataclasses.replace(walk, x=x, x_backout=backout, layer=pipe.layers[0])


def _send(model: PoEGPT, pipe: Pipeline, walk: Walk, extra: torch.Tensor | None = None) -> list:
    """Send the residual (and the backout residual once it exists) to the next rank, without waiting."""
    c = model.config
    out = [walk.x.detach().to(_wire(walk.x)).contiguous()]
    if c.backout and c.backout_layer < pipe.layers[1]:
        out.append(walk.x_backout.detach().to(_wire(walk.x)).contiguous())
    if extra is not None:
        out.append(extra.contiguous())
    return [(t, dist.isend(t, dst=pipe.rank_of(pipe.pipe + 1))) for t in out]


def _own_stages(model: PoEGPT, pipe: Pipeline, walk: Walk):
    """Run this rank's stages from `walk` with flat training's detach rules; yields (stage, walk after it)."""
    c = model.config
    for k in range(pipe.stages[0], pipe.stages[1] + 1):
        walk = model.run_layers(walk, c.stage_ends[k] + 1, detach_stages=True)
        yield k, walk


class PipelineStep:
    """One optimizer step's forward and backward passes over this rank's stages (the loop's stepper)."""

    def __init__(self, pipe: Pipeline, model: PoEGPT, stage_loss_fraction: float = 1.0, autocast=nullcontext):
        self.pipe, self.model, self.fraction, self.autocast = pipe, model, stage_loss_fraction, autocast
        self.shared = shared_parameters(model, pipe)
        shared_ids = {id(p) for p in self.shared}
        self.own = [p for p in model.parameters() if id(p) not in shared_ids]
        self.bubble_s = 0.0  # the time the step spent waiting for the previous rank (receives)

    def __call__(self, batches: list[tuple[torch.Tensor, ...]], count_fn) -> tuple[float, list[float]]:
        pipe, model, c = self.pipe, self.model, self.model.config
        count = step_tokens(pipe.d, batches, count_fn, copies=pipe.P)  # a replica's P ranks read the same rows
        K, alpha = c.n_stages, c.poe_alpha
        sums = [0.0] * K
        pending = []
        for batch in batches:
            x, y = (t.to(pipe.d.device) for t in batch[:2])
            with self.autocast():
                walk = model.begin(x)
                if not pipe.first:
                    t0 = time.perf_counter()
                    walk = _receive(model, pipe, walk)
                    self.bubble_s += time.perf_counter() - t0
                hidden, stages = [], []
                for k, walk in _own_stages(model, pipe, walk):
                    hidden.append(model.readout_hidden(walk, k, detach_backout=True))
                    stages.append(k)
                if not pipe.last:
                    pending += _send(model, pipe, walk)
                losses = model.fused_losses(hidden, stages, y, fraction=self.fraction, exact=K - 1)
            (combine_stage_losses(losses, alpha, K) / count).backward()  # this rank's share of the step's loss
            for k, loss in zip(stages, losses):
                sums[k] += float(loss.detach())
        for _, handle in pending:
            handle.wait()
        self.reduce_gradients()
        reduced = all_reduce_sum(pipe.d, sums)
        return combine_stage_losses(reduced, alpha, K) / count, [v / count for v in reduced]

    def reduce_gradients(self) -> None:
        """Shared tensors: summed over the world; this rank's own: summed over its replicas."""
        for p in self.shared:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        if self.pipe.data_group is not None:
            for p in self.own:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.pipe.data_group)


@torch.no_grad()
def pipeline_bpb_sums(model: PoEGPT, pipe: Pipeline, batches, token_bytes: torch.Tensor) -> tuple[list[str], list[float]]:
    """bpb_sums (eval/bpb.py) across the pipeline: each rank scores its stages; the Log-OP's running
    score (float32) travels forward and the last rank scores the Log-OP. Reduced over the world."""
    c = model.config
    K = c.n_stages
    nats, n_bytes = [0.0] * (K + 1), 0.0
    token_bytes = token_bytes.to(pipe.d.device)
    with evaluating(model):
        for x, y in batches:
            x, y = x.to(pipe.d.device), y.to(pipe.d.device)
            walk = model.begin(x)
            score = torch.zeros(*x.shape, c.vocab_size, dtype=torch.float32, device=x.device)
            if not pipe.first:
                walk = _receive(model, pipe, walk, score)
            nbytes = target_bytes(y, token_bytes)
            for k, walk in _own_stages(model, pipe, walk):
                logits = model.readout(walk, k, detach_backout=True).float()
                nats[k] += scored_nats(logits, y, nbytes)
                score += logop_score([logits])
            if not pipe.last:
                for _, handle in _send(model, pipe, walk, score):
                    handle.wait()
                continue
            nats[K] += scored_nats(logop_of_score(score, K, c.poe_alpha), y, nbytes)
            n_bytes += float(nbytes.sum())
    return bpb_names(K), all_reduce_sum(pipe.d, nats + [n_bytes])


def gather_state(model: PoEGPT, pipe: Pipeline) -> dict[str, torch.Tensor]:
    """The full model's state on rank 0 (replica 0's pipeline ranks send their own tensors in name
    order); {} on every other rank. Every rank calls it."""
    c = model.config
    if pipe.replica != 0:
        return {}
    state = model.state_dict()
    if not pipe.first:
        own = sorted(owned_names(c, pipe))
        for name in own:
            dist.send(state[name].detach().contiguous(), dst=pipe.rank_of(0))
        return {}
    dtype = model.lm_head.weight.dtype  # every parameter has the model's dtype
    with torch.device("meta"):
        shapes = {n: (t.shape, dtype) for n, t in PoEGPT(c).state_dict().items()}
    full = {n: t.detach().clone() for n, t in state.items()}
    for p in range(1, pipe.P):
        first, last = rank_stages(c, pipe.P)[p]
        for name in sorted(owned_names(c, (first, last))):
            shape, dtype = shapes[name]
            buf = torch.empty(shape, dtype=dtype, device=pipe.d.device)
            dist.recv(buf, src=pipe.rank_of(p))
            full[name] = buf
    missing = set(shapes) - set(full)
    if missing:
        raise RuntimeError(f"gather_state: no tensor for {sorted(missing)[:3]}")
    return {n: full[n] for n in shapes}
