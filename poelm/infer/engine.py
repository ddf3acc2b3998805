"""The generation engine: one prompt, KV-cached decoding, greedy or seeded sampling.

Design choices:
- One sequence at a time (batch 1): the CLI's `generate` and `chat` need nothing more, and the
  cached path stays obviously equal to the plain loop (tested: engine greedy == uncached argmax).
- Prefill the whole prompt in one forward into a fresh `KVCache`, then one forward of one token per
  new token; the model's contract is that chunked feeding equals one uncached forward.
- The last sampled token is never fed back: once generation ends its logits would be thrown away.
- Sampling order follows transformers' `generate`: repetition penalty on the raw logits (exactly
  `RepetitionPenaltyLogitsProcessor`, also under greedy), then temperature, top-k, top-p, then
  `torch.multinomial`. `temperature == 0` is greedy argmax (top-k/top-p cannot change the argmax).
- The only randomness is one `torch.Generator` seeded by `SamplingParams.seed`, created per call:
  the same prompt and params give the same tokens, whatever else ran before.
- Stop tokens (`<|assistant_end|>`, `<|bos|>` by default) are yielded, then generation ends, so the
  caller sees why it stopped; the CLI does not print them. Generation also ends at
  `max_new_tokens` or when prompt + generated reaches `config.sequence_len` (rotary and windows
  are only trained that far); a prompt that leaves no room is a `PoelmError`.
- Every forward runs under its own `torch.inference_mode()`: holding one across `yield`s would leak
  inference mode into the caller's code between tokens.
- Stats (`Engine.last_stats`) are recorded in a `finally`, so a stream the caller stops early
  (closes) still reports what it produced.
- One request check for every decoder (`check_request`: prompt ids in the vocabulary, room left in
  the context, `max_new_tokens >= 1`, the exit stage and the predictor `output`), and one predictor:
  every decoder decodes what `PoEGPT.predictor` gives for its `output` (the model's `poe_output`
  unless the caller names one), so speculative, adaptive and composed decoding produce what the
  engine produces for the same request.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..core.config import POE_OUTPUTS
from ..core.errors import PoelmError
from ..core.model import KVCache


@dataclass
class SamplingParams:
    """How to pick each next token. `temperature == 0` is greedy; the others are off at their defaults."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0

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
        if not is_int(self.seed):
            fail("seed", "an integer")


@dataclass
class GenerationStats:
    """What the last `stream`/`generate` call did; `seconds` covers prefill and decoding."""

    prompt_tokens: int
    generated_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


# ---- logits processors (each takes and returns (V,) float32 scores of one position) ------------

def apply_repetition_penalty(scores: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: for each id in `seen_ids` (duplicates are fine),
    a negative score is multiplied by `penalty`, any other divided by it (CTRL, Keskar et al. 2019)."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return scores
    picked = scores.gather(-1, seen_ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(-1, seen_ids, picked)


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
    drop_sorted = before >= p  # the set already reached p without this token; the top one is never dropped
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def sample_next(scores: torch.Tensor, seen_ids: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None) -> int:
    """One next-token id from (V,) float32 scores; `seen_ids` are prompt + generated ids so far."""
    scores = apply_repetition_penalty(scores.float(), seen_ids, params.repetition_penalty)
    if params.temperature == 0:
        return int(scores.argmax(dim=-1))
    scores = scores / params.temperature
    if params.top_k is not None:
        scores = top_k_filter(scores, params.top_k)
    if params.top_p is not None:
        scores = top_p_filter(scores, params.top_p)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---- the request check every decoder shares -------------------------------------------------------

def check_request(config: Any, prompt_ids: list[int], max_new_tokens: int, exit_stage: int | None = None,
                  output: str | None = None) -> None:
    """Raise PoelmError unless a decoder can serve this request on a model with `config`."""
    if exit_stage is not None and (isinstance(exit_stage, bool) or not isinstance(exit_stage, int)
                                   or not 0 <= exit_stage < config.n_stages):
        raise PoelmError(f"exit_stage={exit_stage!r}: this model has stages 0..{config.n_stages - 1}")
    if output is not None and output not in POE_OUTPUTS:
        raise PoelmError(f"output={output!r}: expected one of {', '.join(POE_OUTPUTS)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PoelmError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
    if not prompt_ids:
        raise PoelmError("prompt: no tokens; expected at least one (e.g. <|bos|>)")
    bad = [i for i in prompt_ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < config.vocab_size]
    if bad:
        raise PoelmError(f"prompt: token ids {bad[:5]} are not in [0, {config.vocab_size})")
    if len(prompt_ids) >= config.sequence_len:
        raise PoelmError(f"prompt: {len(prompt_ids)} tokens leave no room to generate within the model's "
                         f"sequence_len {config.sequence_len}")


# ---- the engine -----------------------------------------------------------------------------------

class Engine:
    """KV-cached generation for one `PoEGPT`.

    `tokenizer` supplies the default stop ids (`<|assistant_end|>`, `<|bos|>`); `stop_ids` overrides
    them (a test can pass a set and no tokenizer). `output` names the predictor decoded ("last" or
    "logop"; default: the model's `poe_output`). `last_stats` describes the last call.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any | None = None, *,
                 stop_ids: set[int] | None = None, output: str | None = None):
        self.model = model
        self.config = model.config
        if output is not None and output not in POE_OUTPUTS:
            raise PoelmError(f"output={output!r}: expected one of {', '.join(POE_OUTPUTS)}")
        self.output = output or model.config.poe_output
        if stop_ids is None:
            stop_ids = set() if tokenizer is None else {tokenizer.token_id("assistant_end"), tokenizer.bos_id}
        self.stop_ids: frozenset[int] = frozenset(int(i) for i in stop_ids)
        self.last_stats: GenerationStats | None = None

    def _logits(self, ids: torch.Tensor, cache: KVCache, exit_stage: int | None) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(ids, cache=cache, exit_stage=exit_stage, output=self.output).logits[0, -1].float()

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None,
               exit_stage: int | None = None) -> Iterator[int]:
        """Yield generated token ids one by one (a stop token is yielded, then the stream ends)."""
        params = params or SamplingParams()
        prompt_ids = list(prompt_ids)
        check_request(self.config, prompt_ids, params.max_new_tokens, exit_stage)  # errors before the first next()
        return self._stream(prompt_ids, params, exit_stage)

    def _stream(self, prompt_ids: list[int], params: SamplingParams, exit_stage: int | None) -> Iterator[int]:
        device = next(self.model.parameters()).device
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        t0, n = time.perf_counter(), 0
        seen = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # (T,): for the repetition penalty
        try:
            cache = KVCache()
            logits = self._logits(seen[None], cache, exit_stage)  # prefill, (V,)
            while True:
                with torch.inference_mode():
                    token = sample_next(logits, seen, params, generator)
                n += 1
                yield token
                if (token in self.stop_ids or n >= params.max_new_tokens
                        or len(prompt_ids) + n >= self.config.sequence_len):
                    return
                step = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)
                seen = torch.cat([seen, step[0]])
                logits = self._logits(step, cache, exit_stage)
        finally:
            self.last_stats = GenerationStats(len(prompt_ids), n, time.perf_counter() - t0)

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                 exit_stage: int | None = None) -> list[int]:
        """All of `stream`'s tokens as a list (a final stop token included)."""
        return list(self.stream(prompt_ids, params, exit_stage))
