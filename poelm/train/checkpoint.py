"""Training checkpoints: complete, atomic, pickle-free, resumable bit for bit.

Design choices (docs/formats.md, "A training run folder"):
- One folder per save, `RUNDIR/checkpoints/NNNNNN/`, holding the trainable weights
  (`model.safetensors`), each rank's optimizer state (`optimizer_rankR.safetensors` + `.json`), each
  rank's data-loader position and RNG state (`rankR.json`, `rng_rankR.safetensors`), and
  `state.json` (step, run configuration, best-so-far, anything the loop needs) written last.
- Atomic: everything is written into `checkpoints/.NNNNNN.tmp/` and renamed into place by rank 0
  after every rank has finished, so a folder named `NNNNNN` is always complete; a run killed while
  saving leaves only a `.tmp` folder, which the next save or resume removes.
- Tensors go to safetensors and facts to JSON; nothing is ever unpickled on resume.
- Rank 0 records every file's digest (`digests.json`, files.py) last, before the rename; a resume
  checks each file it reads against it, so a damaged checkpoint is an error naming the file.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..core.errors import PoelmError
from ..core.files import read_json, read_manifest, warn_unverified, write_json, write_manifest
from ..core.cascade import load_safetensors
from .optim import load_optimizer_state, optimizer_state
from .dist import Dist, barrier

CHECKPOINTS = "checkpoints"
STATE = "state.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a `NNNNNN` folder with its state.json), or None."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if re.fullmatch(r"\d{6}", p.name) and (p / STATE).is_file())
    return done[-1] if done else None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    # Copies: a loaded tensor is a view into its file's mapping, at an offset, and torch's setters read
    # the storage from its start (torch 2.13 crashes on the view).
    torch.set_rng_state(state["cpu"].clone())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].clone(), device)


def save_checkpoint(d: Dist, run_dir: Path, step: int, *, weights: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, rank_state: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write checkpoint `step` atomically. Every rank calls this; rank 0 owns the shared files."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    r = d.rank
    tensors, meta = optimizer_state(optimizer)
    save_file(tensors, str(tmp / f"optimizer_rank{r}.safetensors"))
    write_json(tmp / f"optimizer_rank{r}.json", meta)
    save_file({k: v.contiguous() for k, v in rng_state(d.device).items()}, str(tmp / f"rng_rank{r}.safetensors"))
    write_json(tmp / f"rank{r}.json", rank_state)
    if d.is_main:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
    barrier(d)
    if d.is_main:
        write_json(tmp / STATE, {**state, "step": step, "world_size": d.world_size})
        write_manifest(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier, superseded attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier(d)
    return final


def load_checkpoint(d: Dist, path: Path, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """Read checkpoint `path` for this rank: (weights, state, rank_state); restores optimizer and RNG."""
    if read_manifest(path) is None:
        warn_unverified(path, "checkpoint")
    state = read_json(path / STATE)
    if state.get("world_size") != d.world_size:
        # Optimizer state is replicated, so any rank's copy serves; loader positions are per rank.
        raise PoelmError(f"{path / STATE}: saved with world size {state.get('world_size')}, resumed with "
                         f"{d.world_size}; resume with the same number of processes")
    weights = load_safetensors(path / "model.safetensors")
    r = d.rank
    opt_path = path / f"optimizer_rank{r}.safetensors"
    load_optimizer_state(optimizer, load_safetensors(opt_path), read_json(path / f"optimizer_rank{r}.json"),
                         source=str(opt_path))
    set_rng_state(load_safetensors(path / f"rng_rank{r}.safetensors"), d.device)
    return weights, state, read_json(path / f"rank{r}.json")
