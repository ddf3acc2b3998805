"""Small builders shared by the tests: tiny configs and models moved off their init."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from poelm.core.config import PoEConfig
from poelm.core.model import PoEGPT


def tiny_config(**changes) -> PoEConfig:
    """4 layers in stages (2, 2), GQA 4:2, sequence 512 so the S window (128) is shorter than test inputs."""
    base = dict(vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, sequence_len=512,
                poe_stage_layers=[2, 2])
    base.update(changes)
    return PoEConfig(**base)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its init (zero c_proj, neutral lambdas) so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g) * scale
        if name.endswith(("smear_lambda", "backout_lambda")):
            noise = noise.abs() + 0.3
        p.add_(noise.to(p.dtype))
    return model


def tiny_model(seed: int = 0, perturb: bool = True, **changes) -> PoEGPT:
    model = PoEGPT(tiny_config(**changes))
    model.init_weights(seed)
    return perturb_(model, seed + 1) if perturb else model


@torch.no_grad()
def identity_deeper_model(**changes) -> PoEGPT:
    """Stages (2, 2) where stage 1 adds nothing (zero blocks, neutral lambdas, no backout): a draft from
    stage 0 equals the full model, so every speculative draft is accepted."""
    model = tiny_model(poe_stage_layers=[2, 2], backout=False, poe_backout_stages=[], **changes).eval()
    for i in (2, 3):
        model.transformer.h[i].attn.c_proj.weight.zero_()
        model.transformer.h[i].mlp.c_proj.weight.zero_()
        model.resid_lambdas[i] = 1.0
        model.x0_lambdas[i] = 0.0
    return model


def cut_model(model: PoEGPT, stage: int) -> PoEGPT:
    """A separate model holding only stages 0..stage of `model`, with the same weights."""
    cut = PoEGPT(model.config.truncated(stage))
    own = model.state_dict()
    n = cut.config.n_layer
    own["resid_lambdas"], own["x0_lambdas"] = own["resid_lambdas"][:n], own["x0_lambdas"][:n]
    cut.load_state_dict({k: own[k] for k in cut.state_dict()}, strict=True)
    return cut


def kill_at(victim, marker: Path, timeout: float = 120.0) -> None:
    """SIGKILL `victim` (a Popen) as soon as `marker` (a checkpoint's state.json) exists."""
    deadline = time.time() + timeout
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
