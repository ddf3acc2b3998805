"""Padded batches: every row of a left- or right-padded batch computes what it computes alone.

Windows shorter than the rows (so they mask), rows of different lengths up to the context limit,
both predictors, the smear at a row's first real token, and the KV cache (a padded prefill, then one
token per row per step).
"""

from __future__ import annotations

import pytest
import torch

from poelm.core.model import KVCache
from poelm.infer.cache import BatchKVCache

from util import tiny_model

SEQ = 64
WINDOWS = [8, SEQ, 16, SEQ]
PAD = 0


def model_of(**kw):
    return tiny_model(sequence_len=SEQ, layer_windows=WINDOWS, poe_stage_layers=[1, 1, 2], **kw).eval()


def prompt_of(length: int, seed: int) -> list[int]:
    return torch.randint(1, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of rows padded with PAD to the longest, on `side`."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), PAD)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for r, row in enumerate(rows):
        cols = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        ids[r, cols], mask[r, cols] = torch.tensor(row), 1
    return ids, mask


ROWS = [prompt_of(n, seed=n) for n in (3, 17, 40, SEQ)]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("output", ["last", "logop"])
def test_padded_forward_equals_rows_alone(side, output):
    model = model_of(poe_output=output)
    ids, mask = pad(ROWS, side)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, return_stages=True)
        for r, row in enumerate(ROWS):
            alone = model(torch.tensor([row]), return_stages=True)
            real = mask[r].bool()
            torch.testing.assert_close(batch.logits[r, real], alone.logits[0], rtol=1e-5, atol=1e-5)
            for k, stage in enumerate(alone.stage_logits):
                torch.testing.assert_close(batch.stage_logits[k][r, real], stage[0], rtol=1e-5, atol=1e-5)


def test_an_all_real_mask_is_the_plain_path_bit_for_bit():
    model = model_of()
    ids = torch.tensor([ROWS[2][:30], ROWS[3][:30]])
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits)


def test_padding_would_change_the_answer_without_the_mask():
    """The test has power: the pads (left) change a short row's logits when nothing masks them."""
    model = model_of()
    ids, mask = pad(ROWS[:2], "left")
    with torch.no_grad():
        alone = model(torch.tensor([ROWS[0]])).logits[0]
        unmasked = model(ids).logits[0, -len(ROWS[0]):]
    assert (unmasked - alone).abs().max() > 1e-3


@pytest.mark.parametrize("output", ["last", "logop"])
def test_cached_decoding_of_a_left_padded_batch_equals_rows_alone(output):
    """A padded prefill, then 10 steps of one token per row (the cache keeps the mask): every row's
    logits at every step equal that row's own cached decoding."""
    model = model_of(poe_output=output)
    rows = [r[:n] for r, n in zip(ROWS, (3, 9, 25, 40))]
    ids, mask = pad(rows, "left")
    g = torch.Generator().manual_seed(0)
    steps = torch.randint(1, 300, (len(rows), 10), generator=g)
    with torch.no_grad():
        cache = KVCache()
        batch = [model(ids, cache=cache, attention_mask=mask).logits[:, -1]]
        for t in range(steps.size(1)):  # the mask of the new token alone: the cache holds the rest
            batch.append(model(steps[:, t:t + 1], cache=cache, attention_mask=torch.ones(len(rows), 1)).logits[:, -1])
        for r, row in enumerate(rows):
            alone_cache = KVCache()
            want = [model(torch.tensor([row]), cache=alone_cache).logits[0, -1]]
            for t in range(steps.size(1)):
                want.append(model(steps[r:r + 1, t:t + 1], cache=alone_cache).logits[0, -1])
            for got, expected in zip(batch, want):
                torch.testing.assert_close(got[r], expected, rtol=1e-5, atol=1e-5)
    assert cache.attention_mask.shape == (len(rows), ids.size(1) + 10)


# ---- the engine's batch ---------------------------------------------------------------------------

def engine_of(model, **kw):
    from poelm.infer import Engine

    return Engine(model, stop_ids=set(), **kw)


def test_engine_batch_equals_each_row_alone_greedy_and_sampled():
    """Rows of different lengths (one at the context limit's edge), each with its own budget, sampling
    settings and seed: each row's tokens equal what the row gives alone."""
    from poelm.infer import SamplingParams

    model = model_of()
    prompts = [prompt_of(n, seed=10 + n) for n in (2, 9, 31, SEQ - 3)]
    params = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=5, temperature=0.9, seed=1),
              SamplingParams(max_new_tokens=20, temperature=1.3, top_k=8, seed=2, repetition_penalty=1.2),
              SamplingParams(max_new_tokens=20, temperature=0.7, top_p=0.8, seed=3)]
    engine = engine_of(model)
    batch = engine.generate_batch(prompts, params)
    alone = [engine.generate(p, q) for p, q in zip(prompts, params)]
    assert batch == alone
    assert [len(t) for t in batch] == [12, 5, 20, 3]  # budgets, and the last row stops at sequence_len
    # The same prompts in another order and with other batch-mates: the same tokens per row.
    again = engine.generate_batch([prompts[2], prompts[0]], [params[2], params[0]])
    assert again == [alone[2], alone[0]]


