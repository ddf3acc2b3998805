"""Model FLOPs per token and MFU: the one place poelm counts FLOPs (docs/training.md, "FLOPs and MFU").

Design choices:
- Counted from the config, per token: 2 FLOPs per multiply-accumulate of a matmul weight, and
  4 * n_head * head_dim per attention key (scores and the weighted sum of values); embedding lookups,
  norms and lambdas are free (nanochat's `estimate_flops`, after PaLM appendix B).
- A training step multiplies a forward: the input's gradient doubles a matmul when autograd runs, a
  trained weight's gradient adds 2 per weight, attention triples with autograd (`train_cost`).
- One set of primitives (`layer_flops`, `embed_flops`, `readout_flops`) serves the training figure
  (`training_flops_per_token`), the pipeline's stage split (pipeline.py) and the decoding benchmarks
  (benchmarks/flops.py), so they count alike.
- MFU = achieved FLOP/s / (devices x the device's dense bf16 peak), from a table by CUDA device name.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

import torch

from ..core.config import SMEAR_CHANNELS, VE_GATE_CHANNELS

if TYPE_CHECKING:
    from ..core.config import PoEConfig
    from ..core.model import PoEGPT


# ------------------------------------------------------------------------- forward FLOPs per token
def layer_weights(c: "PoEConfig", layer: int) -> int:
    """The matmul weights of one layer: q, k, v (grouped-query) and output projections, the
    value-embedding gate where the layer has one, the MLP (d -> 4d -> d)."""
    d, q, kv = c.n_embd, c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    gate = VE_GATE_CHANNELS * c.n_kv_head if layer in c.value_embed_layers else 0
    return d * (q + 2 * kv) + q * d + gate + 2 * d * 4 * d


def attention_flops(c: "PoEConfig", keys: float) -> float:
    """One query attending to `keys` keys (already window-limited): q.k scores and the weighted sum of v."""
    return 2 * 2 * c.n_head * c.head_dim * keys


def layer_flops(c: "PoEConfig", layer: int, keys: float) -> float:
    """One token through layer `layer`, attending to `keys` keys."""
    return 2 * layer_weights(c, layer) + attention_flops(c, keys)


def embed_flops(c: "PoEConfig") -> float:
    """One token before layer 0: the smear gate (the embedding lookup itself is free)."""
    return 2 * SMEAR_CHANNELS if c.smear else 0


def n_heads(c: "PoEConfig", stage: int) -> int:
    """Heads stage `stage` reads out through (`PoEGPT.heads`)."""
    return (1 + bool(c.poe_stage_heads) + bool(c.head_fold and stage >= c.n_base_stages)
            + bool(c.stage_head and stage == c.n_stages - 1))


def readout_flops(c: "PoEConfig", stage: int, vocab: int | None = None, heads: int | None = None) -> float:
    """One token read out at stage `stage`: d x vocab (default: the padded vocabulary) per head, for
    `heads` heads (default: the stage's; training sums them into one weight first, HeadCrossEntropy)."""
    heads = n_heads(c, stage) if heads is None else heads
    return heads * 2 * c.n_embd * (c.padded_vocab_size if vocab is None else vocab)


def stage_flops(c: "PoEConfig") -> list[float]:
    """One token's forward through each stage, its read-out included (one summed head), at full context."""
    return [sum(layer_flops(c, i, min(c.layer_windows[i], c.sequence_len)) for i in range(a, b + 1))
            + readout_flops(c, k, heads=1) for k, (a, b) in enumerate(zip(c.stage_starts, c.stage_ends))]


# ---------------------------------------------------------------------------- a training step
def train_cost(forward: float, trained: float, autograd: bool) -> float:
    """A matmul's FLOPs in a training step from its forward FLOPs and its trained weights: with
    autograd, the input's gradient costs a forward again and each trained weight's gradient 2."""
    return forward * 2 + 2 * trained if autograd else forward


def training_flops_per_token(model: "PoEGPT", seq_len: int, *, readouts: Mapping[int, float],
                             frozen_layers: int = 0) -> float:
    """Model FLOPs per token of one training step: `readouts` {stage: share of the positions read out};
    `frozen_layers` n: the embedding and layers 0..n-1 run without autograd. Call it with the trainable
    parameters already chosen (`requires_grad`). Tokens are every position of the step (masked ones
    too), as `tok_per_s` counts them; the causal mask is not discounted (nanochat, PaLM)."""
    c = model.config

    def trained(*modules: torch.nn.Module) -> int:
        return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)

    flops = float(train_cost(embed_flops(c), trained(model.smear_gate), frozen_layers == 0)) if c.smear else 0.0
    for i, block in enumerate(model.transformer.h):
        autograd = i >= frozen_layers
        keys = min(c.layer_windows[i], seq_len)  # nanochat: min(window, T), the causal mask not discounted
        flops += (train_cost(2 * layer_weights(c, i), trained(block), autograd)
                  + (3 if autograd else 1) * attention_flops(c, keys))
    for stage, share in readouts.items():  # the stage's heads summed into one weight (HeadCrossEntropy)
        heads = model.heads(stage)
        weight = readout_flops(c, stage, heads=1) / 2
        trains = weight if any(head.weight.requires_grad for head in heads) else 0
        flops += share * train_cost(2 * weight, trains, c.stage_ends[stage] >= frozen_layers)
    return flops


# -------------------------------------------------------------------------------------- MFU
# Dense bf16 tensor-core peaks (FLOP/s per device, no sparsity), first match of the CUDA device name.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"GH200|H200", 989e12),
    (r"H100.*(PCIe|PCIE)", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100|H800", 989e12),
    (r"B200", 2250e12),
    (r"A100|A800", 312e12),
    (r"L40S", 362e12),
    (r"L40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
)


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    """(device name, its dense bf16 peak FLOP/s or None when not in the table); CPU: ("cpu", None)."""
    if device.type != "cuda":
        return device.type, None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for pattern, peak in PEAK_BF16_FLOPS if re.search(pattern, name)), None)
