"""MuonAdamW and its grouping: coverage, LRs, Polar Express, AdamW parity, training, pickle-free state."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from poelm.core.config import PoEConfig
from poelm.core.errors import PoelmError
from poelm.core.model import Linear, PoEGPT
from poelm.train.optim import (MuonAdamW, apply_schedule, build_optimizer, load_optimizer_state, optimizer_state,
                         orthogonalize, param_groups)
from poelm.train.schedule import lr_multiplier, muon_momentum

from util import tiny_model

SCALE_1536 = 0.7071067811865476  # (1536 / 768) ** -0.5
# Polar Express, 5 steps: every singular value s of X / (1.02 ||X||_F) with s >= 1e-3 maps into this
# band (measured: 0.85883 .. 1.14113 on a fine grid of s in [1e-3, 1], and on the matrices below).
BAND = (0.8588, 1.1412)


def batch(step: int, seed: int = 0, b: int = 2, t: int = 32):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    x = torch.randint(0, 300, (b, t), generator=g)
    return x, torch.roll(x, -1, dims=1)


def train(model, opt, steps, start=0, total=6):
    """`steps` steps of the trainer's loop: schedule, forward, backward, step."""
    for step in range(start, start + steps):
        apply_schedule(opt, lr_multiplier(step, total, 0.3, 0.5, 0.1), muon_momentum(step, warmup_steps=4))
        x, y = batch(step)
        model(x, targets=y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------- grouping
def test_every_trainable_parameter_in_exactly_one_group():
    model = tiny_model(poe_stage_heads=True)
    groups = param_groups(model)
    named = dict(model.named_parameters())
    placed = [(n, p) for g in groups for n, p in zip(g["param_names"], g["params"])]
    assert sorted(n for n, _ in placed) == sorted(named)
    assert all(named[n] is p for n, p in placed)  # names line up with params
    by_name = {g["name"]: g for g in groups}
    assert by_name["lm_head"]["param_names"] == ["lm_head.weight", "stage_heads.0.weight", "stage_heads.1.weight"]
    assert set(by_name["smear"]["param_names"]) == {"smear_gate.weight", "smear_lambda", "backout_lambda"}
    muon = [g for g in groups if g["kind"] == "muon"]
    assert [g["name"] for g in muon] == ["muon 2x12", "muon 32x64", "muon 64x64", "muon 64x256", "muon 256x64"]
    for g in muon:  # one shape per group, and every 2-D block matrix (ve_gate included) is in one
        assert len({tuple(p.shape) for p in g["params"]}) == 1
    muon_names = {n for g in muon for n in g["param_names"]}
    assert muon_names == {n for n, p in named.items() if n.startswith("transformer.h.") and p.ndim == 2}
    assert all(g["initial_lr"] == g["lr"] for g in groups)


def test_frozen_parameters_excluded_and_stage_head_group():
    model = tiny_model()
    model.specialist_head = Linear(64, model.config.padded_vocab_size)  # the specialist's additive head
    for name, p in model.named_parameters():  # freeze the "base": everything but layer 3 and the head
        p.requires_grad = name == "specialist_head.weight" or name.startswith("transformer.h.3.")
    groups = param_groups(model, stage_head_lr=1e-4, stage_head_weight_decay=0.1)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert [g["name"] for g in groups][0] == "specialist_head"  # empty groups (wte, lm_head, ...) omitted
    head = groups[0]
    assert head["lr"] == 1e-4 and head["weight_decay"] == 0.1 and head["betas"] == (0.8, 0.96)  # not scaled


def test_unmatched_trainable_parameter_is_named():
    model = tiny_model()
    model.mystery = nn.Parameter(torch.zeros(3))
    with pytest.raises(PoelmError, match="'mystery'"):
        param_groups(model)
    model.mystery.requires_grad = False  # frozen: not the optimizer's business
    param_groups(model)


def test_group_table_and_adamw_scale_at_1536():
    with torch.device("meta"):
        model = PoEGPT(PoEConfig(n_layer=2, n_head=12, n_kv_head=12, n_embd=1536, vocab_size=1024))
    g = {x["name"]: x for x in param_groups(model, weight_decay=0.2)}
    approx = pytest.approx
    assert g["lm_head"]["lr"] == approx(0.004 * SCALE_1536) and g["lm_head"]["betas"] == (0.8, 0.96)
    assert g["wte"]["lr"] == approx(0.2 * SCALE_1536) and g["wte"]["betas"] == (0.8, 0.995)
    assert g["value_embeds"]["lr"] == approx(0.1 * SCALE_1536) and g["value_embeds"]["weight_decay"] == 0.01
    assert (g["lm_head"]["weight_decay"], g["wte"]["weight_decay"]) == (0.01, 0.001)
    assert g["resid_lambdas"]["lr"] == approx(0.005) and g["resid_lambdas"]["weight_decay"] == 0.05
    assert g["x0_lambdas"]["lr"] == 0.5 and g["x0_lambdas"]["betas"] == (0.96, 0.95)
    assert g["smear"]["lr"] == 0.2 and g["smear"]["weight_decay"] == 0.0
    assert all(x["eps"] == 1e-10 for x in g.values() if x["kind"] == "adamw")
    muon = g["muon 1536x1536"]
    assert (muon["lr"], muon["momentum"], muon["ns_steps"], muon["beta2"], muon["weight_decay"]) == (0.02, 0.95, 5, 0.95, 0.2)
    assert set(g) == {"lm_head", "wte", "value_embeds", "resid_lambdas", "x0_lambdas", "smear",
                      "muon 12x12", "muon 1536x1536", "muon 1536x6144", "muon 6144x1536"}


# ---------------------------------------------------------------------------------- Polar Express
def spectrum(shape, low, seed=0):
    """A float32 (R, C) matrix with singular values log-spaced from 1 down to `low`, and its U, V."""
    g = torch.Generator().manual_seed(seed)
    r = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], r, generator=g, dtype=torch.float64))
    s = torch.logspace(0, torch.log10(torch.tensor(low)).item(), r, dtype=torch.float64)
    return ((u * s) @ v.T).float(), u, v


