"""MuonAdamW: one optimizer, two kinds of parameter group, kept off the model (nanochat's optim.py).

Design choices:
- Grouping lives here, not on the model: `param_groups(model)` reads parameter *names* (nanochat's)
  and assigns every trainable (`requires_grad`) parameter to exactly one group; frozen parameters
  (a specialist stage's base) are left out; a trainable parameter that matches no rule is an error
  naming it, so a new parameter can never silently go untrained or get the wrong optimizer.
- Groups (nanochat's values; AdamW LRs of the embedding and head scaled by (n_embd / 768) ** -0.5,
  tuned at d=768, 0.7071 at d=1536):
    lm_head        lm_head.weight, stage_heads.*      adamw  unembedding_lr*s  (0.8, 0.96)  wd 0.01
    wte            transformer.wte.weight             adamw  embedding_lr*s    (0.8, 0.995) wd 0.001
    value_embeds   value_embeds.*                     adamw  embedding_lr*s/2  (0.8, 0.995) wd 0.01
    resid_lambdas  resid_lambdas                      adamw  scalar_lr*0.01    (0.8, 0.95)  wd 0.05
    x0_lambdas     x0_lambdas                         adamw  scalar_lr         (0.96, 0.95) wd 0
    smear          smear_gate.weight, smear_lambda,   adamw  0.2               (0.8, 0.95)  wd 0
                   backout_lambda
    specialist_head  specialist_head.weight           adamw  stage_head_lr     (0.8, 0.96)  wd stage_head_wd
    muon RxC       2-D params under transformer.h.    muon   matrix_lr, momentum 0.95, 5 steps, beta2 0.95, wd
  (eps 1e-10 everywhere). The specialist head's LR is not scaled: the released code specialist used 1e-4 flat.
  One Muon group per distinct shape (sorted), so its matrices orthogonalise as one batched matmul.
  Empty groups are omitted. Each group carries `name`, `kind`, `lr`, `initial_lr` (= lr; the trainer
  sets lr = initial_lr * lr_multiplier) and `param_names` (same order as `params`; torch's
  Optimizer knows this key, so its own state_dict/load_state_dict keep working).
- AdamW is torch's decoupled AdamW, operation for operation (`torch.optim.AdamW(foreach=False)`):
  p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g^2;
  p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps). Bitwise equal to it for float32 parameters.
- Muon, per step, on each (R, C) matrix of a group (all of one shape, batched as (N, R, C)):
  1. Nesterov momentum: buf = lerp(buf, g, 1-mu); u = lerp(g, buf, mu), mu read from the group
     every step (the trainer warms it up with `schedule.muon_momentum`).
  2. Orthogonalise u with 5 Polar Express steps (Amsel, Persson, Musco, Gower 2025,
     arXiv:2505.16932; the coefficients computed for 5 iterations, safety factor 2e-2, cushion 2,
     as modded-nanogpt and nanochat ship them) after dividing by 1.02 * ||u||_F (>= the spectral
     norm, so every singular value starts in [0, 1/1.02]). Tall matrices are transposed so the Gram
     matrix is the small (min(R,C))^2 one. float32 on CPU (deterministic, accurate); bfloat16 on CUDA.
  3. Optional NorMuon variance reduction (arXiv:2510.05491, nanochat's form), off when beta2 is
     None: after orthogonalisation the long side's rows are already unit vectors, so the statistic is
     taken along the other side: per row when R >= C (v has shape (R, 1)), per column when R < C
     ((1, C)). v = EMA_beta2(mean of u^2 along that side); u <- u / sqrt(v), then u is rescaled to
     its Frobenius norm before the division. The EMA has no bias correction because that final
     rescale cancels any common factor.
  4. Shape scale: u *= max(1, R/C) ** 0.5 (nanochat's aspect-ratio LR factor).
  5. Decoupled weight decay p *= 1 - lr*wd (plain, torch-AdamW semantics, with the unscaled lr;
     nanochat's "cautious" masked decay is not used), then p -= lr * u.
  nanochat's newer MuonEq row equilibration and Muon+ Frobenius snap are not implemented.
- Deterministic on CPU: fixed operation order, no atomics, no global state; state lives in
  `self.state` per parameter (float32), so it saves per parameter.
- No pickle: `optimizer_state` returns named CPU tensors for a safetensors file plus a JSON-able
  dict (group hyperparameters, per-parameter scalar state, parameter names and shapes);
  `load_optimizer_state` checks everything against the live optimizer before changing anything and
  names the source file and the group/tensor that does not fit.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NoReturn

import torch
import torch.nn as nn

from ..core.errors import PoelmError

STATE_FORMAT = "poelm.optim.MuonAdamW/1"

# Polar Express (arXiv:2505.16932), 5 iterations, safety factor 2e-2, cushion 2: (a, b, c) of
# p(x) = a x + b x^3 + c x^5 per step. Same numbers as modded-nanogpt's and nanochat's optim.py.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02  # divide by 1.02 ||X||_F: the coefficients were fitted with this margin

ADAMW_KEYS = ("lr", "initial_lr", "betas", "eps", "weight_decay")
MUON_KEYS = ("lr", "initial_lr", "momentum", "ns_steps", "beta2", "weight_decay")
# Keys of a group that are not hyperparameters (saved separately or not at all).
_NOT_HYPER = ("params", "param_names")


# ------------------------------------------------------------------------------------- grouping
def adamw_lr_scale(n_embd: int) -> float:
    """nanochat's AdamW LR factor (n_embd / 768) ** -0.5: LRs were tuned at d=768; 0.7071 at 1536."""
    return (n_embd / 768) ** -0.5


