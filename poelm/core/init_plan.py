"""How every tensor of the PoE GPT starts (docs/model.md §1 table), written once as a plan: a list of
(name, fill) in the order the one seeded generator is drawn from. `PoEGPT.init_weights` fills a
model's parameters by it; `poelm init` fills one tensor at a time by it and writes each as it goes
(models/directory.py), so the two give the same bytes without the second ever holding the model.

Imports only torch: it ships beside model.py as remote code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn as nn


if TYPE_CHECKING:
    from .config import PoEConfig

Fill = Callable[[torch.Tensor, torch.Generator], None]  # fills a tensor in place, drawing from the generator


def _normal(std: float) -> Fill:
    return lambda t, g: nn.init.normal_(t, 0.0, std, generator=g)


def _uniform(low: float, high: float) -> Fill:
    return lambda t, g: nn.init.uniform_(t, low, high, generator=g)


def _constant(value: float) -> Fill:
    return lambda t, g: nn.init.constant_(t, value)


def _ramp(first: float, step: float, n: int) -> Fill:
    """Element i: first - step * i / n (the lambdas' schedule over depth)."""
    def fill(t: torch.Tensor, g: torch.Generator) -> None:
        for i in range(t.numel()):
            t[i] = first - step * i / n
    return fill


def block_plan(config: "PoEConfig", has_ve: bool) -> list[tuple[str, Fill]]:
    """One block's tensors (names within `transformer.h.{i}.`), in draw order: the projections into
    attention and the MLP uniform with the std of N(0, 1/d), the projections out zero (a new block is
    the identity)."""
    s = 3**0.5 * config.n_embd**-0.5  # uniform bound with the std of N(0, 1/d)
    plan = [(f"attn.{name}.weight", _uniform(-s, s)) for name in ("c_q", "c_k", "c_v")]
    plan += [("attn.c_proj.weight", _constant(0.0)), ("mlp.c_fc.weight", _uniform(-0.4 * s, 0.4 * s)),
             ("mlp.c_proj.weight", _constant(0.0))]
    if has_ve:
        plan.append(("attn.ve_gate.weight", _uniform(0.0, 0.02)))
    return plan


def init_plan(config: "PoEConfig") -> Iterator[tuple[str, Fill]]:
    """Every tensor of `PoEGPT(config).state_dict()` with its fill, in the order they draw from the one
    generator (the order fixes the values: keep it)."""
    c = config
    ve_layers = sorted(c.value_embed_layers)
    yield "transformer.wte.weight", _normal(0.8)
    yield "lm_head.weight", _normal(0.001)
    for i in range(c.n_layer):
        for name, fill in block_plan(c, i in ve_layers):
            yield f"transformer.h.{i}.{name}", fill
    s = 3**0.5 * c.n_embd**-0.5
    for i in ve_layers:
        yield f"value_embeds.{i}.weight", _uniform(-s, s)
    n = max(c.n_layer - 1, 1)
    yield "resid_lambdas", _ramp(1.15, 0.10, n)
    yield "x0_lambdas", _ramp(0.20, 0.15, n)
    if c.smear:
        yield "smear_gate.weight", _uniform(0.0, 0.02)
        yield "smear_lambda", _constant(0.0)
    if c.backout:
        yield "backout_lambda", _constant(0.2)
    zero = _constant(0.0)  # the additive heads start at zero
    if c.poe_stage_heads:
        for k in range(c.n_stages):
            yield f"stage_heads.{k}.weight", zero
    if c.head_fold:
        yield "ancestors_head.weight", zero
    if c.stage_head:
        yield "specialist_head.weight", zero
