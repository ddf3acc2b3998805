"""LR and Muon-momentum schedules: shape, endpoints, rounding overlap, argument checks."""

import pytest

from poelm.core.errors import PoelmError
from poelm.train.schedule import lr_multiplier, muon_momentum


def curve(total, warmup, warmdown, final):
    return [lr_multiplier(s, total, warmup, warmdown, final) for s in range(total)]


def test_warmup_constant_warmdown_endpoints():
    lr = curve(100, 0.1, 0.5, 0.0)  # warmup steps 0-9, constant 10-49, warmdown 50-99
    assert lr[0] == pytest.approx(0.1)  # step 0 already trains
    assert lr[9] == 1.0 and all(v == 1.0 for v in lr[9:50])
    assert all(a < b for a, b in zip(lr[:10], lr[1:10]))  # strictly rising warmup
    assert lr[50] == pytest.approx(1 - 1 / 50)  # first warmdown step: one decrement below 1
    assert all(a > b for a, b in zip(lr[49:], lr[50:]))  # strictly falling warmdown
    assert lr[99] == 0.0  # the final trained step reaches final_lr_frac
    steps = [b - a for a, b in zip(lr[50:], lr[51:])]
    assert max(steps) - min(steps) < 1e-12  # linear


def test_final_lr_frac_and_no_ramps():
    assert curve(10, 0.0, 0.5, 0.1)[-1] == pytest.approx(0.1)
    assert curve(10, 0.0, 0.0, 0.0) == [1.0] * 10
    assert curve(1, 0.0, 1.0, 0.25) == [0.25]  # a one-step run: its only step is the final one
    assert curve(4, 1.0, 0.0, 0.0) == [0.25, 0.5, 0.75, 1.0]


def test_seed_schedule():
    """The seed's code stage: 2,131 steps, warmup 5% (107 steps), warmdown 90% (1,918 steps)."""
    lr = curve(2131, 0.05, 0.9, 0.0)
    assert lr[0] == pytest.approx(1 / 107) and lr[106] == 1.0
    assert lr[2131 - 1918 - 1] == 1.0 and lr[2131 - 1918] < 1.0
    assert lr[-1] == 0.0


def test_rounding_overlap_stays_continuous():
    # round(1.5) + round(1.5) = 4 > 3 steps: the ramps overlap; the minimum of the two is taken
    lr = curve(3, 0.5, 0.5, 0.0)
    assert lr == [pytest.approx(0.5), pytest.approx(0.5), 0.0]


@pytest.mark.parametrize("kwargs, name", [
    (dict(total_steps=0), "total_steps"),
    (dict(warmup_frac=-0.1), "warmup_frac"),
    (dict(warmup_frac=1.5), "warmup_frac"),
    (dict(warmdown_frac=2.0), "warmdown_frac"),
    (dict(final_lr_frac=1.5), "final_lr_frac"),
    (dict(warmup_frac=0.6, warmdown_frac=0.5), "warmdown_frac"),
    (dict(step=-1), "step"),
    (dict(step=100), "step"),
    (dict(step=1.5), "step"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    args = dict(step=0, total_steps=100, warmup_frac=0.1, warmdown_frac=0.5, final_lr_frac=0.0)
    args.update(kwargs)
    with pytest.raises(PoelmError, match=f"'{name}'"):
        lr_multiplier(**args)


def test_muon_momentum_warmup():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(10_000) == pytest.approx(0.95)
    assert muon_momentum(5, warmup_steps=0) == 0.95
    with pytest.raises(PoelmError, match="'step'"):
        muon_momentum(-1)
