"""Experiment trackers (`--report-to tensorboard wandb`): every metrics.jsonl record, also elsewhere.
docs/training.md, "Trackers", says how each backend stores a run and how resume continues it.

Design choices:
- metrics.jsonl stays the source of truth; a tracker is a mirror: `MetricsLog.append` hands it every
  record it writes, at the same step, with the same values (flattened once: `val_bpb/stage0`).
- One small interface (`Tracker`), one class per backend, each importing its package only when
  opened; a backend that is not installed is one line naming the extra (`check_report_to`), raised
  by the training commands before any work. Only rank 0 reports.
- Resume continues the same tracker run, dropping what a killed run logged past the checkpoint where
  the backend can (TensorBoard's `purge_step`; W&B skips the steps it already holds). `--report-to`
  is logging, not part of the run: it may change on resume, a new tracker first replaying the file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from ..core.errors import PoelmError
from ..core.files import write_text

REPORT_TO = ("none", "tensorboard", "wandb")
PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend -> the package (and the extra)
TENSORBOARD = "tensorboard"  # folders and files in the run folder
WANDB = "wandb"
WANDB_RUN_ID = "wandb_run_id"


def missing_extra(backend: str) -> PoelmError:
    pkg = PACKAGE[backend]
    return PoelmError(f"--report-to {backend} needs the {pkg} package: pip install 'poelm[{pkg}]'")


def check_report_to(names: Sequence[str]) -> tuple[str, ...]:
    """The trackers `--report-to` asks for (without "none", each once), checked to be installed."""
    out: list[str] = []
    for name in names:
        if name not in REPORT_TO:
            raise PoelmError(f"--report-to {name}: expected one or more of {', '.join(REPORT_TO)}")
        if name != "none" and name not in out:
            out.append(name)
    if "none" in names and out:
        raise PoelmError(f"--report-to none {' '.join(out)}: none means no tracker; give none alone")
    for name in out:
        if importlib.util.find_spec(PACKAGE[name]) is None:
            raise missing_extra(name)
    return tuple(out)


def flatten(record: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(scalars, texts) of a metrics record: nested keys joined with "/", `step` left out."""
    scalars: dict[str, float] = {}
    texts: dict[str, str] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{key}/{i}", v)
        elif isinstance(value, str):
            texts[key] = value
        elif isinstance(value, (bool, int, float)):
            scalars[key] = float(value)
        # None: nothing to plot

    for key, value in record.items():
        if key != "step":
            walk(key, value)
    return scalars, texts


class Tracker(Protocol):
    fresh: bool  # the tracker's run is new to this run folder (nothing logged to it before)

    def log(self, step: int, values: dict[str, float]) -> None: ...
    def log_text(self, step: int, key: str, text: str) -> None: ...
    def close(self, ok: bool = True) -> None: ...


class TensorBoardTracker:
    """Scalars and text through `torch.utils.tensorboard.SummaryWriter` into RUNDIR/tensorboard/."""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise missing_extra("tensorboard") from None
        folder = Path(run_dir) / TENSORBOARD
        events = sorted(folder.glob("events.out.tfevents.*"))
        self.fresh = not events
        if events:  # event files are read in name order: start in a later second than the newest
            newest = int(re.match(r"events\.out\.tfevents\.(\d+)", events[-1].name).group(1))
            while int(time.time()) <= newest:
                time.sleep(0.05)
        # purge_step: readers drop events at steps >= it logged earlier (by a killed run)
        self.writer = SummaryWriter(str(folder), purge_step=None if self.fresh else start_step + 1)
        if self.fresh:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
                    for k, v in _flat_config(config).items()}
            for summary in hparams(flat, {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", json.dumps(config, indent=2), 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_text(self, step: int, key: str, text: str) -> None:
        self.writer.add_text(key, text, step)

    def close(self, ok: bool = True) -> None:
        self.writer.close()


class WandbTracker:
    """`wandb.log(values, step=step)` into a W&B run kept in RUNDIR/wandb/ (its id in RUNDIR/wandb_run_id).
    Text is logged as a string value of the history (shown in the run's tables, not as a chart)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int):
        try:
            import wandb
        except ImportError:
            raise missing_extra("wandb") from None
        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_RUN_ID
        self.fresh = not id_file.is_file()
        if self.fresh:
            write_text(id_file, secrets.token_hex(8) + "\n")
        run_id = id_file.read_text(encoding="utf-8").strip()
        (run_dir / WANDB).mkdir(exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "poelm"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config, allow_val_change=True)
        self.first = 0  # W&B already holds the steps below this one
        if not self.fresh and self.run.step > start_step + 1:  # online: the server knows what was logged
            self.first = self.run.step
            print(f"wandb: run {run_id} already holds steps up to {self.run.step - 1} (logged before the "
                  f"resume); W&B cannot rewrite them, so the resumed run reports from step {self.run.step}",
                  file=sys.stderr, flush=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        if step >= self.first:
            self.run.log(values, step=step)

    def log_text(self, step: int, key: str, text: str) -> None:
        if step >= self.first:
            self.run.log({key: text}, step=step)

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


BACKENDS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def _flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat_config(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Trackers:
    """The trackers of one run (rank 0), fed every metrics record; empty: nothing happens."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = trackers or []

    @classmethod
    def open(cls, names: Sequence[str], run_dir: Path, config: dict[str, Any], start_step: int,
             history: Iterable[dict[str, Any]] = ()) -> "Trackers":
        """Open each backend in `names` on the run folder; a resumed run (start_step > 0) replays
        `history` (metrics.jsonl up to the resumed step) into the trackers that are new to the run."""
        opened: list[Tracker] = []
        try:
            for name in check_report_to(names):
                opened.append(BACKENDS[name](run_dir, config, start_step))
        except BaseException:
            for tracker in opened:
                tracker.close(ok=False)
            raise
        new = cls([t for t in opened if t.fresh and start_step > 0])
        for record in history:
            new.log_record(record)
        return cls(opened)

    def log_record(self, record: dict[str, Any]) -> None:
        if not self.trackers:
            return
        step = int(record["step"])
        scalars, texts = flatten(record)
        for tracker in self.trackers:
            tracker.log(step, scalars)
            for key, text in texts.items():
                tracker.log_text(step, key, text)

    def close(self, ok: bool = True) -> None:
        for tracker in self.trackers:
            tracker.close(ok)
        self.trackers = []