def _adamw_group(name: str, lr: float, betas: tuple[float, float], wd: float) -> dict[str, Any]:
    return dict(name=name, kind="adamw", params=[], param_names=[], lr=lr, initial_lr=lr,
                betas=betas, eps=1e-10, weight_decay=wd)


def param_groups(
    model: nn.Module,
    *,
    matrix_lr: float = 0.02,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    scalar_lr: float = 0.5,
    weight_decay: float = 0.0,
    stage_head_lr: float = 1e-4,
    stage_head_weight_decay: float = 0.1,
    no_decay: frozenset[str] | set[str] | tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Every trainable parameter of `model` in exactly one group (table in the module docstring).

    `weight_decay` is the Muon groups'; the AdamW groups keep nanochat's fixed decays, except the
    specialist head's (`stage_head_weight_decay`). Groups holding a parameter named in `no_decay` get
    no weight decay: a partly frozen tensor (a specialist's layer lambdas, the chat rows of the
    embedding, both trained through gradient masks) must not have its frozen entries decayed.
    Raises PoelmError naming a trainable parameter that matches no rule.
    """
    s = adamw_lr_scale(model.config.n_embd)
    adamw = {
        "lm_head": _adamw_group("lm_head", unembedding_lr * s, (0.8, 0.96), 0.01),
        "wte": _adamw_group("wte", embedding_lr * s, (0.8, 0.995), 0.001),
        "value_embeds": _adamw_group("value_embeds", embedding_lr * s * 0.5, (0.8, 0.995), 0.01),
        "resid_lambdas": _adamw_group("resid_lambdas", scalar_lr * 0.01, (0.8, 0.95), 0.05),
        "x0_lambdas": _adamw_group("x0_lambdas", scalar_lr, (0.96, 0.95), 0.0),
        "smear": _adamw_group("smear", 0.2, (0.8, 0.95), 0.0),
        "specialist_head": _adamw_group("specialist_head", stage_head_lr, (0.8, 0.96), stage_head_weight_decay),
    }
    muon: dict[tuple[int, ...], dict[str, Any]] = {}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, p in trainable:
        if name == "lm_head.weight" or name.startswith("stage_heads."):
            key = "lm_head"
        elif name == "specialist_head.weight":
            key = "specialist_head"
        elif name == "transformer.wte.weight":
            key = "wte"
        elif name.startswith("value_embeds."):
            key = "value_embeds"
        elif name in ("resid_lambdas", "x0_lambdas"):
            key = name
        elif name in ("smear_gate.weight", "smear_lambda", "backout_lambda"):
            key = "smear"
        elif name.startswith("transformer.h.") and p.ndim == 2:
            shape = tuple(p.shape)
            if shape not in muon:
                muon[shape] = dict(name="muon " + "x".join(map(str, shape)), kind="muon", params=[],
                                   param_names=[], lr=matrix_lr, initial_lr=matrix_lr, momentum=0.95,
                                   ns_steps=5, beta2=0.95, weight_decay=weight_decay)
            muon[shape]["params"].append(p)
            muon[shape]["param_names"].append(name)
            continue
        else:
            raise PoelmError(f"parameter '{name}' {tuple(p.shape)} is trainable but matches no optimizer group "
                             "(expected: transformer.wte/h.*, lm_head, stage_heads.*, "
                             "specialist_head, value_embeds.*, resid/x0_lambdas, smear_*, backout_lambda; "
                             "freeze it or add a rule in poelm/optim.py)")
        adamw[key]["params"].append(p)
        adamw[key]["param_names"].append(name)
    groups = [g for g in adamw.values() if g["params"]] + [muon[k] for k in sorted(muon)]
    for g in groups:
        if any(n in no_decay for n in g["param_names"]):
            g["weight_decay"] = 0.0
    placed = [id(p) for g in groups for p in g["params"]]
    assert len(placed) == len(set(placed)) == len(trainable), "every trainable parameter in exactly one group"
    return groups


# ---------------------------------------------------------------------------- orthogonalisation
def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Polar Express approximation of U V^T for g = U S V^T, (..., R, C) -> (..., R, C) float32.

    Runs in `dtype` (float32 on CPU; bfloat16 is fine on CUDA). Singular values of the result lie near
    1 for every singular value of g above ~1e-3 of its Frobenius norm (tests/test_optim.py measures it).
    """
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"ns_steps={steps}: Polar Express coefficients exist for 1..{len(POLAR_EXPRESS_COEFFS)}")
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # (..., C, R): iterate on the small Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * POLAR_EXPRESS_SAFETY + 1e-6)  # spectral norm < 1
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        gram = x @ x.mT  # (..., r, r), r = min(R, C)
        x = a * x + (b * gram + c * (gram @ gram)) @ x  # a X + b X X^T X + c (X X^T)^2 X
    if tall:
        x = x.mT
    return x.float()


