"""Self-speculative decoding: draft with an early stage, verify with the whole model.

Design choices:
- No extra parameters: stage S of the same model is the draft. The draft decodes what the engine
  decodes with `exit_stage=S` (the model's predictor over stages 0..S: stage S, or the Log-OP of
  0..S under `poe_output="logop"`); the verifier decodes what the engine decodes at full depth.
- Each round drafts k tokens one at a time through layers 0..end(S) only (into the shared KV cache),
  then verifies all k in ONE pass of the deeper layers that reuses what drafting computed: the
  draft's keys and values for layers up to end(S) stay in the cache, and the draft's walks (the
  residual, the embedding mix `x0`, the backout residual, their rotary positions) are the deeper
  layers' input. Nothing of the shallow part runs twice. All of it is the model's own layer walk
  (`PoEGPT.begin/run_layers/readout/predictor`).
- k = min(K, tokens still wanted, room left in the context): near `sequence_len` or the end of the
  budget rounds shrink, so the output is as long as the engine's (the engine stops when prompt +
  output reaches `sequence_len`).
- Acceptance (greedy): the longest prefix of drafts that equals the full model's argmax is kept, plus
  the full model's token at the first mismatch. Every emitted token is the full model's argmax given
  the tokens before it — computed over a k-row block instead of one row per token. In float32 the
  two agree except where the top two logits are within float32 rounding (never seen in the tests,
  which compare with the engine token for token); in bfloat16 near-ties are common and the outputs
  can part at such a position, after which both continue correctly from different prefixes
  (`benchmarks/decode.py` reports the agreement).
- Rollback: `PoEGPT.rollback` crops the cache to the accepted inputs and resets the smear's previous
  embedding to the last accepted input's.
- Sampling (temperature > 0): the speculative sampling rule (Leviathan et al., Chen et al.): draft
  d ~ q (the draft's tempered distribution), accept it with probability min(1, p(d) / q(d)) where p is
  the full model's, otherwise emit a sample of normalise(max(p - q, 0)) and end the round. Every
  emitted token is then distributed exactly as the full model's sampling (tested statistically).
  One generator per call, seeded from the params, drives drafts, acceptances and resamples. It takes
  the temperature only (top-k, top-p and the repetition penalty would change p and q per position).
- The decoder protocol (decoder.py); stats (accumulated over calls) report acceptance (accepted /
  drafted) and tokens per verification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import PoelmError
from ..core.model import KVCache, PoEGPT, Walk
from .decoder import Decoder
from .engine import Engine
from .sampling import SamplingParams


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, draft: int,
                       generator: torch.Generator) -> tuple[bool, int]:
    """One step of the speculative sampling rule: (accepted, token). p, q: (vocab,) probabilities."""
    u = torch.rand((), generator=generator, device=p.device)
    if float(u) * float(q[draft]) <= float(p[draft]):  # u <= p/q without dividing by a tiny q
        return True, draft
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    if float(total) <= 0:  # p == q up to rounding: any rejection then is a rounding artefact
        residual, total = p, p.sum()
    return False, int(torch.multinomial(residual / total, 1, generator=generator))


class SpeculativeStats:
    """Counts over every round a decoder ran."""

    def __init__(self) -> None:
        self.rounds = self.drafted = self.accepted = self.emitted = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verification(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0


@dataclass
class Draft:
    """One drafted position: its token, its walk at the draft boundary, the draft stages' logits
    (1, vocab) each, and (sampling) the draft's distribution q."""

    token: int
    walk: Walk
    logits: list[torch.Tensor]
    q: torch.Tensor | None


