"""MuonAdamW: one optimizer, two kinds of parameter group, kept off the model (nanochat's optim.py).
docs/training.md, "The optimizer", has the group table and the update rules step by step.

Design choices:
- Grouping reads parameter *names* (`param_groups`): every trainable parameter joins exactly one
  group, frozen ones none, and a trainable parameter that matches no rule is an error naming it, so a
  new parameter can never silently go untrained or get the wrong optimizer.
- AdamW is torch's decoupled AdamW operation for operation (bitwise equal for float32 parameters);
  Muon is Nesterov momentum, Polar Express orthogonalisation (arXiv:2505.16932), optional NorMuon
  (arXiv:2510.05491), nanochat's shape scale and decoupled weight decay, one group per matrix shape.
- Deterministic on CPU: fixed operation order, no atomics, no global state.
- No pickle: `optimizer_state` gives named CPU tensors plus JSON; `load_optimizer_state` checks
  everything against the live optimizer before changing anything, naming the file and what misfits.
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


def _group_key(name: str, p: torch.Tensor) -> str | None:
    """The group a trainable parameter joins, by its name (nanochat's rules): an AdamW group's name,
    "muon" for a block matrix (grouped by shape), None when no rule matches."""
    if name == "lm_head.weight" or name.startswith("stage_heads."):
        return "lm_head"
    if name == "specialist_head.weight":
        return "specialist_head"
    if name in ("resid_lambdas", "x0_lambdas"):
        return name
    if name == "transformer.wte.weight":
        return "wte"
    if name.startswith("value_embeds."):
        return "value_embeds"
    if name in ("smear_gate.weight", "smear_lambda", "backout_lambda"):
        return "smear"
    if name.startswith("transformer.h.") and p.ndim == 2:
        return "muon"
    return None


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
    """Every trainable parameter of `model` in exactly one group (docs/training.md, "The optimizer").

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
        key = _group_key(name, p)
        if key is None:
            raise PoelmError(f"parameter '{name}' {tuple(p.shape)} is trainable but matches no optimizer group "
                             "(expected: transformer.wte/h.*, lm_head, stage_heads.*, "
                             "specialist_head, value_embeds.*, resid/x0_lambdas, smear_*, backout_lambda; "
                             "freeze it or add a rule in poelm/train/optim.py)")
        if key == "muon":
            shape = tuple(p.shape)
            group = muon.setdefault(shape, dict(name="muon " + "x".join(map(str, shape)), kind="muon", params=[],
                                                param_names=[], lr=matrix_lr, initial_lr=matrix_lr, momentum=0.95,
                                                ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        else:
            group = adamw[key]
        group["params"].append(p)
        group["param_names"].append(name)
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

    saved_groups, theirs = _saved_groups(meta, fail)
    ours = [g["name"] for g in opt.param_groups]
    if ours != theirs:
        fail(f"groups {theirs}, expected this optimizer's {ours}")
    new_hyper: list[dict[str, Any]] = []
    new_state: list[tuple[torch.Tensor, dict[str, Any]]] = []
    used: set[str] = set()
    for group, saved in zip(opt.param_groups, saved_groups):
        new_hyper.append(_saved_hyper(group, saved["hyper"], fail))
        new_state += _saved_param_states(group, saved["params"], tensors, used, fail)
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


def _saved_groups(meta: Any, fail: Callable[[str], NoReturn]) -> tuple[list[dict[str, Any]], list[str]]:
    """The saved groups of `meta` and their names, after checking its format and every entry's keys."""
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != STATE_FORMAT:
        fail(f"format {fmt!r}, expected {STATE_FORMAT!r}")
    try:
        saved_groups = list(meta["groups"])
        names = [g["hyper"]["name"] for g in saved_groups]
        for g in saved_groups:
            for entry in g["params"]:
                absent = [k for k in ("name", "shape", "tensors", "scalars") if k not in entry]
                if absent:
                    raise KeyError(f"group {g['hyper']['name']!r} parameter entry lacks {absent}")
    except (KeyError, TypeError) as e:
        fail(f"malformed metadata ({type(e).__name__}: {e})")
    return saved_groups, names


def _saved_hyper(group: dict[str, Any], hyper: dict[str, Any], fail: Callable[[str], NoReturn]) -> dict[str, Any]:
    """A saved group's hyperparameters, checked against the live group's keys and kind."""
    gname = group["name"]
    expected_keys = sorted(k for k in group if k not in _NOT_HYPER)
    if sorted(hyper) != expected_keys:
        fail(f"group '{gname}' has hyperparameters {sorted(hyper)}, expected {expected_keys}")
    if hyper["kind"] != group["kind"]:
        fail(f"group '{gname}' is {hyper['kind']!r}, expected {group['kind']!r}")
    return {k: tuple(v) if isinstance(group[k], tuple) else v for k, v in hyper.items()}


def _saved_param_states(group: dict[str, Any], saved_params: list[dict[str, Any]], tensors: dict[str, torch.Tensor],
                        used: set[str], fail: Callable[[str], NoReturn]) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """(parameter, its saved state) for each parameter of a live group, every tensor checked; the
    names of the tensors taken are added to `used`."""
    gname, names = group["name"], group.get("param_names")
    if len(saved_params) != len(group["params"]):
        fail(f"group '{gname}' has {len(saved_params)} parameters, expected {len(group['params'])}")
    out = []
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
        out.append((p, state))
    return out