# -------------------------------------------------------------------------------------- optimizer
class MuonAdamW(torch.optim.Optimizer):
    """Muon for block matrices, AdamW for everything else, in one optimizer (see module docstring).

    Each group is a dict with `params`, `name` (unique), `kind` ('adamw' | 'muon') and the
    hyperparameters of its kind: AdamW `lr, initial_lr, betas, eps, weight_decay`; Muon `lr,
    initial_lr, momentum, ns_steps, beta2 (None = no variance reduction), weight_decay`.
    Optional `param_names` (list of str, same order as params) is checked when state is loaded.
    """

    def __init__(self, param_groups: list[dict[str, Any]]):
        names = []
        for group in param_groups:
            kind, name = group.get("kind"), group.get("name")
            if kind not in ("adamw", "muon") or not isinstance(name, str):
                raise ValueError(f"optimizer group {name!r}: needs a str 'name' and kind 'adamw' or 'muon', got {kind!r}")
            missing = [k for k in (ADAMW_KEYS if kind == "adamw" else MUON_KEYS) if k not in group]
            if missing:
                raise ValueError(f"optimizer group '{name}' ({kind}): missing {missing}")
            if kind == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) > 1 or any(len(s) != 2 for s in shapes):
                    raise ValueError(f"optimizer group '{name}': Muon needs 2-D parameters of one shape, got {sorted(shapes)}")
                if not 1 <= group["ns_steps"] <= len(POLAR_EXPRESS_COEFFS):
                    raise ValueError(f"optimizer group '{name}': ns_steps={group['ns_steps']}, expected 1..5")
            names.append(name)
        if len(set(names)) != len(names):
            raise ValueError(f"optimizer group names must be unique, got {names}")
        super().__init__(param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)
        return loss

    def _step_adamw(self, group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            t = state["step"]
            # The math runs in float32 (a no-op copy for float32 params, the common case).
            x = p if p.dtype == torch.float32 else p.float()
            g = p.grad.float()
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if wd != 0:
                x.mul_(1 - lr * wd)  # decoupled weight decay, before the update (torch's order)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step_size = lr / (1 - beta1**t)
            denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
            x.addcdiv_(m, denom, value=-step_size)
            if x is not p:
                p.copy_(x)

    def _step_muon(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        mu, lr, wd, beta2 = group["momentum"], group["lr"], group["weight_decay"], group["beta2"]
        rows, cols = params[0].shape
        updates = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            buf, g = state["momentum_buffer"], p.grad.float()
            buf.lerp_(g, 1 - mu)
            updates.append(g.lerp(buf, mu))  # Nesterov: look ahead along the updated momentum
        u = torch.stack(updates)  # (N, R, C)
        ns_dtype = torch.bfloat16 if u.device.type == "cuda" else torch.float32
        u = orthogonalize(u, group["ns_steps"], ns_dtype)
        if beta2 is not None:
            u = self._normuon(params, u, beta2)
        u = u * max(1.0, rows / cols) ** 0.5
        for p, up in zip(params, u.unbind(0)):
            if wd != 0:
                p.mul_(1 - lr * wd)
            p.add_(up.to(p.dtype), alpha=-lr)

    def _normuon(self, params: list[torch.Tensor], u: torch.Tensor, beta2: float) -> torch.Tensor:
        """NorMuon: normalise u (N, R, C) by an EMA of its mean square per row (R >= C) or column (R < C)."""
        rows, cols = u.shape[-2:]
        red = -1 if rows >= cols else -2  # average over the long side's entries
        bufs = []
        for p in params:
            state = self.state[p]
            if "second_momentum" not in state:
                state["second_momentum"] = torch.zeros(second_moment_shape(p.shape), dtype=torch.float32,
                                                       device=p.device)
            bufs.append(state["second_momentum"])
        v = u.square().mean(dim=red, keepdim=True)  # (N, R, 1) or (N, 1, C)
        for buf, vi in zip(bufs, v.unbind(0)):
            buf.lerp_(vi, 1 - beta2)
        scaled = u * torch.stack(bufs).clamp_min(1e-10).rsqrt()
        # Keep each matrix's Frobenius norm: only the split between rows (columns) changes.
        ratio = u.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
        return scaled * ratio


def second_moment_shape(shape: Iterable[int]) -> tuple[int, int]:
    """NorMuon's factored second moment of an (R, C) matrix: (R, 1) when R >= C, else (1, C)."""
    rows, cols = shape
    return (rows, 1) if rows >= cols else (1, cols)


def build_optimizer(model: nn.Module, **hyper: float) -> MuonAdamW:
    """`MuonAdamW(param_groups(model, **hyper))`."""
    return MuonAdamW(param_groups(model, **hyper))


def apply_schedule(opt: torch.optim.Optimizer, lr_multiplier: float, momentum: float | None = None) -> None:
    """Set every group's lr to initial_lr * lr_multiplier and, when given, the Muon groups' momentum."""
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * lr_multiplier
        if momentum is not None and group["kind"] == "muon":
            group["momentum"] = momentum


# ------------------------------------------------------------------------------- state, no pickle
def _state_shapes(group: dict[str, Any], shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The tensors a parameter of this shape may hold in this group's state, and their shapes."""
    if group["kind"] == "adamw":
        return {"exp_avg": shape, "exp_avg_sq": shape}
    return {"momentum_buffer": shape, "second_momentum": second_moment_shape(shape)}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def optimizer_state(opt: MuonAdamW) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta): state tensors named "{group}.{index}.{key}" (CPU, contiguous) for safetensors,
    and a JSON-able dict of every group's hyperparameters, parameter names and shapes, and per
    parameter its scalar state and the names of its tensors."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in opt.param_groups:
        hyper = {k: _jsonable(v) for k, v in group.items() if k not in _NOT_HYPER}
        names = group.get("param_names")
        params_meta = []
        for i, p in enumerate(group["params"]):
            entry: dict[str, Any] = {"name": names[i] if names else None, "shape": list(p.shape),
                                     "tensors": [], "scalars": {}}
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{group['name']}.{i}.{key}"] = value.detach().to("cpu").contiguous()
                    entry["tensors"].append(key)
                else:
                    entry["scalars"][key] = value
            params_meta.append(entry)
        groups.append({"hyper": hyper, "params": params_meta})
    return tensors, {"format": STATE_FORMAT, "groups": groups}


def load_optimizer_state(opt: MuonAdamW, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> None:
    """Restore what `optimizer_state` saved, exactly (hyperparameters included).

    Everything is checked before anything changes; a mismatch raises PoelmError naming `source` and
    the group, parameter or tensor that does not fit, with what was expected.
    """

    def fail(what: str) -> NoReturn:
        raise PoelmError(f"{source}: optimizer state does not fit: {what}")

    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != STATE_FORMAT:
        fail(f"format {fmt!r}, expected {STATE_FORMAT!r}")
    try:
        saved_groups = list(meta["groups"])
        theirs = [g["hyper"]["name"] for g in saved_groups]
        for g in saved_groups:
            for entry in g["params"]:
                absent = [k for k in ("name", "shape", "tensors", "scalars") if k not in entry]
                if absent:
                    raise KeyError(f"group {g['hyper']['name']!r} parameter entry lacks {absent}")
    except (KeyError, TypeError) as e:
        fail(f"malformed metadata ({type(e).__name__}: {e})")
    ours = [g["name"] for g in opt.param_groups]
    if ours != theirs:
        fail(f"groups {theirs}, expected this optimizer's {ours}")
    new_hyper: list[dict[str, Any]] = []
    new_state: list[tuple[torch.Tensor, dict[str, Any]]] = []
    used: set[str] = set()
    for group, saved in zip(opt.param_groups, saved_groups):
        gname, hyper = group["name"], saved["hyper"]
        expected_keys = sorted(k for k in group if k not in _NOT_HYPER)
        if sorted(hyper) != expected_keys:
            fail(f"group '{gname}' has hyperparameters {sorted(hyper)}, expected {expected_keys}")
        if hyper["kind"] != group["kind"]:
            fail(f"group '{gname}' is {hyper['kind']!r}, expected {group['kind']!r}")
        new_hyper.append({k: tuple(v) if isinstance(group[k], tuple) else v for k, v in hyper.items()})
        saved_params, names = saved["params"], group.get("param_names")
        if len(saved_params) != len(group["params"]):
            fail(f"group '{gname}' has {len(saved_params)} parameters, expected {len(group['params'])}")
        for i, (p, entry) in enumerate(zip(group["params"], saved_params)):
            label = f"group '{gname}' parameter {i}" + (f" '{names[i]}'" if names else "")
            if names and entry["name"] is not None and entry["name"] != names[i]:
                fail(f"{label}: saved as '{entry['name']}'")
            if list(entry["shape"]) != list(p.shape):
                fail(f"{label}: saved shape {entry['shape']}, expected {list(p.shape)}")
            allowed = _state_shapes(group, tuple(p.shape))
            state: dict[str, Any] = dict(entry["scalars"])
            for key in entry["tensors"]:
                tname = f"{gname}.{i}.{key}"
                if key not in allowed:
                    fail(f"tensor '{tname}': unknown state {key!r} for a {group['kind']} group, expected {sorted(allowed)}")
                if tname not in tensors:
                    fail(f"tensor '{tname}' is missing")
                t = tensors[tname]
                if tuple(t.shape) != allowed[key] or t.dtype != torch.float32:
                    fail(f"tensor '{tname}' is {t.dtype} {list(t.shape)}, expected torch.float32 {list(allowed[key])}")
                state[key] = t.to(p.device, copy=True)
                used.add(tname)
            new_state.append((p, state))
    extra = sorted(set(tensors) - used)
    if extra:
        fail(f"tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} belong to no parameter of this optimizer")
    # All checks passed: replace hyperparameters and state.
    for group, hyper in zip(opt.param_groups, new_hyper):
        group.update(hyper)
    opt.state.clear()
    for p, state in new_state:
        if state:
            opt.state[p] = state
