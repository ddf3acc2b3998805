"""Self-speculative decoding: stage S of the same model drafts K tokens, the deeper stages verify them
in one pass that reuses the draft's cache and walks. Greedy: every emitted token is the full model's
argmax given the tokens before it; sampled: the speculative sampling rule, so every token follows the
full model's distribution. Rows of a batch accept ragged prefixes and stay one left-padded batch
(docs/inference.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import PoelmError
from ..core.model import PoEGPT, Walk
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
    def from_mode(cls, model, mode, *, tokenizer=None, stop_ids=None, model_dir=None) -> "SpeculativeDecoder":
        return cls(model, mode.draft_stage, mode.speculative, stop_ids, output=mode.output, tokenizer=tokenizer)

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
    """Rows decoded speculatively together: one draft and one verification per round for all rows, each
    accepting its own prefix, the rows kept one left-padded batch; a row drafting fewer tokens rides
    along greedily, so its tokens and draws are its own alone (docs/inference.md §5). A newcomer's step
    is its prefill and first token."""

    def __init__(self, decoder: SpeculativeDecoder):
        super().__init__(decoder.model)
        self.decoder = decoder

    def step(self) -> list[tuple[Row, int]]:
        if self.queued:  # newcomers: prefill, first token; the running rows wait one step
            return self._start(lambda scores, r: choose(scores, r)[0], output=self.decoder.output)
        return self._round() if self.rows else []

    def _round(self) -> list[tuple[Row, int]]:
        """Draft, verify in one pass, accept per row, roll the cache back to what each row kept."""
        d, rows = self.decoder, self.rows
        ks = [min(d.k, r.params.max_new_tokens - len(r.tokens), self.limit - len(r.prompt) - len(r.tokens))
              for r in rows]  # >= 1: a finished row has left
        fed = [r.tokens[-1] for r in rows]  # each row's last token: produced, not yet fed
        base = self.cache.get_seq_length()
        with torch.inference_mode():
            drafts, qs, walks, shallow = self._draft(ks, fed)
            full = self._verify(walks, shallow)  # (B, k, vocab)
            emitted, lengths, last = self._settle(ks, fed, base, drafts, qs, full)
            self.model.rollback(self.cache, lengths if len(set(lengths)) > 1 else lengths[0], last)
        produced = []
        for b, r in enumerate(rows):
            for token in emitted[b]:
                produced.append((r, token))
                d.stats.emitted += 1
                if r.emit(token, self.limit):
                    break
        self._keep([b for b, r in enumerate(rows) if not r.done])
        return produced

    def _draft(self, ks: list[int], fed: list[int]):
        """max(ks) draft steps through the draft stages for every row: per row its drafts and their
        tempered draft distributions q (None: greedy); per step the walk at the draft boundary and the
        draft stages' logits (what the verifier continues from and reuses)."""
        d, m, c, rows = self.decoder, self.model, self.model.config, self.rows
        inputs = list(fed)
        drafts: list[list[int]] = [[] for _ in rows]
        qs: list[list[torch.Tensor | None]] = [[] for _ in rows]
        walks, shallow = [], []
        for j in range(max(ks)):
            ids, mask = self._feed(inputs)
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
        return drafts, qs, walks, shallow

    def _settle(self, ks: list[int], fed: list[int], base: int, drafts: list[list[int]],
                qs: list[list[torch.Tensor | None]], full: torch.Tensor):
        """Each row's acceptance of its drafts against the full scores `full` (B, k, vocab): the tokens it
        emits, the cache length it keeps and its last kept input (a failed row: nothing, one position)."""
        d = self.decoder
        full_greedy = full.argmax(dim=-1).tolist()
        emitted, lengths, last = [], [], []
        for b, r in enumerate(self.rows):
            if r.error is None:
                try:
                    n, correction = self._accept(r, ks[b], drafts[b], qs[b], full[b], full_greedy[b])
                except Exception as e:  # noqa: BLE001 - this row ends alone (batch.py)
                    r.fail(e)
            if r.error is not None:  # nothing of the round is emitted; the row leaves
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
        return emitted, lengths, last

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
    params = SamplingParams(max_new_tokens=max_new_tokens)
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
        logits = engine.scores(prompt, want[:i])  # as the engine's step computes it
        result.divergences.append(Divergence(p, i, float(logits[want[i]] - logits[got[i]])))
    return result