def test_engine_batch_exit_stage_and_logop():
    from poelm.infer import SamplingParams

    model = model_of(poe_output="logop")
    prompts = [prompt_of(n, seed=n) for n in (4, 20)]
    params = SamplingParams(max_new_tokens=10)
    for engine in (engine_of(model), engine_of(model, exit_stage=1), engine_of(model, output="last")):
        assert engine.generate_batch(prompts, params) == [engine.generate(p, params) for p in prompts]


def test_rows_join_and_leave_between_steps():
    """Continuous batching: rows added while others run, a stop token ending one early; every row's
    tokens equal the row alone, and finished rows leave the cache."""
    from poelm.infer import SamplingParams

    model = model_of()
    engine = engine_of(model)
    prompts = [prompt_of(n, seed=20 + n) for n in (6, 25, 3, 14)]
    want = [engine.generate(p, SamplingParams(max_new_tokens=15)) for p in prompts]
    stop = want[1][4]
    want[1] = want[1][: want[1].index(stop) + 1]
    batch = engine.batch()
    rows = [batch.add(prompts[0], SamplingParams(max_new_tokens=15), frozenset()),
            batch.add(prompts[1], SamplingParams(max_new_tokens=15), frozenset({stop}))]
    sizes = []
    for step in range(40):
        if step == 3:
            rows.append(batch.add(prompts[2], SamplingParams(max_new_tokens=15), frozenset()))
        if step == 7:
            rows.append(batch.add(prompts[3], SamplingParams(max_new_tokens=15), frozenset()))
        batch.step()
        sizes.append(len(batch.rows))
        if not len(batch):
            break
    assert [r.tokens for r in rows] == want
    assert max(sizes) == 3 and sizes[-1] == 0 and 1 in sizes  # rows came and went; the batch emptied


# ---- speculative and adaptive decoding in a batch ------------------------------------------------

def ragged_realigns(monkeypatch) -> list[list[int]]:
    """Every BatchKVCache.realign call's lengths (a round whose rows kept different numbers of tokens)."""
    calls: list[list[int]] = []
    realign = BatchKVCache.realign

    def spy(self, lengths):
        calls.append(list(lengths))
        return realign(self, lengths)

    monkeypatch.setattr(BatchKVCache, "realign", spy)
    return calls


SPEC_PROMPTS = [prompt_of(n, seed=30 + n) for n in (2, 11, 29, SEQ - 4)]


@pytest.mark.parametrize("output", ["last", "logop"])
@pytest.mark.parametrize("draft_stage,k", [(0, 3), (1, 4)])
def test_speculative_batch_equals_each_row_alone(output, draft_stage, k, monkeypatch):
    """Rows of different lengths (the last one 4 tokens from the limit, so its rounds shrink), budgets,
    temperatures and seeds, windows that mask: every row's tokens equal the row decoded alone (greedy
    rows: the engine's), and rounds really were ragged (rows kept different numbers of tokens)."""
    from poelm.infer import SamplingParams
    from poelm.infer.speculative import SpeculativeDecoder

    model = model_of(poe_output=output)
    params = [SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=7, temperature=0.8, seed=1),
              SamplingParams(max_new_tokens=25, temperature=1.2, seed=2), SamplingParams(max_new_tokens=20)]
    realigns = ragged_realigns(monkeypatch)
    dec = SpeculativeDecoder(model, draft_stage, k)
    batch = dec.generate_batch(SPEC_PROMPTS, params)
    assert any(len(set(lengths)) > 1 for lengths in realigns)
    alone = [SpeculativeDecoder(model, draft_stage, k).generate(p, q) for p, q in zip(SPEC_PROMPTS, params)]
    assert batch == alone
    assert [len(t) for t in batch] == [20, 7, 25, 4]
    engine = engine_of(model)
    assert batch[0] == engine.generate(SPEC_PROMPTS[0], params[0])
    assert batch[3] == engine.generate(SPEC_PROMPTS[3], params[3])
    # Other batch-mates, another order: the same tokens per row (a sampled row's draws are its own).
    again = SpeculativeDecoder(model, draft_stage, k).generate_batch([SPEC_PROMPTS[2], SPEC_PROMPTS[1]],
                                                                     [params[2], params[1]])
    assert again == [alone[2], alone[1]]