@pytest.mark.parametrize("shape", [(64, 64), (192, 48), (48, 192), (12, 2)])
def test_orthogonalize_singular_values_near_one(shape):
    x, u, v = spectrum(shape, 1e-2)  # smallest s / (1.02 ||X||_F) ~ 4e-3 here: inside the converged range
    o = orthogonalize(x)
    assert o.shape == x.shape and o.dtype == torch.float32
    s = torch.linalg.svdvals(o.double())
    assert BAND[0] <= s.min() and s.max() <= BAND[1], (s.min().item(), s.max().item())
    # Only the singular values move: o = U diag(p(s)) V^T with the input's singular vectors.
    core = u.T @ o.double() @ v
    assert torch.allclose(core, torch.diag(torch.diagonal(core)), atol=2e-4)
    # A random Gaussian matrix: tall and wide ones are well conditioned and land in the band;
    # a square one has singular values near 0 that are (by design) not pushed all the way to 1.
    s = torch.linalg.svdvals(orthogonalize(torch.randn(shape, generator=torch.Generator().manual_seed(1))).double())
    assert s.max() <= BAND[1]
    if shape[0] != shape[1]:
        assert BAND[0] <= s.min()


def test_orthogonalize_batched_matches_single_and_zero_is_safe():
    x = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(2))
    o = orthogonalize(x)
    assert all(torch.allclose(o[i], orthogonalize(x[i]), atol=1e-6) for i in range(3))
    assert torch.equal(orthogonalize(torch.zeros(8, 4)), torch.zeros(8, 4))