class SpeculativeDecoder(Decoder):
    """Self-speculative decoding of `model`, drafting up to `k` tokens per round with `draft_stage`."""

    def __init__(self, model: PoEGPT, draft_stage: int, k: int, stop_ids: set[int] | None = None,
                 output: str | None = None, tokenizer=None):
        super().__init__(model, tokenizer, stop_ids=stop_ids, output=output)
        c = model.config
        if isinstance(draft_stage, bool) or not isinstance(draft_stage, int) or not 0 <= draft_stage < c.n_stages - 1:
            raise PoelmError(f"--draft-stage {draft_stage}: expected a stage in 0..{c.n_stages - 2} "
                             f"(an earlier stage than the last of {c.n_stages})")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PoelmError(f"--speculative {k}: expected at least one draft token per round")
        self.stage, self.k = draft_stage, k
        self.name = f"speculative S={draft_stage} K={k}"
        self.draft_reads = model.readout_stages(draft_stage, self.output)  # the draft's predictor
        self.full_reads = model.readout_stages(c.n_stages - 1, self.output)  # the verifier's
        self.stats = SpeculativeStats()
        self.temperature, self.generator = 0.0, None  # of the call in progress

    @classmethod
    def check_params(cls, params: SamplingParams) -> None:
        if params.top_k is not None or params.top_p is not None or params.repetition_penalty != 1:
            raise PoelmError("speculative decoding takes --temperature only (greedy at 0, else the speculative "
                             "sampling rule): drop --top-k, --top-p and --repetition-penalty")

    def describe(self) -> str:
        return (f"{self.name}: acceptance {self.stats.acceptance:.1%}, "
                f"{self.stats.tokens_per_verification:.2f} tokens per verification")

    def _choose(self, scores: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """A token from (vocab,) scores: argmax, or a sample of the tempered distribution (returned too)."""
        if self.temperature > 0:
            probs = torch.softmax(scores / self.temperature, dim=-1)
            return int(torch.multinomial(probs, 1, generator=self.generator)), probs
        return int(scores.argmax()), None

    def _draft_step(self, token: int, cache: KVCache) -> Draft:
        """One token through the draft stages: the draft's choice and everything verification reuses."""
        m, ends = self.model, self.model.config.stage_ends
        walk = m.begin(torch.tensor([[token]], device=self.device), cache)
        logits = []
        for k in range(self.stage + 1):
            walk = m.run_layers(walk, ends[k] + 1, cache)
            if k in self.draft_reads:
                logits.append(m.readout(walk, k)[0])  # (1, vocab)
        choice, q = self._choose(m.predictor(logits, self.output)[-1])
        return Draft(choice, walk, logits, q)

    def _verify(self, drafts: list[Draft], cache: KVCache) -> torch.Tensor:
        """The deeper stages over all drafted positions at once: the full predictor (k, vocab)."""
        m, c = self.model, self.model.config
        walk = Walk.cat([d.walk for d in drafts])  # (1, k, ...): the deeper layers' cache lags by k
        deeper = []
        for stage in range(self.stage + 1, c.n_stages):
            walk = m.run_layers(walk, c.stage_ends[stage] + 1, cache)
            if stage in self.full_reads:
                deeper.append(m.readout(walk, stage)[0])  # (k, vocab)
        shallow = [torch.cat([d.logits[j] for d in drafts]) for j, stage in enumerate(self.draft_reads)
                   if stage in self.full_reads]  # the draft stages the full predictor reads: (k, vocab)
        return m.predictor(shallow + deeper, self.output)

    def _accept(self, drafts: list[Draft], scores: torch.Tensor) -> tuple[int, int | None]:
        """How many drafts stand, and the full model's token at the first rejection (None if none)."""
        for i, d in enumerate(drafts):
            if self.temperature > 0:
                p = torch.softmax(scores[i] / self.temperature, dim=-1)
                ok, token = accept_or_resample(p, d.q, d.token, self.generator)
            else:
                token = int(scores[i].argmax())
                ok = token == d.token
            if not ok:
                return i, token
        return len(drafts), None

    def _stream(self, prompt_ids: list[int], params: SamplingParams):
        m, c = self.model, self.model.config
        self.temperature, self.generator = params.temperature, self._generator(params)
        max_new_tokens = params.max_new_tokens
        cache = KVCache()
        with torch.no_grad():
            pending, _ = self._choose(m(torch.tensor([prompt_ids], device=self.device), cache=cache,
                                        output=self.output).logits[0, -1])
        produced = 1
        yield pending
        while pending not in self.stop_ids:
            # The cache holds prompt + output minus `pending`; a round emits at most k tokens.
            k = min(self.k, max_new_tokens - produced, c.sequence_len - (len(prompt_ids) + produced))
            if k < 1:
                return
            with torch.no_grad():
                base = cache.get_seq_length()
                drafts, token = [], pending
                for _ in range(k):
                    drafts.append(self._draft_step(token, cache))
                    token = drafts[-1].token
                n, correction = self._accept(drafts, self._verify(drafts, cache))
                emitted = [d.token for d in drafts[:n]] + ([correction] if correction is not None else [])
                kept_inputs = ([pending] + [d.token for d in drafts[:n]])[: len(emitted)]  # keys that stay
                m.rollback(cache, base + len(kept_inputs), kept_inputs[-1])
            self.stats.rounds += 1
            self.stats.drafted += k
            self.stats.accepted += n
            self.stats.emitted += len(emitted)
            for t in emitted:
                produced += 1
                yield t
                if t in self.stop_ids:
                    return
            pending = emitted[-1]


# ---- how far the promise holds: speculative greedy against the engine's greedy ----------------------

@dataclass
class Divergence:
    """Where a speculative output first parts from the engine's: the prompt's index, the position in
    the output, and the engine's margin there (its top logit minus that of the token chosen instead)."""

    prompt: int
    position: int
    engine_margin: float


@dataclass
class Agreement:
    prompts: int
    identical: int
    divergences: list[Divergence]
    tokens: int  # output tokens compared
    agreeing: int  # of those, the ones before the first divergence of their prompt


@torch.no_grad()
def compare_with_engine(model: PoEGPT, prompts: list[list[int]], max_new_tokens: int, draft_stage: int, k: int,
                        output: str | None = None) -> Agreement:
    """Greedy speculative decoding against the engine's greedy decoding, prompt by prompt, in the
    model's own dtype: how many outputs are identical, and at each divergence the engine's margin
    (recomputed exactly as the engine computes that step: prefill, then one token at a time)."""
    engine = Engine(model, stop_ids=set(), output=output)
    result = Agreement(prompts=len(prompts), identical=0, divergences=[], tokens=0, agreeing=0)
    device, params = engine.device, SamplingParams(max_new_tokens=max_new_tokens)
    for p, prompt in enumerate(prompts):
        want = engine.generate(prompt, params)
        got = SpeculativeDecoder(model, draft_stage, k, output=output).generate(prompt, params)
        result.tokens += len(want)
        if got == want:
            result.identical += 1
            result.agreeing += len(want)
            continue
        i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        result.agreeing += i
        cache = KVCache()
        logits = engine._logits(torch.tensor([prompt], device=device), cache)
        for t in want[:i]:
            logits = engine._logits(torch.tensor([[t]], device=device), cache)
        result.divergences.append(Divergence(p, i, float(logits[want[i]] - logits[got[i]])))
    return result
