"""The optimizer-step loop every poelm training run shares: accumulation, schedule, evaluation,
metrics, checkpoints, resume. Pretraining and specialist SFT plug their model, data and evaluation in.

Design choices:
- `--total-batch-tokens` fixes the tokens per optimizer step whatever the world size: each step
  accumulates `total / (device_batch * seq_len * world)` micro-batches per rank.
- The loss of a step is the sum of per-token losses over every micro-batch on every rank divided
  by the number of supervised tokens in the whole step (counted and all-reduced before the
  backward passes). Gradients therefore equal those of one big batch exactly, however the step is
  split over micro-batches and processes (DDP averages over ranks, so each rank scales by the world
  size).
- Step numbering: checkpoint / eval step s is the state after s optimizer steps; step 0 is
  evaluated before training so every trajectory starts at the untrained model.
- Resume restores weights, optimizer state, loader position and RNG from the newest complete
  checkpoint, drops metrics logged after it, and continues; on CPU the result is bitwise equal to a
  run that never stopped (tested).
- The best weights (lowest `best_key` metric) are kept atomically in `checkpoints/best/` while the
  run goes, and exported (with `final/`) only when the run completes: a failed run leaves no
  `final/` or `best/` behind.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import save_file

from ..errors import PoelmError
from ..modeldir import load_safetensors, write_json
from ..optim import apply_schedule
from ..schedule import lr_multiplier, muon_momentum
from .checkpoint import CHECKPOINTS, latest_checkpoint, load_checkpoint, read_json, save_checkpoint
from .dist import Dist, all_reduce_sum, barrier
from .metrics import MetricsLog, plot_val_bpb
from .progress import Progress

RUN_CONFIG = "run.json"
BEST = "best"


class Loader(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict, source: str) -> None: ...


@dataclass
class LoopConfig:
    run_dir: Path
    steps: int
    accum_steps: int
    tokens_per_step: int
    eval_every: int
    save_every: int
    warmup_frac: float
    warmdown_frac: float
    final_lr_frac: float
    best_key: str
    resume: bool = False
    title: str = "val bpb"
    momentum_warmup_steps: int = 300


@dataclass
class LoopResult:
    step: int
    evals: list[dict[str, Any]]
    best_step: int | None
    best_value: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


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
    with a different configuration (fields in `ignore` may differ), naming the first field that
    differs.
    """
    run_dir = Path(run_dir)
    recorded = run_dir / RUN_CONFIG
    ckpt = latest_checkpoint(run_dir)
    if resume:
        if ckpt is None:
            raise PoelmError(f"--resume: no complete checkpoint in {run_dir / CHECKPOINTS}")
        old = read_json(recorded)
        for key in sorted(set(old) | set(run_config)):
            if key in ignore:
                continue
            if old.get(key) != run_config.get(key):
                raise PoelmError(f"--resume: {recorded} was made with {key}={old.get(key)!r}, this run has "
                                 f"{key}={run_config.get(key)!r}; resume with the same configuration")
        return ckpt
    if recorded.exists() or ckpt is not None or (run_dir / "final").exists():
        raise PoelmError(f"{run_dir}: already holds a run (pass --resume to continue it, or choose another --out)")
    return None


def record_run(d: Dist, run_dir: Path, run_config: dict[str, Any]) -> None:
    """Create the run folder and its run.json, once the inputs have been checked (rank 0 writes)."""
    barrier(d)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{RUN_CONFIG}.tmp"
        write_json(tmp, run_config)
        os.replace(tmp, run_dir / RUN_CONFIG)
    barrier(d)


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
                 trainable: Callable[[], dict[str, torch.Tensor]], count_fn: Callable[[torch.Tensor], int]):
        self.d, self.cfg = d, cfg
        self.model, self.ddp_model, self.optimizer, self.loader = model, ddp_model, optimizer, loader
        self.loss_fn, self.evaluate, self.trainable, self.count_fn = loss_fn, evaluate, trainable, count_fn
        self.metrics = MetricsLog(cfg.run_dir)
        self.best_dir = Path(cfg.run_dir) / CHECKPOINTS / BEST
        self.best_step: int | None = None
        self.best_value: float | None = None
        self.tokens = 0

    # ------------------------------------------------------------------------------- resume
    def restore(self, ckpt: Path) -> int:
        weights, state, rank_state = load_checkpoint(self.d, ckpt, self.optimizer)
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                if name not in own:
                    raise PoelmError(f"{ckpt / 'model.safetensors'}: unexpected tensor {name!r}")
                own[name].copy_(value)
        self.loader.load_state_dict(rank_state["loader"], source=str(ckpt / f"rank{self.d.rank}.json"))
        self.best_step, self.best_value = state.get("best_step"), state.get("best_value")
        self.tokens = state["tokens"]
        if self.d.is_main:
            self.metrics.truncate_after(state["step"])
        return state["step"]

    # ------------------------------------------------------------------------------- steps
    def set_lr(self, step: int) -> float:
        mult = lr_multiplier(step, self.cfg.steps, self.cfg.warmup_frac, self.cfg.warmdown_frac,
                             self.cfg.final_lr_frac)
        apply_schedule(self.optimizer, mult, muon_momentum(step, self.cfg.momentum_warmup_steps))
        return mult

    def train_step(self) -> tuple[float, list[float]]:
        """One optimizer step; returns the mean per-token loss and per-stage mean losses of the step."""
        batches = [self.loader.next_batch() for _ in range(self.cfg.accum_steps)]
        local = sum(self.count_fn(batch[1]) for batch in batches)
        (count,) = all_reduce_sum(self.d, [float(local)])
        if count == 0:
            raise PoelmError("a training step has no supervised tokens (every target is masked)")
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
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    self._eval_and_log(step, record, progress)
                elif d.is_main:
                    self.metrics.append(record)
                progress.update(step, loss=loss, tok_s=f"{record['tok_per_s']:.0f}")
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
            self.best_step, self.best_value = step, value
            self._save_best(step, value)
        if self.d.is_main:
            self.metrics.append(record)
            plot_val_bpb(self.cfg.run_dir, self.metrics.evals(), self.cfg.title)
            bpbs = " ".join(f"{k} {v:.4f}" for k, v in result["val_bpb"].items())
            progress.write(f"step {step}: val bpb {bpbs}" + (f" | {result['sample']!r}" if "sample" in result else ""))

    def _save_best(self, step: int, value: float) -> None:
        if not self.d.is_main:
            return
        tmp = self.best_dir.with_name(f".{BEST}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in self.trainable().items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "best.json", {"step": step, "value": value, "key": self.cfg.best_key})
        shutil.rmtree(self.best_dir, ignore_errors=True)
        os.replace(tmp, self.best_dir)

    def best_weights(self) -> dict[str, torch.Tensor]:
        return load_safetensors(self.best_dir / "model.safetensors")

    def save(self, step: int) -> None:
        save_checkpoint(self.d, self.cfg.run_dir, step, weights=self.trainable(), optimizer=self.optimizer,
                        rank_state={"loader": self.loader.state_dict()},
                        state={"tokens": self.tokens, "best_step": self.best_step, "best_value": self.best_value})
