"""Analytic FLOPs of decoding a `PoEConfig` model, per produced token, for each decoder.

What is counted (2 FLOPs per multiply-accumulate, one token at a time):
- per layer: the q, k, v and output projections (grouped-query: k and v have n_kv_head heads), the
  value-embedding gate (12 channels -> n_kv_head, on `value_embed_layers`), attention scores and the
  weighted sum of values over the keys the query may see, and the MLP (d -> 4d -> d);
- per token entering layer 0: the smear gate (24 channels -> 1);
- per read-out of stage k: one d x padded_vocab_size product per head the stage reads through
  (`lm_head`, plus `stage_heads[k]`, `ancestors_head`, `specialist_head` where the config has them:
  the same rule as `PoEGPT.heads`); `vocab=N` counts a head that scores only N rows (a shortlist).
- Attention keys: a query at position i in a layer of window W sees min(i, W) + 1 keys. Masked
  scores that a kernel may compute anyway (padding, the window, the upper triangle of a block) are
  not counted: this is the algorithm's work, not the kernel's.
- Prefill: every prompt position runs through the layers and is read out (the model's forward reads
  out every position, not only the last), and produces the first new token. Each later token is one
  decode step (the last produced token is never fed back).
What is ignored: embedding and value-embedding lookups, norms, rotary, residual mixing and lambdas,
the backout subtraction, softcap, softmax/log-softmax, the Log-OP sum, argmax, sampling, cache copies.

Decoders (all return FLOPs per produced token, prefill included, over a list of calls' prompt lengths):
- `engine_flops`: full depth or `exit_stage=k` (prefix pruning); the predictor's read-outs are
  `readout_stages`: under poe_output "logop" every stage up to the last one run, under "last" only it.
  `batched=True`: one left-padded batch, every row prefilled to the longest prompt.
- `speculative_flops`: from `SpeculativeStats` totals (drafted, emitted): every drafted token runs
  layers 0..end(S) and the draft's read-outs; verification runs every drafted position through the
  deeper layers and the full predictor's deeper read-outs (rejected drafts count: their work was
  done). With `draft_vocab=N` the draft read-outs score N tokens; the verifier then also needs the
  draft stages it reads (under "logop") at the full vocabulary.
- `adaptive_flops`: from the exit histogram. Skipped layers are filled later for the keys
  (adaptive.py), so every decode step costs all layers (the last few tokens' never-filled layers are
  counted too: a slight over-count); a token that exits at stage k saves the read-outs of stages k+1...
Decode-step attention for speculative and adaptive is counted at the mean over the run's decode
positions (exact for the engine; redrafted positions repeat, so this is an approximation there, and
attention is a small share of a layer at these context lengths).

Checked against `torch.utils.flop_counter.FlopCounterMode` on the demo base (engine, exit stage,
Log-OP, batch, speculative S=0 K=4, adaptive; 2 prompts x 32 tokens): within 1.5% in every mode.
"""

from __future__ import annotations

from dataclasses import dataclass

# a token's FLOPs through a layer, the smear gate and a read-out: poelm's one count, also training's
from poelm.train.flops import embed_flops, layer_flops, readout_flops  # noqa: F401 (re-exported)


def keys_seen(c, layer: int, position: int) -> int:
    """Keys a query at `position` sees in `layer`: min(position, window) + 1."""
    return min(position, c.layer_windows[layer]) + 1


def readout_stages(c, last: int, output: str | None = None) -> list[int]:
    """The stages the predictor of stage `last` reads (`PoEGPT.readout_stages`)."""
    return list(range(last + 1)) if (output or c.poe_output) == "logop" else [last]


def pass_flops(c, first: int, stop: int, position: int) -> float:
    """One token at `position` through layers first..stop-1 (plus the smear gate when first == 0)."""
    return (embed_flops(c) if first == 0 else 0) + sum(layer_flops(c, i, keys_seen(c, i, position))
                                                       for i in range(first, stop))


def mean_pass_flops(c, first: int, stop: int, positions: list[int]) -> float:
    return sum(pass_flops(c, first, stop, p) for p in positions) / max(len(positions), 1)


