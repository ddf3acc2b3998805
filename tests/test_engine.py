"""The generation engine (poelm/infer/engine.py) and the `generate`/`chat` commands.

The fast path is checked against the slow one (STYLE.md habit 6): cached greedy decoding equals a
plain loop that reruns the whole sequence each step; the samplers' filters against hand-made
distributions and transformers' own repetition-penalty processor.
"""

from __future__ import annotations

import io
import sys

import pytest
import torch

from poelm.core.errors import PoelmError
from poelm.infer import Engine, SamplingParams, apply_repetition_penalty, top_k_filter, top_p_filter
from util import cut_model, tiny_model

PROMPT = [5, 17, 42, 99, 3, 250, 7, 61]


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


@torch.no_grad()
def plain_greedy(model, prompt: list[int], n: int, exit_stage=None) -> list[int]:
    """The slow reference: a full uncached forward over the whole sequence per new token."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]), exit_stage=exit_stage).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_uncached_greedy(model):
    engine = Engine(model, stop_ids=set())
    out = engine.generate(PROMPT, SamplingParams(max_new_tokens=24))
    assert out == plain_greedy(model, PROMPT, 24)
    s = engine.last_stats
    assert (s.prompt_tokens, s.generated_tokens) == (len(PROMPT), 24) and s.seconds > 0 and s.tokens_per_s > 0


def test_exit_stage_equals_cut_model(model):
    params = SamplingParams(max_new_tokens=16)
    early = Engine(model, stop_ids=set(), exit_stage=0).generate(PROMPT, params)
    cut = Engine(cut_model(model, 0).eval(), stop_ids=set()).generate(PROMPT, params)
    assert early == cut == plain_greedy(model, PROMPT, 16, exit_stage=0)
    with pytest.raises(PoelmError, match="exit stage 2 out of range: this model has stages 0..1"):
        Engine(model, stop_ids=set(), exit_stage=2)


def test_seeded_sampling_is_reproducible(model):
    engine = Engine(model, stop_ids=set())
    a = engine.generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=1.0, seed=1))
    b = engine.generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=1.0, seed=1))
    c = engine.generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=1.0, seed=2))
    assert a == b and a != c


def test_top_k_one_is_greedy(model):
    engine = Engine(model, stop_ids=set())
    greedy = engine.generate(PROMPT, SamplingParams(max_new_tokens=12))
    assert engine.generate(PROMPT, SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3)) == greedy


def test_top_k_and_top_p_filters():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    scores = probs.log()
    kept = lambda s: sorted(torch.isfinite(s).nonzero().flatten().tolist())  # noqa: E731
    assert kept(top_k_filter(scores, 2)) == [1, 3]
    assert kept(top_p_filter(scores, 0.4)) == [1]  # the top token alone reaches 0.4
    assert kept(top_p_filter(scores, 0.5)) == [1, 3]  # 0.4 < 0.5 <= 0.7
    assert kept(top_p_filter(scores, 0.7)) == [1, 3]
    assert kept(top_p_filter(scores, 0.71)) == [1, 3, 4]  # 0.85
    assert kept(top_p_filter(scores, 0.9)) == [1, 2, 3, 4]  # 0.95
    assert kept(top_p_filter(scores, 1e-6)) == [1]  # never fewer than one
    assert kept(top_p_filter(scores, 1.0)) == [0, 1, 2, 3, 4]
    assert torch.equal(top_p_filter(scores, 0.5)[[1, 3]], scores[[1, 3]])  # survivors unchanged


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 300, generator=g) * 3
    ids = torch.randint(0, 300, (1, 40), generator=g)  # duplicates included
    for penalty in (1.3, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
        assert torch.equal(apply_repetition_penalty(scores[0], ids[0], penalty), expected[0])


@torch.no_grad()
def test_penalised_greedy_equals_transformers_loop(model):
    from transformers import RepetitionPenaltyLogitsProcessor

    proc, ids = RepetitionPenaltyLogitsProcessor(3.0), list(PROMPT)
    for _ in range(16):
        x = torch.tensor([ids])
        ids.append(int(proc(x, model(x).logits[:, -1]).argmax()))
    engine = Engine(model, stop_ids=set())
    penalised = engine.generate(PROMPT, SamplingParams(max_new_tokens=16, repetition_penalty=3.0))
    assert penalised == ids[len(PROMPT):] != engine.generate(PROMPT, SamplingParams(max_new_tokens=16))


def test_stops_after_a_stop_token_and_at_sequence_len(model):
    greedy = Engine(model, stop_ids=set()).generate(PROMPT, SamplingParams(max_new_tokens=24))
    stop = greedy[5]
    first = greedy.index(stop)
    assert Engine(model, stop_ids={stop}).generate(PROMPT, SamplingParams(max_new_tokens=24)) == greedy[:first + 1]
    short = tiny_model(sequence_len=12).eval()
    assert len(Engine(short, stop_ids=set()).generate(PROMPT, SamplingParams(max_new_tokens=24))) == 12 - len(PROMPT)
    with pytest.raises(PoelmError, match="sequence_len"):
        Engine(short, stop_ids=set()).generate(list(range(12)))


def test_tokenizer_gives_the_stop_ids(seed_vocab_tokenizer, model):
    tok = seed_vocab_tokenizer
    assert Engine(model, tok).stop_ids == {tok.token_id("<|assistant_end|>"), tok.bos_id}


def test_stream_stats_after_early_close(model):
    engine = Engine(model, stop_ids=set())
    stream = engine.stream(PROMPT, SamplingParams(max_new_tokens=24))
    assert [next(stream) for _ in range(3)] == plain_greedy(model, PROMPT, 3)
    stream.close()
    assert engine.last_stats.generated_tokens == 3


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -1.0), ("top_k", 0),
                                         ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", 0.0),
                                         ("seed", 1.5), ("temperature", float("nan"))])
def test_sampling_params_are_validated(field, value):
    with pytest.raises(PoelmError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_generate(trained_like_model_dir, capsys):
    from poelm.app.cli import main

    assert main(["generate", str(trained_like_model_dir), "--prompt", "The model", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and len(out) > 1 and "<|" not in out
    assert "tok/s" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", str(trained_like_model_dir), "--prompt", "hi", "--chat", "--max-new-tokens", "6",
                 "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--repetition-penalty", "1.2",
                 "--seed", "3", "--exit-stage", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", str(trained_like_model_dir), "--prompt", "hi", "--exit-stage", "5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "exit stage 5 out of range" in err
    assert main(["generate", str(trained_like_model_dir) + "-missing", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["generate", str(trained_like_model_dir), "--prompt", "hi", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_cli_chat(trained_like_model_dir, capsys, monkeypatch):
    from poelm.app.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nhow are you\n/quit\nnot read\n"))
    assert main(["chat", str(trained_like_model_dir), "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert not out.startswith("> ")  # no prompt when stdin is not a terminal
    # Two answers (the blank line skipped, nothing read after /quit); a random model's text may hold
    # newlines itself, so count the stats lines on stderr.
    assert out.endswith("\n") and err.count("tok/s") == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", str(trained_like_model_dir), "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and len(out) > 1 and err.count("tok/s") == 1
