"""`stage_loss_fraction`: every stage but the last scores a random subset of positions, scaled so the
loss and its gradient stay unbiased; the last stage is exact; F = 1 draws nothing; bad values fail."""

from __future__ import annotations

import pytest
import torch

from util import tiny_model


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 300, (2, 24), generator=g)
    y = x.roll(-1, 1)
    y[0, :3] = -1  # ignored targets stay ignored whichever positions are drawn
    return x, y


def test_the_loss_and_its_gradient_are_unbiased_and_the_last_stage_is_exact(batch):
    x, y = batch
    model = tiny_model(poe_mode="flat")
    weight = model.transformer.h[0].attn.c_q.weight  # a stage-0 matrix: its gradient comes from stage 0 only
    full = model(x, targets=y, loss_reduction="sum")
    full.loss.backward()
    want_grad, want = weight.grad.clone(), full.stage_losses.detach()
    losses, grads = [], []
    for seed in range(300):
        model.zero_grad()
        torch.manual_seed(seed)
        out = model(x, targets=y, loss_reduction="sum", stage_loss_fraction=0.25)
        out.loss.backward()
        assert torch.equal(out.stage_losses[-1].detach(), want[-1])  # the last stage: every position
        losses.append(float(out.stage_losses[0].detach()))
        grads.append(weight.grad.clone())
    losses_t = torch.tensor(losses)
    sem = float(losses_t.std()) / len(losses) ** 0.5
    assert float(losses_t.std()) > 0  # it does draw subsets
    assert abs(float(losses_t.mean()) - float(want[0])) < 4 * sem
    mean_grad = torch.stack(grads).mean(0)
    assert float((mean_grad - want_grad).norm() / want_grad.norm()) < 0.15  # 300 draws of a 1-in-4 subset
    assert float((grads[0] - want_grad).norm() / want_grad.norm()) > 0.15  # while one draw alone is off


def test_fraction_one_draws_nothing_and_bad_values_fail(batch):
    x, y = batch
    model = tiny_model(poe_mode="flat")
    state = torch.get_rng_state()
    a = model(x, targets=y, stage_loss_fraction=1.0).loss
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(a, model(x, targets=y).loss)
    model(x, targets=y, stage_loss_fraction=0.5)
    assert not torch.equal(torch.get_rng_state(), state)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="expected a fraction"):
            model(x, targets=y, stage_loss_fraction=bad)
    with pytest.raises(ValueError, match="flat training"):
        tiny_model(poe_mode="none")(x, targets=y, stage_loss_fraction=0.5)
    with pytest.raises(ValueError, match="flat training"):
        model(x, targets=y, stage_loss_fraction=0.5, fused_loss=False)
