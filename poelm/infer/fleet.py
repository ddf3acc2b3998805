"""Models decoded as one batch: rows of a base and of its specialists share one pass through every
layer their models have in common (the same tensors, lambdas and window: exact by construction) and
split only for the layers and heads that are their own. Rows stay sorted by route, so each layer runs
on contiguous slices; a row computes what its model computes alone (docs/inference.md §4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..core.errors import PoelmError
from ..core.model import PoEGPT, Walk
from .cache import BatchKVCache, CacheRows


def share_parameters(model: PoEGPT, held: dict[str, torch.Tensor]) -> int:
    """Point every parameter of `model` equal to one in `held` (same name, shape, dtype and values) at
    that tensor, and add the rest to `held`: models loaded one after another hold what they have in
    common once, and their rows then share those layers in a fleet's batch. An embedding table that
    differs from the held one in fewer than half its rows (a specialist's chat-token rows) is shared
    too, its own rows kept apart (`PoEGPT.share_embedding`). Returns the bytes no longer held. A parameter
    that is a view of the very memory the held one is (two models built around one mapped file) is
    shared without reading either."""
    shared = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            other = held.get(name)
            alike = other is not None and other.shape == p.shape and other.dtype == p.dtype
            same = alike and other.data_ptr() == p.data_ptr() and other.stride() == p.stride()
            if same or (alike and torch.equal(other, p.data)):
                p.data = other
                shared += p.numel() * p.element_size()
            elif alike and name == "transformer.wte.weight" and 2 * int((p.data != other).any(dim=1).sum()) < len(p):
                shared += model.share_embedding(other)
            else:
                held.setdefault(name, p.data)
    return shared


@dataclass(frozen=True, eq=False)  # one object per (model, stage, output) in a fleet: identity is equality
class Route:
    """How a row decodes: `model` up to stage `last`, decoding `output`; `path` the layer identities of
    layers 0..stage_ends[last] (small ints, interned per fleet), `readouts` the stages read out."""

    model: PoEGPT
    last: int
    output: str
    path: tuple[int, ...]
    readouts: tuple[int, ...]
    order: int  # creation order: ties between routes with one path sort by it

    @property
    def key(self) -> tuple:
        return self.path, self.order


def _layer_identity(model: PoEGPT, i: int) -> tuple:
    """What decides layer i's computation: its tensors (by storage), its lambdas and its window."""
    block = model.transformer.h[i]
    tensors = [p.data_ptr() for p in block.parameters()]
    if str(i) in model.value_embeds:
        tensors.append(model.value_embeds[str(i)].weight.data_ptr())
    return (tuple(tensors), float(model.resid_lambdas.detach()[i]), float(model.x0_lambdas.detach()[i]),
            model.config.layer_windows[i])


class Fleet:
    """Models whose rows decode in one batch (see the module docstring); the first is the trunk whose
    embedding smear, rotary settings and padding rule every row uses."""

    def __init__(self, models: list[PoEGPT]):
        if not models:
            raise PoelmError("a fleet needs at least one model")
        self.trunk = models[0]
        self.models: list[PoEGPT] = []
        self._layers: dict[tuple, int] = {}
        self._routes: dict[tuple[int, int, str], Route] = {}
        for model in models:
            self.join(model)

    @staticmethod
    def mismatch(a: PoEGPT, b: PoEGPT) -> str | None:
        """Why rows of `b` cannot ride in a batch whose trunk is `a` (None when they can): what `begin`
        and the cache read from a model besides its token table must be the same."""
        ca, cb = a.config, b.config
        for field in ("n_embd", "n_kv_head", "head_dim", "rope_base", "smear", "vocab_size", "sequence_len"):
            if getattr(ca, field) != getattr(cb, field):
                return f"config {field}: {getattr(ca, field)} vs {getattr(cb, field)}"
        if ca.smear and not (torch.equal(a.smear_gate.weight, b.smear_gate.weight)
                             and torch.equal(a.smear_lambda, b.smear_lambda)):
            return "different smear weights"
        return None

    def admits(self, model: PoEGPT) -> bool:
        return self.mismatch(self.trunk, model) is None

    def join(self, model: PoEGPT) -> None:
        """Add a model whose rows may join this fleet's batches (PoelmError if it cannot)."""
        if any(m is model for m in self.models):
            return
        why = self.mismatch(self.trunk, model)
        if why is not None:
            raise PoelmError(f"a model cannot share a batch with this fleet's trunk: {why}")
        self.models.append(model)

    def route(self, model: PoEGPT, exit_stage: int | None = None, output: str | None = None) -> Route:
        """The route of a row decoding `model` to `exit_stage` (default: its last stage) with `output`
        (default: the model's `poe_output`)."""
        index = next((i for i, m in enumerate(self.models) if m is model), None)
        if index is None:
            raise PoelmError("route: the model is not in this fleet (Fleet.join it first)")
        c = model.config
        last, output = c.last_stage(exit_stage), output or c.poe_output
        key = (index, last, output)
        if key not in self._routes:
            path = tuple(self._layers.setdefault(_layer_identity(model, i), len(self._layers))
                         for i in range(c.stage_ends[last] + 1))
            self._routes[key] = Route(model, last, output, path, tuple(model.readout_stages(last, output)),
                                      len(self._routes))
        return self._routes[key]

    # ------------------------------------------------------------------------------ the walk
    def forward(self, idx: torch.Tensor, cache: BatchKVCache, routes: list[Route],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed `idx` (B, T) into `cache`, row b along `routes[b]` (sorted by `Route.key`); returns each
        row's scores at its last position (B, V) float32: its route's predictor."""
        B, T = idx.shape
        if len(routes) != B or any(a.key > b.key for a, b in zip(routes, routes[1:])):
            raise ValueError(f"Fleet.forward: {len(routes)} routes for {B} rows, sorted by Route.key expected")
        start = cache.get_seq_length()
        spans = _runs(routes)
        tokens = None  # each row's token rows from its own model's table
        if any(r.model is not self.trunk for _, _, r in spans):
            tokens = torch.cat([r.model.token_embedding(idx[a:b]) for a, b, r in spans])
        walk = self.trunk.begin(idx, cache, attention_mask=attention_mask, tokens=tokens)
        depth = max(len(r.path) for r in routes)
        read: dict[int, list[torch.Tensor]] = {a: [] for a, _, _ in spans}
        ran: set[int] = set()
        for i in range(depth):
            groups = _runs([r.path[i] if i < len(r.path) else None for r in routes])
            walk = self._layer(walk, i, groups, routes, cache, B, start)
            ran.add(i)
            for a, b, r in spans:  # each route reads out the stages that end here
                for k in r.readouts:
                    if r.model.config.stage_ends[k] == i:
                        read[a].append(r.model.readout(walk.rows(a, b).part(T - 1, T), k))
        for i in [i for i in cache.keys if i not in ran]:
            cache.forget(i)
        scores = [r.model.predictor(read[a], r.output)[:, -1] for a, _, r in spans]
        return torch.cat(scores).float()

    @staticmethod
    def _layer(walk: Walk, i: int, groups: list, routes: list[Route], cache: BatchKVCache, B: int, start: int) -> Walk:
        """Layer i over every group of rows that runs it (a group: rows [a, b) running one layer);
        rows whose route has ended pass through unchanged."""
        if len(groups) == 1 and groups[0][2] is not None:  # every row runs the same layer: one call
            return routes[0].model.run_layers(walk, i + 1, cache)
        xs, backouts = [], []
        for a, b, layer in groups:
            part = walk.rows(a, b)
            if layer is not None:
                part = routes[a].model.run_layers(part, i + 1, CacheRows(cache, slice(a, b), B, start))
            xs.append(part.x)
            backouts.append(part.x_backout)
        if all(x is None for x in backouts):
            backout = None
        else:  # rows that have ended before the backout layer never read theirs
            backout = torch.cat([x if x is not None else torch.zeros_like(part) for x, part in zip(backouts, xs)])
        return dataclasses.replace(walk, x=torch.cat(xs), x_backout=backout, layer=i + 1)


def _runs(values: list) -> list[tuple[int, int, object]]:
    """Maximal runs of equal consecutive values: [(start, stop, value)]."""
    runs = []
    for i, v in enumerate(values):
        if runs and runs[-1][2] == v:  # Routes compare by identity
            runs[-1] = (runs[-1][0], i + 1, v)
        else:
            runs.append((i, i + 1, v))
    return runs
