"""Run metrics: one JSON object per line in `metrics.jsonl`, a PNG of val bpb per stage, and the
model FLOPs per token behind the MFU figure.

Design choices:
- Append-only JSON lines that any tool can read; every record carries `step` so a resumed run can
  drop what a killed run logged after its last checkpoint (`truncate_after`), and the file then
  reads as if the run had never stopped.
- Every record appended is also handed to the run's trackers (trackers.py: TensorBoard, W&B), so
  they see exactly what the file holds.
- The plot is redrawn from the file at every evaluation (matplotlib's Agg backend, no display), one
  line per stage predictor plus the Log-OP combination, written atomically.
- Model FLOPs per token of a training step (`training_flops_per_token`) follow nanochat's
  `estimate_flops` (after PaLM, appendix B): 2 FLOPs per matmul weight per token forward, 2 more for
  the gradient of its input, 2 more for the gradient of the weight, plus attention's
  12 * n_head * head_dim * min(window, seq_len) per layer. "Matmul weights" are the weights of the
  linear layers: q, k, v, attention and MLP projections, the value-embedding gates, the smear gate and
  the heads. The embedding table, the value embeddings (lookups) and the scalar lambdas are excluded.
  What poelm adds, so the figure is the work the step asks for:
  * each weight counts by where it runs: 6 when it trains, 4 when it is frozen but the backward
    passes through it (the trunk under `--train-chat-rows`), 2 when it runs without autograd (a
    specialist's trunk, `frozen_layers`); attention counts 12 per key with autograd, 4 without;
  * a read-out is one d x padded-vocab product: a stage's heads (`lm_head` plus its additive heads)
    are summed into one weight before the product (`HeadCrossEntropy`), which counts 6 when any of
    them trains (a specialist's `specialist_head` beside the frozen `lm_head`), 4 or 2 as above;
  * PoE training reads out every stage (`flat`, `residual_logop`), or a share F of the positions of
    the stages but the last (`--stage-loss-fraction F`); BP (`none`) and stage SFT read out the
    last stage only.
  The matmul part equals `torch.utils.flop_counter.FlopCounterMode` on a fused-loss training step
  (to the smear gate, which skips position 0) for flat, none and a frozen or chat-row specialist.
  The padded vocabulary counts (the head's parameters), as in nanochat. Tokens are every position of
  the step (masked ones too), the same tokens `tok_per_s` counts, so FLOP/s = flops_per_token *
  tok_per_s. The causal mask is not discounted (nanochat, PaLM): the figure is the standard one, not
  the kernel's work.
- MFU = achieved FLOP/s / (devices x the device's dense bf16 peak) from a small table by CUDA device
  name (the vendor's datasheet, without sparsity), whatever dtype the run computes in; CPU and
  devices not in the table get no MFU.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..core.files import write_bytes, write_text

if TYPE_CHECKING:
    from ..core.model import PoEGPT
    from .trackers import Trackers

METRICS = "metrics.jsonl"
PLOT = "val_bpb.png"


class MetricsLog:
    def __init__(self, run_dir: Path, trackers: "Trackers | None" = None):
        self.path = Path(run_dir) / METRICS
        self.trackers = trackers  # every appended record also goes to them (rank 0)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log_record(record)

    def truncate_after(self, step: int) -> None:
        """Keep only records up to `step` (what the checkpoint being resumed had seen)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "val_bpb" in r]


def plot_val_bpb(run_dir: Path, evals: list[dict[str, Any]], title: str) -> Path | None:
    """Val bpb of every predictor against step; returns the PNG path (None before the first eval)."""
    if not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evals[0]["val_bpb"])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    steps = [r["step"] for r in evals]
    for name in names:
        style = {"linewidth": 1.8, "color": "black", "linestyle": "--"} if name == "logop" else {"linewidth": 1.6}
        ax.plot(steps, [r["val_bpb"][name] for r in evals], marker="o", markersize=3, label=name, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("val bits per byte (log scale)")
    ax.set_yscale("log")  # the untrained step-0 point would otherwise flatten the curves that matter
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / PLOT
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_bytes(out, png.getvalue())
    return out


# ----------------------------------------------------------------------------------- FLOPs and MFU
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


def training_flops_per_token(model: "PoEGPT", seq_len: int, *, readouts: Mapping[int, float],
                             frozen_layers: int = 0) -> float:
    """Model FLOPs per token of one training step (module docstring): `readouts` {stage: share of the
    positions read out}; `frozen_layers` n: the embedding and layers 0..n-1 run without autograd.
    Call it with the trainable parameters already chosen (`requires_grad`)."""
    c = model.config

    def per_weight(autograd: bool, trains: bool) -> int:
        return 2 if not autograd else 6 if trains else 4

    def weights(module: torch.nn.Module, autograd: bool) -> int:
        return sum(m.weight.numel() * per_weight(autograd, m.weight.requires_grad)
                   for m in module.modules() if isinstance(m, torch.nn.Linear))

    flops = float(weights(model.smear_gate, frozen_layers == 0)) if c.smear else 0.0
    for i, block in enumerate(model.transformer.h):
        autograd = i >= frozen_layers
        keys = min(c.layer_windows[i], seq_len)  # nanochat: min(window, T), the causal mask not discounted
        flops += weights(block, autograd) + (12 if autograd else 4) * c.n_head * c.head_dim * keys
    for stage, share in readouts.items():  # the stage's heads summed into one weight (HeadCrossEntropy)
        heads = model.heads(stage)
        trains = any(head.weight.requires_grad for head in heads)
        flops += share * heads[0].weight.numel() * per_weight(c.stage_ends[stage] >= frozen_layers, trains)
    return flops
