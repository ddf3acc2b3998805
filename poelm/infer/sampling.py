"""How the next token is picked from a predictor's scores: transformers' order (repetition penalty,
temperature, top-k, top-p), greedy at temperature 0, every admitted value numerically safe, and no
randomness but the caller's generator (docs/inference.md §3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import PoelmError
from ..common.options import option


SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # torch.Generator.manual_seed's range (a 64-bit seed, signed or not)


@dataclass
class SamplingParams:
    """How to pick each next token. `temperature == 0` is greedy; the others are off at their defaults."""

    max_new_tokens: int = option(64, "tokens to generate at most", resume=None)
    temperature: float = option(0.0, "0: greedy", resume=None)
    top_k: int | None = option(None, "sample among the K most likely tokens", metavar="K", resume=None)
    top_p: float | None = option(None, "nucleus: the fewest tokens with probability >= P", metavar="P", resume=None)
    repetition_penalty: float = option(1.0, "transformers' semantics (1: off)", resume=None)
    seed: int = option(0, "the seed of the sampling generator", resume=None)

    def __post_init__(self) -> None:
        def fail(field: str, expected: str) -> None:
            raise PoelmError(f"SamplingParams.{field}={getattr(self, field)!r}: expected {expected}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            fail("max_new_tokens", "an integer >= 1")
        if not is_real(self.temperature) or self.temperature < 0:
            fail("temperature", "a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            fail("top_k", "None or an integer >= 1")
        if self.top_p is not None and (not is_real(self.top_p) or not 0 < self.top_p <= 1):
            fail("top_p", "None or a number in (0, 1]")
        if not is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "a finite number > 0 (1 = off)")
        if not is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX:
            fail("seed", f"an integer in [{SEED_MIN}, {SEED_MAX}] (what torch.Generator.manual_seed takes)")


# ---- logits processors (each takes and returns (V,) float32 scores of one position) ------------

def apply_repetition_penalty(scores: torch.Tensor, seen_ids: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: for each id in `seen_ids` (duplicates are fine),
    a negative score is multiplied by `penalty`, any other divided by it (CTRL, Keskar et al. 2019)."""
    if penalty == 1.0 or seen_ids is None or seen_ids.numel() == 0:
        return scores
    picked = scores.gather(-1, seen_ids)
    # a 0 stays 0 (transformers divides it, and 0 / a penalty that rounds to 0 in float32 is a nan)
    picked = torch.where(picked < 0, picked * penalty, torch.where(picked > 0, picked / penalty, picked))
    return scores.scatter(-1, seen_ids, picked)


def tempered(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., V) scores at `temperature` > 0, shifted so that their max is 0: `(s - max) / t`, the same
    distribution under softmax as `s / t` but never +inf or nan for any t > 0 (see the module docstring).
    The argmax(es) are exactly 0 (also where the max is +inf), every other score is < 0 or -inf."""
    top = scores.max(dim=-1, keepdim=True).values
    shifted = torch.where(scores == top, 0.0, scores - top)  # (..., V) <= 0; +inf - +inf would be nan
    t = min(temperature, torch.finfo(scores.dtype).max)  # a t that rounds to inf: -inf / inf is nan
    return torch.where(shifted == 0, 0.0, shifted / t)  # a t that rounds to 0: 0 / 0 is nan, the limit 0


def tempered_probs(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """The tempered distribution softmax(scores / t) over the last dim, computed safely (`tempered`)."""
    return torch.softmax(tempered(scores, temperature), dim=-1)


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores (ties at the k-th value kept too), the rest -inf."""
    if k >= scores.size(-1):
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus (Holtzman et al. 2020): keep the smallest set of highest-probability tokens whose
    cumulative probability is >= p, never fewer than one; the rest -inf."""
    if p >= 1.0:  # keep all: the cumulative sum's rounding could otherwise drop tail tokens
        return scores
    probs, order = torch.softmax(scores, dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
    drop_sorted = before >= p  # the set already reached p without this token
    drop_sorted[..., 0] = False  # never the top one, even where p rounds to 0 in float32 (5e-324)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def sample_next(scores: torch.Tensor, seen_ids: torch.Tensor | None, params: SamplingParams,
                generator: torch.Generator | None) -> int:
    """One next-token id from (V,) float32 scores; `seen_ids` are prompt + generated ids so far (only
    the repetition penalty reads them: None without one)."""
    scores = apply_repetition_penalty(scores.float(), seen_ids, params.repetition_penalty)
    if params.temperature == 0:
        return int(scores.argmax(dim=-1))
    scores = tempered(scores, params.temperature)
    if params.top_k is not None:
        scores = top_k_filter(scores, params.top_k)
    if params.top_p is not None:
        scores = top_p_filter(scores, params.top_p)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
