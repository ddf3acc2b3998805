"""Self-speculative greedy decoding: draft with an early stage, verify with the whole model.

Design choices:
- No extra parameters: stage S of the same model is the draft. Each round drafts K tokens one at a
  time through layers 0..end(S) only (into the shared KV cache), then verifies all K in ONE forward of
  the deeper layers that reuses what drafting computed: the draft's keys and values for layers up to
  end(S) stay in the cache, and the draft's boundary states (the residual, the embedding mix `x0`,
  the backout residual) are the deeper layers' input. Nothing of the shallow part runs twice.
- Acceptance (greedy): the longest prefix of drafts that equals the full model's argmax is kept, plus
  the full model's token at the first mismatch. The output is therefore plain greedy decoding of the
  full model (tested token for token); only the float rounding of a K-row matmul differs from K
  one-row matmuls, which can flip an exact tie and nothing else.
- Rollback: the cache is cropped to the accepted inputs and the smear's previous embedding is reset
  to the last accepted input's normed embedding (the smear reads it for the next token).
- Sampling (temperature > 0): the speculative sampling rule (Leviathan et al., Chen et al.): draft
  d ~ q (stage S's tempered distribution), accept it with probability min(1, p(d) / q(d)) where p is
  the full model's, otherwise emit a sample of normalise(max(p - q, 0)) and end the round. Every
  emitted token is then distributed exactly as the full model's sampling (tested statistically). One
  seeded generator drives drafts, acceptances and resamples.
- Reports acceptance (accepted / drafted) and tokens per verification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PoelmError
from ..model import KVCache, PoEGPT, norm, rotary_tables


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


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verification(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0


class SpeculativeDecoder:
    """Greedy self-speculative decoding of `model`, drafting `k` tokens per round with `draft_stage`."""

    def __init__(self, model: PoEGPT, draft_stage: int, k: int, stop_ids: set[int] | None = None,
                 temperature: float = 0.0, seed: int = 0):
        c = model.config
        if not 0 <= draft_stage < c.n_stages - 1:
            raise PoelmError(f"--draft-stage {draft_stage}: expected a stage in 0..{c.n_stages - 2} "
                             f"(an earlier stage than the last of {c.n_stages})")
        if k < 1:
            raise PoelmError(f"--speculative {k}: expected at least one draft token per round")
        self.model, self.stage, self.k = model, draft_stage, k
        self.split = c.stage_ends[draft_stage] + 1  # layers [0, split) draft; [split, n_layer) verify
        self.stop_ids = stop_ids or set()
        self.temperature = temperature
        self.generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
        self.stats = SpeculativeStats()

    def _draft_step(self, token: int, cache: KVCache) -> tuple[int, dict]:
        """One token through the draft layers; returns the draft's argmax and the boundary state."""
        m, c = self.model, self.model.config
        idx = torch.tensor([[token]], device=m.lm_head.weight.device)
        pos = cache.get_seq_length()
        x = m.embed(idx, cache)
        cos, sin = rotary_tables(pos, 1, c.head_dim, c.rope_base, x.device, x.dtype)
        x0, x_backout = x, None
        for i in range(self.split):
            x = m.layer(i, x, x0, idx, cos, sin, cache)
            if i == c.backout_layer:
                x_backout = x
        logits = m.stage_logits(x, self.stage, x_backout)[0, -1]
        if self.temperature > 0:
            q = torch.softmax(logits / self.temperature, dim=-1)
            token = int(torch.multinomial(q, 1, generator=self.generator))
        else:
            q, token = None, int(logits.argmax())
        return token, {"idx": idx, "x": x, "x0": x0, "x_backout": x_backout, "q": q}

    def _verify(self, states: list[dict], cache: KVCache) -> torch.Tensor:
        """The deeper layers over all drafted positions at once: the full model's logits (K, vocab)."""
        m, c = self.model, self.model.config
        cat = lambda key: torch.cat([s[key] for s in states], dim=1)  # noqa: E731  (1, K, ...)
        idx, x, x0 = cat("idx"), cat("x"), cat("x0")
        x_backout = cat("x_backout") if states[0]["x_backout"] is not None else None
        start = cache.get_seq_length(self.split)  # the deeper layers' cache lags the draft's by K
        cos, sin = rotary_tables(start, idx.size(1), c.head_dim, c.rope_base, x.device, x.dtype)
        for i in range(self.split, c.n_layer):
            x = m.layer(i, x, x0, idx, cos, sin, cache)
            if i == c.backout_layer:
                x_backout = x
        return m.stage_logits(x, c.n_stages - 1, x_backout)[0]

    def _pick(self, logits: torch.Tensor) -> int:
        """The full model's own choice: argmax, or a sample at the temperature."""
        if self.temperature > 0:
            return int(torch.multinomial(torch.softmax(logits / self.temperature, -1), 1, generator=self.generator))
        return int(logits.argmax())

    def _accept(self, drafts: list[int], states: list[dict], logits: torch.Tensor) -> tuple[int, int | None]:
        """How many drafts stand, and the full model's token at the first rejection (None if none)."""
        for i, d in enumerate(drafts):
            if self.temperature > 0:
                p = torch.softmax(logits[i] / self.temperature, dim=-1)
                ok, token = accept_or_resample(p, states[i]["q"], d, self.generator)
            else:
                token = int(logits[i].argmax())
                ok = token == d
            if not ok:
                return i, token
        return len(drafts), None

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        return list(self.stream(prompt_ids, max_new_tokens))

    def stream(self, prompt_ids: list[int], max_new_tokens: int):
        """Yield tokens as rounds complete (a verified round yields up to K tokens at once)."""
        c = self.model.config
        if not prompt_ids or len(prompt_ids) >= c.sequence_len:
            raise PoelmError(f"the prompt must hold 1..{c.sequence_len - 1} tokens, got {len(prompt_ids)}")
        return self._stream(prompt_ids, max_new_tokens)

    def _stream(self, prompt_ids: list[int], max_new_tokens: int):
        m, c = self.model, self.model.config
        cache = KVCache()
        device = m.lm_head.weight.device
        with torch.no_grad():
            pending = self._pick(m(torch.tensor([prompt_ids], device=device), cache=cache).logits[0, -1])
        produced = 1
        yield pending
        while produced < max_new_tokens and pending not in self.stop_ids and \
                cache.get_seq_length() + self.k < c.sequence_len:
            with torch.no_grad():
                base = cache.get_seq_length()
                drafts, states, token = [], [], pending
                for _ in range(self.k):
                    token, state = self._draft_step(token, cache)
                    drafts.append(token)
                    states.append(state)
                logits = self._verify(states, cache)
                n, correction = self._accept(drafts, states, logits)
                emitted = drafts[:n] + ([correction] if correction is not None else [])
                kept_inputs = ([pending] + drafts[:n])[: len(emitted)]  # inputs whose keys stay in the cache
                cache.crop(base + len(kept_inputs))
                last = torch.tensor([[kept_inputs[-1]]], device=device)
                cache.prev_embedding = norm(m.transformer.wte(last))  # what the smear reads next
            self.stats.rounds += 1
            self.stats.drafted += self.k
            self.stats.accepted += n
            self.stats.emitted += len(emitted)
            for t in emitted:
                produced += 1
                yield t
                if t in self.stop_ids or produced >= max_new_tokens:
                    return
            pending = emitted[-1]
