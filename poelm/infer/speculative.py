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
  p and q are `sampling.tempered_probs`, the engine's own tempering, so every admitted temperature
  is safe: as t -> 0+ both become one-hot on their argmax and the rule decodes greedily. A draft is
  accepted when u * q(d) < p(d), u ~ U[0, 1): probability min(1, p/q), and never a draft with p = 0.
- Batches (`SpeculativeBatch`): all rows draft together and are verified in one pass; each row
  accepts its own prefix (ragged acceptance) and the rows stay one left-padded batch, right-aligned
  after every round (`PoEGPT.rollback` with one length per row, `KVCache.realign`). A row decoded in
  a batch gives what it gives alone — its tokens and its generator's draws (tested, greedy and
  sampled, with rows joining, leaving and stopping inside a round). A row whose drafting or acceptance
  raises ends alone with `Row.error` (batch.py): it rides along greedily to the end of the round,
  emits nothing from it and leaves; the other rows' rounds are unchanged.
- The decoder protocol (decoder.py); stats (accumulated over calls and rows) report acceptance
  (accepted / drafted) and tokens per verification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import PoelmError
from ..core.model import KVCache, PoEGPT, Walk
from .batch import Row, RowBatch
from .decoder import Decoder
from .engine import Engine
from .sampling import SamplingParams, tempered_probs


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, draft: int,
                       generator: torch.Generator) -> tuple[bool, int]:
    """One step of the speculative sampling rule: (accepted, token). p, q: (vocab,) probabilities."""
    u = torch.rand((), generator=generator, device=p.device)  # in [0, 1): u < x has probability x
    if float(u) * float(q[draft]) < float(p[draft]):  # u < p/q without dividing by a tiny q
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

    @classmethod
    def check_params(cls, params: SamplingParams) -> None:
        if params.top_k is not None or params.top_p is not None or params.repetition_penalty != 1:
            raise PoelmError("speculative decoding takes --temperature only (greedy at 0, else the speculative "
                             "sampling rule): drop --top-k, --top-p and --repetition-penalty")

    def describe(self) -> str:
        return (f"{self.name}: acceptance {self.stats.acceptance:.1%}, "
                f"{self.stats.tokens_per_verification:.2f} tokens per verification")

    def batch(self) -> "SpeculativeBatch":
        return SpeculativeBatch(self)


def choose(scores: torch.Tensor, row: Row) -> tuple[int, torch.Tensor | None]:
    """A token from (vocab,) scores: argmax, or a sample of the row's tempered distribution (returned too)."""
    if row.params.temperature > 0:
        probs = tempered_probs(scores, row.params.temperature)
        return int(torch.multinomial(probs, 1, generator=row.generator)), probs
    return int(scores.argmax()), None


