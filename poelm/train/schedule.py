"""Learning-rate and Muon-momentum schedules: pure functions of the step, no state.
docs/training.md, "The schedule", draws the shape and its endpoints.

Design choices:
- Nothing here touches an optimizer (`optim.apply_schedule` does), so a schedule is testable alone.
- Steps are 0-based; nanochat's shape (linear warmup, constant, linear warmdown to `final_lr_frac`),
  warmup starting at 1/warmup and warmdown ending exactly at `final_lr_frac` on the last trained step.
- Bad arguments, and a step outside the run, raise `PoelmError` naming the argument and the range
  (a silent clamp would hide an off-by-one in the loop).
"""

from __future__ import annotations

from ..core.errors import PoelmError


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PoelmError(f"schedule argument '{name}' = {value!r}: expected an integer >= {low}")


def _check_frac(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise PoelmError(f"schedule argument '{name}' = {value!r}: expected a number in [0, 1]")


def lr_multiplier(step: int, total_steps: int, warmup_frac: float, warmdown_frac: float,
                  final_lr_frac: float) -> float:
    """The factor on every group's `initial_lr` at 0-based `step` of a `total_steps` run.

    Warmup (step + 1) / warmup over the first round(warmup_frac * total_steps) steps, then 1, then a
    linear warmdown over the last round(warmdown_frac * total_steps) steps ending at `final_lr_frac`
    on step total_steps - 1.
    """
    _check_int("total_steps", total_steps, 1)
    _check_frac("warmup_frac", warmup_frac)
    _check_frac("warmdown_frac", warmdown_frac)
    _check_frac("final_lr_frac", final_lr_frac)
    if warmup_frac + warmdown_frac > 1.0 + 1e-12:
        raise PoelmError(f"schedule arguments 'warmup_frac' + 'warmdown_frac' = {warmup_frac} + {warmdown_frac}: "
                         "expected a sum <= 1")
    _check_int("step", step, 0)
    if step >= total_steps:
        raise PoelmError(f"schedule argument 'step' = {step}: expected < total_steps = {total_steps} "
                         "(steps are 0-based)")
    warmup = round(warmup_frac * total_steps)
    warmdown = round(warmdown_frac * total_steps)
    up = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    down = 1.0
    start_down = total_steps - warmdown  # first warmdown step
    if warmdown > 0 and step >= start_down:
        progress = (step - start_down + 1) / warmdown  # 1/warmdown .. 1 (the final step)
        down = 1.0 - progress * (1.0 - final_lr_frac)
    return min(up, down)


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """nanochat's Muon momentum warmup: linear from `start` at step 0 to `end` at `warmup_steps`, then `end`."""
    _check_int("step", step, 0)
    _check_int("warmup_steps", warmup_steps, 0)
    _check_frac("start", start)
    _check_frac("end", end)
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end
