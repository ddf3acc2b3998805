"""The skeleton of a training command: setup -> fit -> save around the shared TrainLoop (litgpt's).

Design choices (docs/training.md, "A training command"):
- Pretraining and stage SFT are `Recipe`s that supply only what differs: their inputs, their setup
  (model, data, callbacks; it checks the run folder with `check_run_dir` once its record is known)
  and their export. `train` runs what they share, in one order: trackers checked, seed set, the run
  folder kept clear of every input, setup, fit, then the last weights gathered on every rank (a
  collective) and `final/` and `best/` exported by rank 0.
- The run folder is checked before it is written: a fresh run refuses a folder that holds a run, a
  resumed one a run.json made with other settings (`check_run_dir`); `record_run` writes it after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from ..common.atomic import check_output
from ..common.recorded import refuse_changes
from ..core.errors import PoelmError
from ..core.files import read_json, write_json
from .checkpoint import CHECKPOINTS, latest_checkpoint
from .dist import Dist, barrier
from .loop import RUN_CONFIG, Loader, LoopConfig, LoopResult, RunArgs, TrainLoop
from .trackers import check_report_to

Export = tuple[str, dict[str, torch.Tensor], int]  # (folder name, weights, step): final/, then best/


@dataclass(kw_only=True)
class Setup:
    """What a recipe's setup hands `train`: a run ready to fit (TrainLoop's pieces, loop.py)."""

    ckpt: Path | None  # the checkpoint to resume from (check_run_dir)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: Loader
    loss_fn: Callable
    evaluate: Callable[[int], dict[str, Any]]
    trainable: Callable[[], dict[str, torch.Tensor]]  # called on every rank: it may be a collective
    cfg: LoopConfig
    ddp_model: torch.nn.Module | None = None  # default: the model
    stepper: Callable | None = None
    checkpoint_names: set[str] | None = None


class Recipe(Protocol):
    args: RunArgs

    def inputs(self) -> list[tuple[str, str]]:
        """(what, path) of every input: the run folder may be neither inside nor around one."""

    def setup(self, d: Dist) -> Setup:
        """Model, data, geometry, the run folder checked and recorded, the loop's callbacks."""

    def export(self, d: Dist, exports: Iterable[Export], result: LoopResult) -> dict[str, Any]:
        """Rank 0: write `final/` and `best/`; returns what the command's summary adds."""


def supervised_tokens(targets: torch.Tensor) -> int:
    """The tokens a micro-batch trains on: every target but the ignored (-1)."""
    return int((targets >= 0).sum())


def train(d: Dist, recipe: Recipe) -> dict[str, Any]:
    """setup -> fit -> save (module docstring); returns the run's summary on every rank."""
    args = recipe.args
    check_report_to(args.report_to)  # a missing tracker package: one line, before any work
    torch.manual_seed(args.seed)
    # The run folder holds checkpoints (resume) and final/ + best/: never inside or around an input.
    check_output(args.out, recipe.inputs(), overwrite=True)
    s = recipe.setup(d)
    cfg = s.cfg
    loop = TrainLoop(d, cfg, model=s.model, ddp_model=s.model if s.ddp_model is None else s.ddp_model,
                     optimizer=s.optimizer, loader=s.loader, loss_fn=s.loss_fn, evaluate=s.evaluate,
                     trainable=s.trainable, count_fn=supervised_tokens, stepper=s.stepper,
                     checkpoint_names=s.checkpoint_names)
    result = loop.fit(s.ckpt)
    final = {k: v.detach().to("cpu").clone() for k, v in s.trainable().items()}  # every rank: a collective
    summary: dict[str, Any] = {"run_dir": str(cfg.run_dir), "steps": result.step, "best_step": result.best_step,
                               "best_key": cfg.best_key, "best_val_bpb": result.best_value}
    if d.is_main:
        exports = (("final", final, result.step), ("best", loop.best_weights(), result.best_step))
        summary.update(recipe.export(d, exports, result))
    return summary


# ------------------------------------------------------------------------------- the run folder
def resolve_seq_len(requested: int | None, model_len: int) -> int:
    """--seq-len, or the model's sequence_len; longer than the model takes is an error."""
    seq_len = requested or model_len
    if not 1 < seq_len <= model_len:
        raise PoelmError(f"--seq-len {seq_len}: this model takes sequences of 2..{model_len} tokens (its sequence_len)")
    return seq_len


def batch_geometry(device_batch_size: int, total_batch_tokens: int | None, seq_len: int,
                   world: int) -> tuple[int, int]:
    """(tokens per step, accumulation steps): the step's tokens do not depend on the world size."""
    per_micro = device_batch_size * seq_len * world
    total = total_batch_tokens or per_micro
    if total % per_micro:
        raise PoelmError(f"--total-batch-tokens {total} is not divisible by device batch {device_batch_size} x "
                         f"seq len {seq_len} x world size {world} = {per_micro}")
    return total, total // per_micro


def check_run_dir(run_dir: Path, run_config: dict[str, Any], resume: bool, ignore: tuple[str, ...] = ()) -> Path | None:
    """Check the run folder against --resume; returns the checkpoint to resume from, if any. Writes nothing.

    A fresh run refuses a folder that already holds a run; a resumed run refuses a checkpoint made
    with a different configuration (fields in `ignore` may differ), naming every field that differs
    (common/recorded).
    """
    run_dir = Path(run_dir)
    recorded = run_dir / RUN_CONFIG
    ckpt = latest_checkpoint(run_dir)
    if resume:
        if ckpt is None:
            raise PoelmError(f"--resume: no complete checkpoint in {run_dir / CHECKPOINTS}")
        refuse_changes(read_json(recorded), run_config, ignore=ignore, union=True,
                       said=f"--resume: {recorded} was made with {{changes}}", fix="resume with the same configuration",
                       describe=lambda c: f"{c.field}={c.then!r}, this run has {c.field}={c.now!r}")
        return ckpt
    if recorded.exists() or ckpt is not None or (run_dir / "final").exists():
        raise PoelmError(f"{run_dir}: already holds a run (pass --resume to continue it, or choose another --out)")
    return None


def record_run(d: Dist, run_dir: Path, run_config: dict[str, Any]) -> None:
    """Create the run folder and its run.json, once the inputs have been checked (rank 0 writes)."""
    barrier(d)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / RUN_CONFIG, run_config)
    barrier(d)


# ------------------------------------------------------------------------------- the model card
def run_rows(args: RunArgs, seq_len: int, tokens_per_step: int, world: int, steps: int) -> list[tuple[str, Any]]:
    """The model card's training rows every command shares: the batch, its geometry and the steps."""
    return [("Sequence length", seq_len), ("Per-device batch", f"{args.device_batch_size} x {seq_len}"),
            ("World size", world), ("Tokens per step", f"{tokens_per_step:,}"), ("Steps", steps)]


def cadence_row(args: RunArgs) -> tuple[str, str]:
    """The model card's row of evaluation and checkpoint cadence."""
    return ("Eval / save cadence", f"every {args.eval_every} / {args.save_every or args.eval_every} steps")