def test_speculative_rows_whose_rounds_shrink_keep_their_own_draws():
    """Sampled rows with small budgets ride along while a long row drafts K: their extra draft steps
    draw nothing from their generators, so their tokens are still those of the rows alone."""
    from poelm.infer import SamplingParams
    from poelm.infer.speculative import SpeculativeDecoder

    model = model_of()
    prompts = [prompt_of(n, seed=60 + n) for n in (4, 9, 13, 17, 21, 6)]
    for seeds in (10, 20):  # both fail if a riding row draws (checked by breaking the rule)
        params = [SamplingParams(max_new_tokens=n, temperature=0.7, seed=seeds + s)
                  for s, n in enumerate((4, 6, 8, 9, 11))] + [SamplingParams(max_new_tokens=30)]
        dec = SpeculativeDecoder(model, 0, 6)
        alone = [SpeculativeDecoder(model, 0, 6).generate(p, q) for p, q in zip(prompts, params)]
        assert dec.generate_batch(prompts, params) == alone
        assert dec.stats.acceptance < 0.9  # rejections: rows go on after a round their budget shrank


def test_speculative_batch_rows_join_leave_and_stop_inside_a_round():
    """Continuous batching with speculative rounds: a row whose stop token is an accepted draft ends
    there, rows join mid-decode; each row's tokens equal the row alone."""
    from poelm.infer import SamplingParams
    from poelm.infer.speculative import SpeculativeDecoder

    model = model_of()
    dec = SpeculativeDecoder(model, 0, 4)
    greedy = SamplingParams(max_new_tokens=18)
    want = [engine_of(model).generate(p, greedy) for p in SPEC_PROMPTS[:3]]
    stop = want[0][5]
    want[0] = want[0][: want[0].index(stop) + 1]
    batch = dec.batch()
    rows = [batch.add(SPEC_PROMPTS[0], greedy, frozenset({stop})), batch.add(SPEC_PROMPTS[1], greedy, frozenset())]
    for step in range(60):
        if step == 2:
            rows.append(batch.add(SPEC_PROMPTS[2], greedy, frozenset()))
        batch.step()
        if not len(batch):
            break
    assert [r.tokens for r in rows] == want
    assert not batch.rows and dec.stats.accepted > 0


def test_realign_keeps_each_rows_own_prefix():
    """BatchKVCache.realign: each row keeps its first n cache positions, right-aligned to the longest; the
    positions left of a shorter row become hidden."""
    cache = BatchKVCache()
    k = torch.arange(2 * 1 * 6 * 1, dtype=torch.float).view(2, 1, 6, 1)
    cache.update(k, -k, 0)
    cache.realign([4, 6])
    assert cache.keys[0][0, 0, 2:, 0].tolist() == [0, 1, 2, 3] and cache.keys[0][1, 0, :, 0].tolist() == k[1, 0, :, 0].tolist()
    assert cache.values[0][0, 0, 2:, 0].tolist() == [0, -1, -2, -3]
    assert cache.attention_mask.tolist() == [[False, False, True, True, True, True], [True] * 6]
    cache.realign([5, 3])  # lengths count cache positions: row 0 keeps 2 hidden + 3 real, row 1 its first 3
    assert cache.attention_mask.tolist() == [[True] * 3] * 2  # columns hidden in every row are dropped
    assert cache.keys[0][:, 0, :, 0].tolist() == [[0, 1, 2], [6, 7, 8]]
    cache.realign([3, 1])
    assert cache.attention_mask.tolist() == [[True, True, True], [False, False, True]]
    assert cache.keys[0][0, 0, :, 0].tolist() == [0, 1, 2] and cache.keys[0][1, 0, 2, 0] == 6


@pytest.mark.parametrize("stages", [(1, 1, 2), (2, 2)])
def test_adaptive_batch_equals_each_row_alone_with_ragged_exits(stages):
    """Bounds that make rows exit at different stages: each row's tokens, and the exit counts summed
    over rows, equal those of the rows decoded alone."""
    from poelm.infer import SamplingParams
    from poelm.infer.adaptive import AdaptiveDecoder

    model = tiny_model(sequence_len=SEQ, layer_windows=WINDOWS, poe_stage_layers=list(stages), poe_output="logop").eval()
    prompts = [prompt_of(n, seed=40 + n) for n in (3, 15, 33, SEQ - 5)]
    params = [SamplingParams(max_new_tokens=n) for n in (20, 9, 25, 20)]
    for bound in (0.03, 0.1, 0.3, 1.0):
        bounds = [0.0] + [bound] * (len(stages) - 1)
        solo = [AdaptiveDecoder(model, bounds) for _ in prompts]
        alone = [d.generate(p, q) for d, p, q in zip(solo, prompts, params)]
        if all(sum(d.stats.exits[:-1]) > 0 and d.stats.exits[-1] > 0 for d in solo[:3]):
            break  # early and full-depth exits in every row
    else:
        pytest.fail("no bound gave ragged exits")
    dec = AdaptiveDecoder(model, bounds)
    assert dec.generate_batch(prompts, params) == alone
    assert [len(t) for t in alone] == [20, 9, 25, 5]
    assert dec.stats.exits == [sum(d.stats.exits[k] for d in solo) for k in range(len(stages))]