# ---------------------------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_step_equals_torch_adamw(wd):
    g = torch.Generator().manual_seed(3)
    init = torch.randn(7, 5, generator=g)
    grads = [torch.randn(7, 5, generator=g) for _ in range(5)]
    ours, ref = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    hyper = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=wd)
    opt = MuonAdamW([dict(name="a", kind="adamw", params=[ours], initial_lr=0.01, **hyper)])
    torch_opt = torch.optim.AdamW([ref], foreach=False, **hyper)  # torch: p *= 1 - lr * wd, then Adam
    for grad in grads:
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
        assert torch.equal(ours, ref)  # the same operations in the same order: bitwise
    assert opt.state[ours]["step"] == 5
    assert torch.equal(opt.state[ours]["exp_avg_sq"], torch_opt.state[ref]["exp_avg_sq"])


# ----------------------------------------------------------------------------------------- Muon
def reference_muon(p, grads, momenta, lr, wd, beta2):
    """Muon written out for one matrix, step by step, from the module docstring."""
    p, buf = p.clone(), torch.zeros_like(p)
    rows, cols = p.shape
    v = torch.zeros((rows, 1) if rows >= cols else (1, cols))
    for g, mu in zip(grads, momenta):
        buf = torch.lerp(buf, g, 1 - mu)
        u = orthogonalize(torch.lerp(g, buf, mu)[None])[0]
        if beta2 is not None:
            v = torch.lerp(v, u.square().mean(dim=-1 if rows >= cols else -2, keepdim=True), 1 - beta2)
            scaled = u / v.sqrt()
            u = scaled * (u.norm() / scaled.norm())
        p = p * (1 - lr * wd) - lr * max(1, rows / cols) ** 0.5 * u
    return p


@pytest.mark.parametrize("shape, beta2", [((48, 16), 0.95), ((16, 48), 0.95), ((32, 32), None)])
def test_muon_matches_reference_with_per_step_momentum(shape, beta2):
    g = torch.Generator().manual_seed(4)
    init = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) for _ in range(4)]
    momenta = [0.85, 0.9, 0.95, 0.0]
    p = nn.Parameter(init.clone())
    opt = MuonAdamW([dict(name="m", kind="muon", params=[p], lr=0.02, initial_lr=0.02, momentum=0.5,
                          ns_steps=5, beta2=beta2, weight_decay=0.1)])
    for grad, mu in zip(grads, momenta):
        apply_schedule(opt, 1.0, mu)  # the momentum is read from the group on every step
        p.grad = grad.clone()
        opt.step()
    assert torch.allclose(p, reference_muon(init, grads, momenta, 0.02, 0.1, beta2), atol=1e-6)


def test_normuon_first_step_equalises_rows():
    """After step 1 the EMA is proportional to this step's statistic: every row (tall) / column (wide)
    of the update gets the same norm, and the update keeps the orthogonalised matrix's Frobenius norm."""
    for shape, dim in (((48, 16), 1), ((16, 48), 0)):
        init = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(6))
        p = nn.Parameter(init.clone())
        opt = MuonAdamW([dict(name="m", kind="muon", params=[p], lr=1.0, initial_lr=1.0, momentum=0.95,
                              ns_steps=5, beta2=0.95, weight_decay=0.0)])
        p.grad = grad
        opt.step()
        update = (init - p.detach()) / max(1, shape[0] / shape[1]) ** 0.5
        norms = update.norm(dim=dim)
        assert norms.max() / norms.min() < 1 + 1e-4
        assert update.norm() == pytest.approx(orthogonalize(grad).norm().item(), rel=1e-5)


