"""Padded batches: every row of a left- or right-padded batch computes what it computes alone.

Windows shorter than the rows (so they mask), rows of different lengths up to the context limit,
both predictors, the smear at a row's first real token, and the KV cache (a padded prefill, then one
token per row per step).
"""

from __future__ import annotations

import pytest
import torch

from poelm.core.model import KVCache

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


def test_cli_generate_decodes_several_prompts_as_one_batch(trained_like_model_dir, tmp_path, capsys):
    from poelm.cli import main

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
    assert main(base + ["--prompt", "a", "--prompt", "b", "--speculative", "2", "--draft-stage", "0"]) == 2
    assert "not built yet" in capsys.readouterr().err
    assert main(base) == 2 and "give a prompt" in capsys.readouterr().err