def test_adaptive_batch_rows_join_and_leave():
    from poelm.infer import SamplingParams
    from poelm.infer.adaptive import AdaptiveDecoder

    model = model_of(poe_output="logop")
    prompts = [prompt_of(n, seed=50 + n) for n in (5, 21, 8)]
    bounds = [0.0, 0.3, 0.3]
    want = [AdaptiveDecoder(model, bounds).generate(p, SamplingParams(max_new_tokens=n))
            for p, n in zip(prompts, (12, 4, 10))]
    dec = AdaptiveDecoder(model, bounds)
    batch = dec.batch()
    rows = [batch.add(prompts[0], SamplingParams(max_new_tokens=12), frozenset()),
            batch.add(prompts[1], SamplingParams(max_new_tokens=4), frozenset())]
    for step in range(40):
        if step == 6:  # row 1 has left by now; row 2 joins while row 0 runs
            rows.append(batch.add(prompts[2], SamplingParams(max_new_tokens=10), frozenset()))
        batch.step()
        if not len(batch):
            break
    assert [r.tokens for r in rows] == want
    assert not batch.pending and not batch.rows


@pytest.mark.parametrize("kind", ["engine", "speculative", "adaptive"])
def test_a_random_schedule_of_joins_and_cancels_keeps_every_row_exact(kind):
    """Rows of random lengths, budgets and sampling settings join at random steps (also into a batch
    of one row or of equal-length rows, which has no mask yet) and some are cancelled: every row that
    ran to its end equals the row decoded alone, and the cache always holds exactly the live rows."""
    import random

    from poelm.infer import SamplingParams
    from poelm.infer.adaptive import AdaptiveDecoder
    from poelm.infer.speculative import SpeculativeDecoder

    model = model_of(poe_output="logop")
    make = {"engine": lambda: engine_of(model), "speculative": lambda: SpeculativeDecoder(model, 0, 3),
            "adaptive": lambda: AdaptiveDecoder(model, [0.0, 0.3, 0.3])}[kind]
    rng = random.Random(3)
    batch, rows, cancelled = make().batch(), [], set()
    for step in range(80):
        if rng.random() < 0.3:
            prompt = prompt_of(rng.choice([3, 3, 7, 20, SEQ - 6]), seed=step)
            temperature = 0.0 if kind == "adaptive" else rng.choice([0.0, 0.9])
            params = SamplingParams(max_new_tokens=rng.randrange(1, 25), temperature=temperature, seed=step)
            rows.append((prompt, params, batch.add(prompt, params, frozenset())))
        if rng.random() < 0.08 and batch.rows:
            victim = rng.choice(batch.rows)
            batch.cancel(victim)
            cancelled.add(id(victim))
        batch.step()
        if batch.rows:
            keys = batch.cache.keys[0]  # (B, H, T, D)
            assert keys.size(0) == len(batch.rows)
            assert batch.cache.mask().shape == (keys.size(0), keys.size(2))
    while len(batch):
        batch.step()
    finished = [(p, q, r) for p, q, r in rows if id(r) not in cancelled]
    assert len(finished) >= 10 and cancelled
    for prompt, params, row in finished:
        assert row.tokens == make().generate(prompt, params)


def test_cli_generate_decodes_several_prompts_as_one_batch(trained_like_model_dir, tmp_path, capsys):
    from poelm.app.cli import main

    (tmp_path / "prompts.txt").write_text("The model\n\nimport os\n")
    base = ["generate", str(trained_like_model_dir), "--max-new-tokens", "6"]
    singles = []
    for text in ("def f(x):", "The model", "import os"):
        assert main(base + ["--prompt", text]) == 0
        singles.append(capsys.readouterr().out.rstrip("\n"))
    assert main(base + ["--prompt", "def f(x):", "--prompts", str(tmp_path / "prompts.txt")]) == 0
    out, err = capsys.readouterr()
    import re

    heads = re.findall(r"(?m)^\[(\d)\] (.*)$", out)
    assert [h for h, _ in heads] == ["0", "1", "2"] and [t for _, t in heads] == ["def f(x):", "The model", "import os"]
    blocks = re.split(r"(?m)^\[\d\] .*\n", out)[1:]
    assert [b.rstrip("\n") for b in blocks] == singles
    assert "3 prompts as one batch" in err
    assert main(base + ["--prompt", "a", "--prompt", "b", "--compose", str(trained_like_model_dir)]) == 2
    assert "--compose decodes one prompt at a time" in capsys.readouterr().err
    assert main(base) == 2 and "give a prompt" in capsys.readouterr().err
