"""Stage-parallel pretraining: each process owns a contiguous run of PoE stages; activations flow
forward only (`poelm pretrain --stage-parallel P` under torchrun, world size P x D).

Design choices:
- Ranks: pipeline position p = rank % P (neighbours in the pipeline are neighbouring ranks, so they
  share a machine when torchrun places consecutive ranks together) and data replica r = rank // P.
  The P pipeline ranks of a replica read the same micro-batches (the loader is sharded over the D
  replicas only), so nothing but activations needs to travel between them.
- Stages are split by compute: each stage costs its layers (12 d^2 per token each) plus one head
  read-out (d V); the contiguous split minimising the largest share is chosen (`split_stages`).
- What flows: rank p sends rank p + 1 the residual stream after its last layer and, once the backout
  layer has run, the backout residual — both detached, as flat training detaches them anyway (a stage
  learns only from its own loss). Nothing goes backward. Each rank recomputes the embedding and x0
  from the token ids itself (cheap), so x0's gradient reaches the embedding on every rank.
- What is held: the full model is built and initialised from the run's seed on every rank (so every
  tensor starts as in one process), then the blocks, value embeddings and per-stage heads of stages
  a rank does not own are dropped. The embedding, the shared head and the scalars (lambdas, smear,
  backout) are held by every rank and stay identical: their gradients are summed over the world (each
  rank holds its stages' share of them) and every rank takes the same optimizer step. A rank's own
  tensors are summed over its D replicas only.
- Synchronous: a step's loss is normalised by the step's supervised tokens (as in the data-parallel
  loop), so the weights equal single-process flat training's on the same data (tested within 1e-5; the
  order of float sums differs). Micro-batches stream: rank p sends micro-batch m and goes on to m + 1
  while rank p + 1 works on m; the bubble is the P - 1 micro-batches the last rank waits at the start
  of a step. With `--stage-loss-fraction F < 1` each rank draws its stages' positions from its own
  RNG: unbiased, but not the positions one process would draw.
- The residual travels as float32 (float64 for a `--dtype float64` run, where the pipeline's weights
  equal one process's to 1e-5 in every element; see tests/test_stage_parallel.py).
- Evaluation runs the same pipeline: every rank scores its stages and passes on the running sum of
  their log-probabilities, from which the last rank scores the Log-OP; sums are reduced over the
  world. Checkpoints hold the full weights (gathered to rank 0) and each rank's own optimizer state,
  so `final/` and `best/` are ordinary model directories whatever P and D were.
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
import torch.nn.functional as F

from ..core.errors import PoelmError
from ..core.model import PoEGPT, Walk
from .dist import Dist, all_reduce_sum


def split_stages(config, P: int) -> list[tuple[int, int]]:
    """[first, last] stage of each of P ranks: contiguous, the largest compute share smallest."""
    K = config.n_stages
    if not 1 < P <= K:
        raise PoelmError(f"--stage-parallel {P}: this model has {K} stages; expected 2..{K} pipeline ranks")
    cost = [n * 12 * config.n_embd ** 2 + config.n_embd * config.vocab_size for n in config.poe_stage_layers]
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
    first, last = split_stages(config, P)[pipe]
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
        local = sum(count_fn(b[1]) for b in batches)
        (count,) = all_reduce_sum(pipe.d, [float(local)])
        count /= pipe.P  # every pipeline rank of a replica counted the same tokens
        if count == 0:
            raise PoelmError("a training step has no supervised tokens (every target is masked)")
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
                    hidden.append(model.stage_hidden(walk.x, k, model._backout(walk, k, True)))
                    stages.append(k)
                if not pipe.last:
                    pending += _send(model, pipe, walk)
                losses = model.fused_losses(hidden, stages, y, fraction=self.fraction, exact=K - 1)
            (sum(losses) / K ** (1.0 - alpha) / count).backward()
            for k, loss in zip(stages, losses):
                sums[k] += float(loss.detach())
        for _, handle in pending:
            handle.wait()
        self.reduce_gradients()
        reduced = all_reduce_sum(pipe.d, sums)
        return sum(reduced) / K ** (1.0 - alpha) / count, [v / count for v in reduced]

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
    """bpb_sums (eval/bpb.py) across the pipeline: each rank scores its stages; the running sum of the
    stages' log-probabilities travels forward and the last rank scores the Log-OP. Reduced over the world."""
    c = model.config
    K = c.n_stages
    names = [f"stage{k}" for k in range(K)] + ["logop"]
    nats, n_bytes = [0.0] * (K + 1), 0.0
    token_bytes = token_bytes.to(pipe.d.device)
    was_training = model.training
    model.eval()
    for x, y in batches:
        x, y = x.to(pipe.d.device), y.to(pipe.d.device)
        walk = model.begin(x)
        logp_sum = torch.zeros(*x.shape, c.vocab_size, dtype=torch.float32, device=x.device)
        if not pipe.first:
            walk = _receive(model, pipe, walk, logp_sum)
        keep = (torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0) > 0).reshape(-1)
        target = y.clamp(min=0).reshape(-1)
        for k, walk in _own_stages(model, pipe, walk):
            logits = model.readout(walk, k, detach_backout=True).float()
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target, reduction="none")
            nats[k] += float((nll * keep).sum())
            logp_sum += F.log_softmax(logits, dim=-1)
        if not pipe.last:
            for _, handle in _send(model, pipe, walk, logp_sum):
                handle.wait()
            continue
        score = F.log_softmax(logp_sum / K ** (1.0 - c.poe_alpha), dim=-1)
        nll = F.cross_entropy(score.reshape(-1, score.size(-1)), target, reduction="none")
        nats[K] += float((nll * keep).sum())
        n_bytes += float(torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0).sum())
    model.train(was_training)
    return names, all_reduce_sum(pipe.d, nats + [n_bytes])


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
        first, last = split_stages(c, pipe.P)[p]
        for name in sorted(owned_names(c, (first, last))):
            shape, dtype = shapes[name]
            buf = torch.empty(shape, dtype=dtype, device=pipe.d.device)
            dist.recv(buf, src=pipe.rank_of(p))
            full[name] = buf
    missing = set(shapes) - set(full)
    if missing:
        raise RuntimeError(f"gather_state: no tensor for {sorted(missing)[:3]}")
    return {n: full[n] for n in shapes}