# ------------------------------------------------------------------------------- on a tiny model
def test_training_reduces_loss_and_is_deterministic():
    def run():
        model = tiny_model(poe_stage_heads=True)
        opt = build_optimizer(model)
        x, y = batch(0)
        losses = []
        for _ in range(6):
            loss = model(x, targets=y).loss
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return losses, model

    losses, model = run()
    assert losses[-1] < 0.5 * losses[0], losses
    again_losses, again = run()
    assert losses == again_losses
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_state_round_trip_resumes_bit_for_bit(tmp_path):
    reference = tiny_model(poe_stage_heads=True)
    train(reference, build_optimizer(reference), 6)

    model = tiny_model(poe_stage_heads=True)
    opt = build_optimizer(model)
    train(model, opt, 3)
    tensors, meta = optimizer_state(opt)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    (tmp_path / "optimizer.json").write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))

    resumed = tiny_model(poe_stage_heads=True, seed=5)  # a different init: the weights come from the file
    resumed.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    opt2 = build_optimizer(resumed, matrix_lr=0.5, embedding_lr=9.0)  # hyperparameters come from the file too
    load_optimizer_state(opt2, load_file(str(tmp_path / "optimizer.safetensors")),
                         json.loads((tmp_path / "optimizer.json").read_text()), source="optimizer.safetensors")
    assert [g["initial_lr"] for g in opt2.param_groups] == [g["initial_lr"] for g in opt.param_groups]
    assert opt2.param_groups[0]["betas"] == (0.8, 0.96)  # tuples come back as tuples
    train(resumed, opt2, 3, start=3)
    for (name, a), b in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_torch_state_dict_still_works():
    model = tiny_model()
    opt = build_optimizer(model)
    train(model, opt, 1)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["lm_head.weight"]
    opt2 = build_optimizer(model)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["param_names"] == ["lm_head.weight"]


def test_empty_state_round_trip(tmp_path):
    opt = build_optimizer(tiny_model())
    tensors, meta = optimizer_state(opt)
    assert tensors == {}
    save_file(tensors, str(tmp_path / "o.safetensors"))
    load_optimizer_state(opt, load_file(str(tmp_path / "o.safetensors")), json.loads(json.dumps(meta)), "o.safetensors")


@pytest.fixture(scope="module")
def saved():
    model = tiny_model()
    opt = build_optimizer(model)
    train(model, opt, 1)
    tensors, meta = optimizer_state(opt)
    return tensors, json.loads(json.dumps(meta))


def test_load_errors_name_the_source_and_what_does_not_fit(saved):
    tensors, meta = saved

    def load(opt, t=tensors, m=meta):
        load_optimizer_state(opt, dict(t), json.loads(json.dumps(m)), source="run/optimizer_rank0.safetensors")

    # different groups: a model whose embedding is frozen has no 'wte' group
    frozen = tiny_model()
    frozen.transformer.wte.weight.requires_grad = False
    with pytest.raises(PoelmError, match=r"run/optimizer_rank0\.safetensors: .*groups .*'wte'"):
        load(build_optimizer(frozen))
    # same groups, different shapes: a larger vocabulary
    with pytest.raises(PoelmError, match=r"rank0\.safetensors: .*group 'lm_head' parameter 0 'lm_head.weight'.*\[320, 64\]"):
        load(build_optimizer(tiny_model(vocab_size=400)))
    opt = build_optimizer(tiny_model())
    # a missing tensor
    missing = {k: v for k, v in tensors.items() if k != "wte.0.exp_avg"}
    with pytest.raises(PoelmError, match=r"rank0\.safetensors: .*'wte\.0\.exp_avg' is missing"):
        load(opt, t=missing)
    # a mis-shaped tensor
    bad = dict(tensors, **{"muon 64x64.1.momentum_buffer": torch.zeros(64, 65)})
    with pytest.raises(PoelmError, match=r"'muon 64x64\.1\.momentum_buffer' is torch.float32 \[64, 65\], expected"):
        load(opt, t=bad)
    # a tensor that belongs to nothing
    with pytest.raises(PoelmError, match=r"'wte\.7\.exp_avg'.*belong to no parameter"):
        load(opt, t=dict(tensors, **{"wte.7.exp_avg": torch.zeros(1)}))
    # not this format
    with pytest.raises(PoelmError, match="rank0.safetensors: .*format"):
        load(opt, m={"groups": []})
    # a failed load changed nothing: the optimizer is still fresh
    assert not opt.state and opt.param_groups[1]["lr"] == opt.param_groups[1]["initial_lr"]