def decode_positions(prompt_lens: list[int], new_tokens: int) -> list[int]:
    """Positions of every decode step (after the prefill) of every call."""
    return [p for P in prompt_lens for p in range(P, P + new_tokens - 1)]


def prefill_flops(c, prompt_len: int, last: int, reads: list[int]) -> float:
    stop = c.stage_ends[last] + 1
    return sum(pass_flops(c, 0, stop, p) for p in range(prompt_len)) + prompt_len * sum(
        readout_flops(c, k) for k in reads)


@dataclass
class Split:
    """FLOPs of one decode step at full depth, by part."""

    layers: float
    heads: float
    other: float

    @property
    def total(self) -> float:
        return self.layers + self.heads + self.other


def step_split(c, position: int = 0, output: str | None = None) -> Split:
    """One full-depth decode step at `position`: layers vs head read-outs vs the rest (smear gate)."""
    layers = sum(layer_flops(c, i, keys_seen(c, i, position)) for i in range(c.n_layer))
    heads = sum(readout_flops(c, k) for k in readout_stages(c, c.n_stages - 1, output))
    return Split(layers, heads, embed_flops(c))


def engine_flops(c, prompt_lens: list[int], new_tokens: int, exit_stage: int | None = None,
                 output: str | None = None, batched: bool = False) -> float:
    """Engine decoding: per produced token, each call a prefill then new_tokens - 1 steps."""
    last = c.n_stages - 1 if exit_stage is None else exit_stage
    reads, stop = readout_stages(c, last, output), c.stage_ends[last] + 1
    step_reads = sum(readout_flops(c, k) for k in reads)
    width = max(prompt_lens)
    total = 0.0
    for P in prompt_lens:
        total += prefill_flops(c, width if batched else P, last, reads)  # padding is computed too
        total += sum(pass_flops(c, 0, stop, p) + step_reads for p in range(P, P + new_tokens - 1))
    return total / (len(prompt_lens) * new_tokens)


def speculative_flops(c, draft_stage: int, stats, prompt_lens: list[int], new_tokens: int,
                      output: str | None = None, draft_vocab: int | None = None) -> float:
    """Self-speculative decoding from `stats` (drafted, emitted: totals over the calls whose prompt
    lengths are `prompt_lens`): per produced token (the prefill's first token of each call included)."""
    S, last = draft_stage, c.n_stages - 1
    draft_reads, full_reads = readout_stages(c, S, output), readout_stages(c, last, output)
    split = c.stage_ends[S] + 1
    positions = decode_positions(prompt_lens, new_tokens)
    total = sum(prefill_flops(c, P, last, full_reads) for P in prompt_lens)
    draft = mean_pass_flops(c, 0, split, positions) + sum(readout_flops(c, k, draft_vocab) for k in draft_reads)
    verify = mean_pass_flops(c, split, c.n_layer, positions) + sum(
        readout_flops(c, k) for k in full_reads if k > S)
    if draft_vocab is not None:  # a shortlist draft: the verifier's Log-OP needs the draft stages in full
        verify += sum(readout_flops(c, k) for k in full_reads if k <= S)
    total += stats.drafted * (draft + verify)
    return total / (len(prompt_lens) + stats.emitted)


def adaptive_flops(c, exits: list[int], prompt_lens: list[int], new_tokens: int) -> float:
    """Adaptive depth from its exit histogram (exits[k]: decode steps that stopped after stage k) over
    the calls whose prompt lengths are `prompt_lens`: per produced token. It decodes the Log-OP, so the
    prefill reads out every stage."""
    last = c.n_stages - 1
    positions = decode_positions(prompt_lens, new_tokens)
    total = sum(prefill_flops(c, P, last, list(range(last + 1))) for P in prompt_lens)
    layers = mean_pass_flops(c, 0, c.n_layer, positions)  # deferred fill: every layer runs eventually
    for k, n in enumerate(exits):
        total += n * (layers + sum(readout_flops(c, j) for j in range(k + 1)))
    return total / (len(prompt_lens) + sum(exits))
