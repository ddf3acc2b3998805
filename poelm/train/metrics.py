"""Run metrics: one JSON object per line in `metrics.jsonl`, and a PNG of val bpb per stage
(docs/training.md, "The run folder").

Design choices:
- Append-only JSON lines that any tool can read; every record carries `step`, so a resumed run drops
  what a killed run logged after its last checkpoint (`truncate_after`) and the file reads as if the
  run had never stopped.
- Every record appended also goes to the run's trackers (trackers.py): they see what the file holds.
- The plot is redrawn from the file at every evaluation (Agg backend), written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.files import write_bytes, write_text

if TYPE_CHECKING:
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
