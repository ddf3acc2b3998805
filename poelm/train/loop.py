"""The optimizer-step loop every poelm training run shares: accumulation, schedule, evaluation,
metrics, checkpoints, best weights, resume. docs/training.md, "The loop", has the details.

Design choices:
- A step's tokens (`--total-batch-tokens`) do not depend on the world size, and its loss is the sum
  of per-token losses over every micro-batch on every rank divided by the step's supervised tokens
  (counted and all-reduced before the backward passes): gradients equal one big batch's, however the
  step is split over micro-batches and processes.
- Step s is the state after s optimizer steps; step 0 is evaluated before training.
- Resume restores weights, optimizer, loader position and RNG from the newest complete checkpoint
  and drops metrics logged after it: on CPU, bit for bit a run that never stopped (tested).
- The best weights (lowest `best_key`) live in `checkpoints/best-NNNNNN/`, `checkpoints/best` a
  symlink switched atomically: at every instant it is one complete best. Every complete checkpoint
  keeps the best it records, so each can be resumed. Only rank 0 touches these folders.
- Trackers (`--report-to`) get every metrics.jsonl record; they are logging, not part of the run.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import save_file

from ..common.atomic import AtomicDir
from ..common.options import option
from ..common.progress import Progress
from ..core.cascade import load_safetensors
from ..core.errors import PoelmError
from ..core.files import read_json, write_json, write_manifest
from .checkpoint import CHECKPOINTS, STATE, load_checkpoint, save_checkpoint
from .dist import Dist, all_reduce_sum, broadcast_flag, log0
from .flops import peak_flops
from .metrics import MetricsLog, plot_val_bpb
from .optim import apply_schedule
from .schedule import lr_multiplier, muon_momentum
from .trackers import REPORT_TO, Trackers, check_report_to

RUN_CONFIG = "run.json"
BEST = "best"
BEST_INFO = "best.json"


def best_name(step: int) -> str:
    """The folder (beside the checkpoints) holding the best weights found at `step`."""
    return f"{BEST}-{step:06d}"


@dataclass(kw_only=True)
class RunArgs:
    """The options every training run shares (the loop's own: batch, cadence, schedule, resume, device);
    `PretrainArgs` and `StageTrainArgs` extend it and may change a default (options.py)."""

    out: str = option(help="the run folder", metavar="RUNDIR", resume=None)
    device_batch_size: int = option(8, "rows per micro-batch per process")
    total_batch_tokens: int | None = option(None, "tokens per optimizer step, whatever the world size (default: "
                                            "one micro-batch per process)", resume=None)  # recorded as resolved
    eval_every: int = option(100, "evaluation cadence in steps", resume="free")
    save_every: int | None = option(None, "checkpoint cadence (default: --eval-every)", resume=None)
    resume: bool = option(False, "continue from the newest complete checkpoint", resume=None)
    seed: int = option(0, "seed of everything random in the run (init, data order, sampling)")
    matrix_lr: float = option(0.02, "Muon LR of the block matrices that train")
    scalar_lr: float = option(0.5, "AdamW LR of the scalars that train")
    weight_decay: float = option(0.0, "Muon weight decay")
    warmup_frac: float = option(0.0, "share of steps warming up")
    warmdown_frac: float = option(0.4, "share of steps warming down")
    final_lr_frac: float = option(0.0, "LR multiplier at the end of warmdown")
    device: str | None = option(None, "cpu or cuda (default: cuda when available)", resume=None)
    report_to: tuple[str, ...] = option(("none",), "also send the metrics and run config to: none, tensorboard "
                                        "(RUNDIR/tensorboard/), wandb (RUNDIR/wandb/); several allowed "
                                        "(default none)", choices=REPORT_TO, resume=None)


class Loader(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict, source: str) -> None: ...


@dataclass
class LoopConfig:
    """What the loop runs on: the run's options (`run`: folder, cadence, schedule) and what the command
    resolved from them and its model."""

    run: RunArgs
    steps: int
    accum_steps: int
    tokens_per_step: int
    best_key: str
    title: str = "val bpb"
    flops_per_token: float | None = None  # model FLOPs of a training step per token (flops.py)
    momentum_warmup_steps: int = 300

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out)

    @property
    def save_every(self) -> int:
        return self.run.save_every or self.run.eval_every

    @property
    def report_to(self) -> tuple[str, ...]:
        """The trackers of `--report-to` (the command checked them before any work: recipe.train)."""
        return check_report_to(self.run.report_to)


@dataclass
class LoopResult:
    step: int
    evals: list[dict[str, Any]]
    best_step: int | None
    best_value: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def step_tokens(d: Dist, batches: list[tuple[torch.Tensor, ...]], count_fn: Callable[[torch.Tensor], int],
                copies: int = 1) -> float:
    """The supervised tokens of a whole optimizer step, summed over every rank (each token counted by
    `copies` ranks: a pipeline's ranks read the same rows); a step without any is an error."""
    (count,) = all_reduce_sum(d, [float(sum(count_fn(batch[1]) for batch in batches))])
    count /= copies
    if count == 0:
        raise PoelmError("a training step has no supervised tokens (every target is masked)")
    return count


class TrainLoop:
    """Runs `steps` optimizer steps of `ddp_model` (the model, or its DDP wrapper) with callbacks.

    loss_fn(model, *batch) -> (sum of per-token losses (scalar tensor), per-stage sums (1-D tensor)); a
        batch is the loader's tuple, inputs first, targets second (then e.g. doc_ids, positions)
    count_fn(targets) -> the number of supervised tokens in a micro-batch
    evaluate(step) -> dict with at least `val_bpb` ({name: bpb}); may add other fields (e.g. a sample)
    trainable() -> the weights a checkpoint saves (name -> tensor)
    """

    def __init__(self, d: Dist, cfg: LoopConfig, *, model: torch.nn.Module, ddp_model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, loader: Loader,
                 loss_fn: Callable, evaluate: Callable[[int], dict[str, Any]],
                 trainable: Callable[[], dict[str, torch.Tensor]], count_fn: Callable[[torch.Tensor], int],
                 stepper: Callable | None = None, checkpoint_names: set[str] | None = None):
        """`stepper(batches, count_fn) -> (mean loss, per-stage mean losses)` replaces the data-parallel
        forward/backward of a step (stage parallelism, pipeline.py), leaving the optimizer step to
        the loop; `checkpoint_names`: the names a checkpoint may hold beyond this process's parameters
        (a stage-parallel rank holds only its stages). `trainable()` is called on every rank (it may be
        a collective); only rank 0 uses what it returns."""
        self.d, self.cfg = d, cfg
        self.model, self.ddp_model, self.optimizer, self.loader = model, ddp_model, optimizer, loader
        self.loss_fn, self.evaluate, self.trainable, self.count_fn = loss_fn, evaluate, trainable, count_fn
        self.stepper, self.checkpoint_names = stepper, checkpoint_names or set()
        self.metrics = MetricsLog(cfg.run_dir)
        self.best_dir = Path(cfg.run_dir) / CHECKPOINTS / BEST
        self.best_step: int | None = None
        self.best_value: float | None = None
        self.tokens = 0
        self.peak: float | None = None  # dense bf16 FLOP/s of all devices (MFU's denominator)
        name, peak = peak_flops(d.device)  # None on CPU
        if cfg.flops_per_token is not None and peak is not None:
            self.peak = peak * d.world_size
            log0(d, f"model FLOPs per token {cfg.flops_per_token:.4g}; MFU against {d.world_size} x {name} "
                    f"at {peak / 1e12:g} TFLOP/s bf16")
        elif cfg.flops_per_token is not None and d.device.type == "cuda":
            log0(d, f"MFU omitted: no bf16 peak known for {name!r} (poelm/train/flops.py PEAK_BF16_FLOPS)")

    # ------------------------------------------------------------------------------- resume
    def restore(self, ckpt: Path) -> int:
        weights, state, rank_state = load_checkpoint(self.d, ckpt, self.optimizer)
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                if name in own:
                    own[name].copy_(value)
                elif name not in self.checkpoint_names:
                    raise PoelmError(f"{ckpt / 'model.safetensors'}: unexpected tensor {name!r}")
        self.loader.load_state_dict(rank_state["loader"], source=str(ckpt / f"rank{self.d.rank}.json"))
        self.best_step, self.best_value = state.get("best_step"), state.get("best_value")
        self.tokens = state["tokens"]
        error = None
        if self.d.is_main:
            try:
                self._restore_best(ckpt, self.best_step)
            except PoelmError as e:
                error = e
        if not broadcast_flag(self.d, error is None):
            raise error or PoelmError(f"{self.best_dir}: rank 0 could not restore the best weights of {ckpt}")
        if self.d.is_main:
            self.metrics.truncate_after(state["step"])
        return state["step"]

    def _restore_best(self, ckpt: Path, step: int | None) -> None:
        """Point `checkpoints/best` at the best step `ckpt` records; drop bests found after it (rank 0)."""
        root, link = self.best_dir.parent, self.best_dir
        if step is None:  # nothing evaluated before the checkpoint: no best yet
            if link.is_symlink():
                link.unlink()
            elif link.is_dir():
                shutil.rmtree(link)
            self._prune_best(keep=self._recorded_bests())
            return
        name = best_name(step)
        if link.is_dir() and not link.is_symlink():  # written by an earlier poelm: a real folder
            info = link / BEST_INFO
            found = read_json(info).get("step")
            if found != step:
                raise PoelmError(f"{info}: holds the best weights of step {found}, but {ckpt / STATE} records "
                                 f"the best step {step}; the run folder's best weights do not match its checkpoint")
            if (root / name).exists():
                raise PoelmError(f"{root / name}: already exists beside the folder {link} of an earlier poelm; "
                                 f"expected only one copy of the best weights of step {step}")
            os.rename(link, root / name)  # killed here: no `best`, and the next resume links best-NNNNNN
        if not (root / name / "model.safetensors").is_file():
            raise PoelmError(f"{root / name}: missing or incomplete; {ckpt / STATE} records the best weights at "
                             f"step {step}, which should be kept there (model.safetensors)")
        self._point_best(name)
        self._prune_best(keep=self._recorded_bests() | {name})

    def fit(self, ckpt: Path | None) -> LoopResult:
        """Restore `ckpt` (a resumed run) or start at step 0, then run to the end."""
        start = self.restore(ckpt) if ckpt is not None else 0
        if ckpt is not None:
            log0(self.d, f"resumed from {ckpt} (step {start})")
        if not (self.d.is_main and self.cfg.report_to):
            return self.run(start)
        self.metrics.trackers = Trackers.open(self.cfg.report_to, self.cfg.run_dir,
                                              read_json(Path(self.cfg.run_dir) / RUN_CONFIG), start,
                                              history=self.metrics.records())
        ok = False
        try:
            result = self.run(start)
            ok = True
            return result
        finally:
            self.metrics.trackers.close(ok)
            self.metrics.trackers = None

    # ------------------------------------------------------------------------------- steps
    def set_lr(self, step: int) -> float:
        run = self.cfg.run
        mult = lr_multiplier(step, self.cfg.steps, run.warmup_frac, run.warmdown_frac, run.final_lr_frac)
        apply_schedule(self.optimizer, mult, muon_momentum(step, self.cfg.momentum_warmup_steps))
        return mult

    def train_step(self) -> tuple[float, list[float]]:
        """One optimizer step; returns the mean per-token loss and per-stage mean losses of the step."""
        batches = [self.loader.next_batch() for _ in range(self.cfg.accum_steps)]
        if self.stepper is not None:
            result = self.stepper(batches, self.count_fn)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return result
        count = step_tokens(self.d, batches, self.count_fn)
        scale = self.d.world_size / count  # DDP averages gradients over ranks: undo it
        loss_sum, stage_sums = 0.0, None
        for i, batch in enumerate(batches):
            batch = tuple(t.to(self.d.device) for t in batch)
            last = i == len(batches) - 1
            sync = self.ddp_model.no_sync() if (self.d.enabled and not last) else nullcontext()
            with sync:
                total, stages = self.loss_fn(self.ddp_model, *batch)
                (total * scale).backward()
            loss_sum += float(total.detach())
            s = stages.detach().float().tolist()
            stage_sums = s if stage_sums is None else [a + b for a, b in zip(stage_sums, s)]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduced = all_reduce_sum(self.d, [loss_sum, *stage_sums])
        return reduced[0] / count, [v / count for v in reduced[1:]]

    def run(self, start_step: int = 0) -> LoopResult:
        cfg, d = self.cfg, self.d
        t0 = time.time()
        progress = Progress(cfg.steps, start_step, desc="train", enabled=d.is_main)
        if start_step == 0:
            self._eval_and_log(0, {"tokens": 0, "lr": self.set_lr(0)}, progress)
        step = start_step
        try:
            while step < cfg.steps:
                mult = self.set_lr(step)
                t_step = time.time()
                loss, stage_losses = self.train_step()
                step += 1
                self.tokens += cfg.tokens_per_step
                dt = time.time() - t_step
                record = {"step": step, "tokens": self.tokens, "lr": mult, "train_loss": loss,
                          "stage_losses": stage_losses, "tok_per_s": cfg.tokens_per_step / max(dt, 1e-9)}
                speed = {"tok_s": f"{record['tok_per_s']:.0f}"}
                if cfg.flops_per_token is not None:
                    record["flops_per_token"] = cfg.flops_per_token
                    speed["flops_tok"] = f"{cfg.flops_per_token:.3g}"
                    if self.peak is not None:
                        record["mfu"] = cfg.flops_per_token * record["tok_per_s"] / self.peak
                        speed["mfu"] = f"{record['mfu']:.1%}"
                if step % cfg.run.eval_every == 0 or step == cfg.steps:
                    self._eval_and_log(step, record, progress)
                elif d.is_main:
                    self.metrics.append(record)
                progress.update(step, loss=loss, **speed)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    self.save(step)
        finally:
            progress.close()
        return LoopResult(step=step, evals=self.metrics.evals() if d.is_main else [], best_step=self.best_step,
                          best_value=self.best_value, seconds=time.time() - t0)

    # ------------------------------------------------------------------------ eval and save
    def _eval_and_log(self, step: int, record: dict[str, Any], progress: Progress) -> None:
        result = self.evaluate(step)
        record = {**record, "step": step, **result}
        value = result["val_bpb"][self.cfg.best_key]
        if self.best_value is None or value < self.best_value:
            self._save_best(step, value)
            self.best_step, self.best_value = step, value
        if self.d.is_main:
            self.metrics.append(record)
            plot_val_bpb(self.cfg.run_dir, self.metrics.evals(), self.cfg.title)
            bpbs = " ".join(f"{k} {v:.4f}" for k, v in result["val_bpb"].items())
            progress.write(f"step {step}: val bpb {bpbs}" + (f" | {result['sample']!r}" if "sample" in result else ""))

    def _save_best(self, step: int, value: float) -> None:
        """Write the best weights of `step` to `best-NNNNNN/`, then switch `checkpoints/best` to it."""
        weights = self.trainable()  # on every rank: it may gather from all of them
        if not self.d.is_main:
            return
        name = best_name(step)
        # A folder of this step left by an attempt that died after its last checkpoint is never the one
        # `best` points to (that step is at most the restored checkpoint's, and steps only grow): replace it.
        with AtomicDir(self.best_dir.with_name(name), overwrite=True) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()},
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})
            write_json(tmp / BEST_INFO, {"step": step, "value": value, "key": self.cfg.best_key})
            write_manifest(tmp)
        self._point_best(name)

    def _point_best(self, name: str) -> None:
        """Make `checkpoints/best` a symlink to `name`, atomically (a fresh link renamed over it)."""
        tmp = self.best_dir.with_name(f".{BEST}.link.tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, self.best_dir)

    def _recorded_bests(self) -> set[str]:
        """The best folders the complete checkpoints record (their state.json `best_step`)."""
        names = set()
        for path in self.best_dir.parent.iterdir():
            if re.fullmatch(r"\d{6}", path.name) and (path / STATE).is_file():
                try:
                    step = read_json(path / STATE).get("best_step")
                except PoelmError:  # unreadable: that checkpoint cannot be resumed anyway
                    continue
                if step is not None:
                    names.add(best_name(step))
        return names

    def _prune_best(self, keep: set[str]) -> None:
        """Remove every `best-NNNNNN` folder (and unfinished `.best-NNNNNN.tmp-*`) not in `keep`."""
        for path in self.best_dir.parent.iterdir():
            if path.name not in keep and re.fullmatch(rf"{BEST}-\d{{6}}|\.{BEST}-\d{{6}}\.tmp-\w+", path.name):
                shutil.rmtree(path)

    def best_weights(self) -> dict[str, torch.Tensor]:
        return load_safetensors(self.best_dir / "model.safetensors")

    def save(self, step: int) -> None:
        save_checkpoint(self.d, self.cfg.run_dir, step, weights=self.trainable(), optimizer=self.optimizer,
                        rank_state={"loader": self.loader.state_dict()},
                        state={"tokens": self.tokens, "best_step": self.best_step, "best_value": self.best_value})
        if self.d.is_main and self.best_dir.is_symlink():
            # This checkpoint records the best step `best` points to; older checkpoints record theirs.
            self._prune_best(keep=self._recorded_bests() | {os.readlink(self.best_dir)})