class SpeculativeBatch(RowBatch):
    """Rows decoded speculatively together: every round drafts for all rows at once and verifies all
    their drafts in one pass; each row accepts its own prefix, and the rows stay one left-padded
    batch (`PoEGPT.rollback` with one length per row). Row b drafts k_b = min(K, its budget left, its
    room left) tokens; a row with a smaller k_b rides along for the others' extra draft steps greedily
    (no draw from its generator) and those positions are rolled back, so its tokens and its random
    draws are those of the row decoded alone. A newcomer's step is its prefill and first token."""

    def __init__(self, decoder: SpeculativeDecoder):
        super().__init__(decoder.model)
        self.decoder = decoder

    def step(self) -> list[tuple[Row, int]]:
        if self.queued:  # newcomers: prefill, first token; the running rows wait one step
            return self._start(lambda scores, r: choose(scores, r)[0], output=self.decoder.output)
        return self._round() if self.rows else []

    def _round(self) -> list[tuple[Row, int]]:
        d, m, c, rows = self.decoder, self.model, self.model.config, self.rows
        ks = [min(d.k, r.params.max_new_tokens - len(r.tokens), self.limit - len(r.prompt) - len(r.tokens))
              for r in rows]  # >= 1: a finished row has left
        fed = [r.tokens[-1] for r in rows]  # each row's last token: produced, not yet fed
        base, inputs = self.cache.get_seq_length(), list(fed)
        drafts: list[list[int]] = [[] for _ in rows]
        qs: list[list[torch.Tensor | None]] = [[] for _ in rows]
        walks, shallow = [], []  # per draft step: the walk at the draft boundary, the draft stages' logits
        with torch.inference_mode():
            for j in range(max(ks)):
                ids = torch.tensor(inputs, device=self.device)[:, None]  # (B, 1)
                mask = None if self.cache.attention_mask is None else torch.ones_like(ids, dtype=torch.bool)
                walk, logits = m.begin(ids, self.cache, attention_mask=mask), []
                for k in range(d.stage + 1):
                    walk = m.run_layers(walk, c.stage_ends[k] + 1, self.cache)
                    if k in d.draft_reads:
                        logits.append(m.readout(walk, k))  # (B, 1, vocab)
                scores = m.predictor(logits, d.output)[:, -1]  # (B, vocab)
                greedy = scores.argmax(dim=-1).tolist()
                for b, r in enumerate(rows):
                    token, q = greedy[b], None  # past its k, or failed: the row rides along greedily
                    if j < ks[b] and r.params.temperature > 0 and r.error is None:
                        try:
                            token, q = choose(scores[b], r)
                        except Exception as e:  # noqa: BLE001 - this row ends alone (batch.py)
                            r.fail(e)
                    drafts[b].append(token)
                    qs[b].append(q)
                walks.append(walk)
                shallow.append(logits)
                inputs = [ds[-1] for ds in drafts]
            full = self._verify(walks, shallow)  # (B, k, vocab)
            full_greedy = full.argmax(dim=-1).tolist()
            emitted, lengths, last = [], [], []
            for b, r in enumerate(rows):
                if r.error is None:
                    try:
                        n, correction = self._accept(r, ks[b], drafts[b], qs[b], full[b], full_greedy[b])
                    except Exception as e:  # noqa: BLE001 - this row ends alone (batch.py)
                        r.fail(e)
                if r.error is not None:  # nothing of the round is emitted; the row leaves below
                    lengths.append(base + 1)
                    last.append(fed[b])
                    emitted.append([])
                    continue
                out = drafts[b][:n] + ([correction] if correction is not None else [])
                kept = ([fed[b]] + drafts[b][:n])[: len(out)]  # the inputs whose keys stay
                lengths.append(base + len(kept))
                last.append(kept[-1])
                emitted.append(out)
                d.stats.rounds += 1
                d.stats.drafted += ks[b]
                d.stats.accepted += n
            m.rollback(self.cache, lengths if len(set(lengths)) > 1 else lengths[0], last)
        produced = []
        for b, r in enumerate(rows):
            for token in emitted[b]:
                produced.append((r, token))
                d.stats.emitted += 1
                if r.emit(token, self.limit):
                    break
        self._keep([b for b, r in enumerate(rows) if not r.done])
        return produced

    @staticmethod
    def _accept(r: Row, k: int, drafts: list[int], qs: list[torch.Tensor | None], full: torch.Tensor,
                full_greedy: list[int]) -> tuple[int, int | None]:
        """Row r's acceptance of its first k drafts against the full model's scores `full` (k', vocab):
        (how many are accepted, the full model's token at the first rejection or None)."""
        for i in range(k):
            if r.params.temperature > 0:
                p = tempered_probs(full[i], r.params.temperature)
                ok, token = accept_or_resample(p, qs[i], drafts[i], r.generator)
            else:
                token = full_greedy[i]
                ok = token == drafts[i]
            if not ok:
                return i, token
        return k, None

    def _verify(self, walks: list[Walk], shallow: list[list[torch.Tensor]]) -> torch.Tensor:
        """The deeper stages over every drafted position at once: the full predictor (B, k, vocab). The
        draft steps' walks are its input (the deeper layers' cache lags by k) and the draft stages'
        logits are reused where the full predictor reads them."""
        d, m, c = self.decoder, self.model, self.model.config
        walk = Walk.cat(walks)
        deeper = []
        for stage in range(d.stage + 1, c.n_stages):
            walk = m.run_layers(walk, c.stage_ends[stage] + 1, self.cache)
            if stage in d.full_reads:
                deeper.append(m.readout(walk, stage))
        reused = [torch.cat([step[j] for step in shallow], dim=1) for j, stage in enumerate(d.draft_reads)
                  if stage in d.full_reads]
        return m.predictor(reused + deeper, d.output)


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
