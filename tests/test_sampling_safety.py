"""Sampling is numerically safe for every value `SamplingParams` admits, and a row whose token cannot be
picked fails alone: in the engine's and the speculative batch (its batch-mates give their tokens alone)
and through the server's scheduler (one ("error", ...) event for its job, the others finish normally).
Issue 24, item 4: `temperature: 1e-300` overflowed in sampling and failed every row of the batch."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from poelm.app.cli import main
from poelm.core.errors import PoelmError
from poelm.infer import Engine, SamplingParams, sample_next
from poelm.infer.sampling import SEED_MAX, SEED_MIN, tempered, tempered_probs
from poelm.infer.speculative import SpeculativeDecoder

from util import tiny_model

TINY_TEMPERATURES = [5e-324, 1e-300, 1e-45, 1e-10]  # every one rounds a float32 division to +-inf or 0/0
TEMPERATURES = TINY_TEMPERATURES + [0.7, 2.0, 1e6, 1e300, 1.7976931348623157e308]


def scores_of(seed: int, ties: int = 1) -> torch.Tensor:
    """(50,) float32 scores with -inf entries and `ties` ids sharing the max exactly (ids 7, 31, 44)."""
    s = torch.randn(50, generator=torch.Generator().manual_seed(seed)) * 3
    s[[3, 20, 49]] = float("-inf")
    s[[7, 31, 44][:ties]] = s.max() + 1.5
    return s


def draws(scores: torch.Tensor, params: SamplingParams, n: int = 60, seen: torch.Tensor | None = None) -> set[int]:
    return {sample_next(scores, seen, params, torch.Generator().manual_seed(i)) for i in range(n)}


@pytest.mark.parametrize("t", TEMPERATURES)
def test_every_admitted_temperature_samples_a_valid_token(t):
    s = scores_of(0)
    got = draws(s, SamplingParams(temperature=t))
    assert got and all(0 <= i < 50 and s[i] > float("-inf") for i in got)
    if t in TINY_TEMPERATURES:
        assert got == {7}  # the argmax alone


@pytest.mark.parametrize("t", TINY_TEMPERATURES)
def test_a_tiny_temperature_samples_only_among_exact_ties(t):
    got = draws(scores_of(1, ties=3), SamplingParams(temperature=t))
    assert got == {7, 31, 44}  # uniform over the tied ids: each one missed in 60 draws has p ~ 3e-11


@pytest.mark.parametrize("p", [5e-324, 1e-45, 1e-10])
@pytest.mark.parametrize("t", [1e-300, 1.0])
def test_a_tiny_top_p_keeps_the_top_token(p, t):
    assert draws(scores_of(2), SamplingParams(temperature=t, top_p=p)) == {7}
    assert draws(scores_of(2, ties=2), SamplingParams(temperature=t, top_p=p)) <= {7, 31}
    # at t = 1e300 every finite score is equally likely (float32 cannot tell them apart): any one of them
    assert len(draws(scores_of(2), SamplingParams(temperature=1e300, top_p=p))) >= 1


@pytest.mark.parametrize("t", [1e-300, 1.0])
def test_top_k_one_keeps_the_argmax_and_its_ties(t):
    assert draws(scores_of(3), SamplingParams(temperature=t, top_k=1)) == {7}
    assert draws(scores_of(3, ties=2), SamplingParams(temperature=t, top_k=1, top_p=5e-324)) <= {7, 31}
    assert draws(scores_of(3, ties=2), SamplingParams(temperature=t, top_k=10**30)) <= set(range(50))


@pytest.mark.parametrize("penalty", [5e-324, 1e-300, 1e300])
@pytest.mark.parametrize("t", [0.0, 1e-300, 1.0])
def test_extreme_repetition_penalties_stay_finite(penalty, t):
    """A penalty that rounds to 0 in float32 sends positive seen scores to +inf (and 0 / 0 was a nan);
    one that rounds to inf sends negative ones to -inf."""
    s = scores_of(4)
    s[[10, 11, 12]] = torch.tensor([0.0, 0.5, -0.5])
    seen = torch.tensor([10, 11, 12, 11])
    got = draws(s, SamplingParams(temperature=t, repetition_penalty=penalty), n=20, seen=seen)
    assert got and all(s[i] > float("-inf") for i in got)
    if penalty < 1:
        assert got == {11}  # the one positive seen score, now +inf, is the argmax


def test_tempered_scores_and_probabilities():
    s = scores_of(5, ties=2)
    s[0] = float("inf")  # a +inf max (what a tiny repetition penalty makes): +inf - +inf is no nan
    for t in TEMPERATURES:
        out = tempered(s, t)
        assert not out.isnan().any() and (out <= 0).all() and out[0] == 0
        assert torch.equal(tempered_probs(s, t), torch.nn.functional.one_hot(torch.tensor(0), 50).float())
    s = scores_of(5)
    for t in [0.3, 0.7, 1.0, 2.0]:  # ordinary temperatures: the distribution of s / t
        torch.testing.assert_close(tempered_probs(s, t), torch.softmax(s / t, dim=-1))
    batched = torch.stack([scores_of(6), scores_of(7, ties=3)])  # (2, V): per row
    torch.testing.assert_close(tempered_probs(batched, 1e-300)[1, [7, 31, 44]], torch.full((3,), 1 / 3))


def test_the_seed_takes_the_generators_whole_range():
    model = tiny_model().eval()
    engine = Engine(model, stop_ids=set())
    for seed in (SEED_MIN, -1, SEED_MAX):
        assert len(engine.generate([1, 2, 3], SamplingParams(max_new_tokens=3, temperature=1.0, seed=seed))) == 3
    for seed in (SEED_MIN - 1, SEED_MAX + 1, 10**30):
        with pytest.raises(PoelmError, match=r"SamplingParams\.seed=") as e:
            SamplingParams(seed=seed)
        assert str(SEED_MAX) in str(e.value)
    assert (SEED_MIN, SEED_MAX) == (-2**63, 2**64 - 1)  # exactly what torch takes:
    for seed in (SEED_MIN - 1, SEED_MAX + 1):
        with pytest.raises((ValueError, OverflowError, RuntimeError)):
            torch.Generator().manual_seed(seed)


# ---- the command line ------------------------------------------------------------------------

def generate(capsys, model_dir, *flags) -> tuple[str, int]:
    """`poelm generate` with `flags`: (its answer on stdout, the tokens it reports on stderr)."""
    code = main(["generate", str(model_dir), "--prompt", "The model", "--max-new-tokens", "6", *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, int(re.search(r"(\d+) tokens in", err).group(1))


def test_cli_generate_at_a_tiny_temperature_is_greedy(trained_like_model_dir, capsys):
    greedy, n = generate(capsys, trained_like_model_dir)
    assert n >= 1
    assert generate(capsys, trained_like_model_dir, "--temperature", "1e-300") == (greedy, n)
    spec = ["--speculative", "2", "--draft-stage", "0"]
    assert generate(capsys, trained_like_model_dir, "--temperature", "1e-300", *spec) == (greedy, n)
    assert generate(capsys, trained_like_model_dir, "--temperature", "5e-324", "--top-p", "5e-324") == (greedy, n)


def test_cli_a_seed_out_of_range_is_one_line(trained_like_model_dir, capsys):
    code = main(["generate", str(trained_like_model_dir), "--prompt", "x", "--seed", str(2**64)])
    err = capsys.readouterr().err
    assert code == 2 and "SamplingParams.seed=" in err and "Traceback" not in err


# ---- a row that fails alone ------------------------------------------------------------------

PROMPTS = [[5, 9, 2], [17, 3, 3, 8, 250, 41, 7], [99], [60, 61, 62, 63, 64]]


def broken(row) -> None:
    row.generator = "not a generator"  # torch.multinomial / torch.rand raise TypeError on it


def run_breaking_the_last(batch, rows, alone, when: int) -> list[int]:
    """Step `batch` to the end, breaking the last row before step `when`; check that the others gave their
    tokens alone and the broken one ended with a TypeError; return the tokens it had before."""
    steps, before = 0, []
    while len(batch):
        if steps == when:
            broken(rows[-1])
            before = list(rows[-1].tokens)
        batch.step()
        steps += 1
    assert [r.tokens for r in rows[:-1]] == alone[:-1]
    assert all(r.error is None and r.done for r in rows[:-1])
    assert rows[-1].done and rows[-1].error.startswith("TypeError: ")
    return before


@pytest.mark.parametrize("when", [0, 3])
def test_an_engine_batch_row_that_fails_ends_alone(when):
    """Three rows (greedy, sampled, sampled at a tiny temperature with a penalty) beside a sampled row
    whose generator breaks before step `when`: they give their tokens alone, it ends with `error`."""
    model = tiny_model().eval()
    engine = Engine(model, stop_ids=set())
    params = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=10, temperature=0.9, seed=3),
              SamplingParams(max_new_tokens=6, temperature=1e-300, repetition_penalty=1.3, top_k=5),
              SamplingParams(max_new_tokens=8, temperature=0.8, seed=5)]
    alone = [engine.generate(p, q) for p, q in zip(PROMPTS, params)]
    batch = engine.batch()
    rows = [batch.add(p, q, frozenset()) for p, q in zip(PROMPTS, params)]
    run_breaking_the_last(batch, rows, alone, when)
    assert rows[3].tokens == alone[3][:when]  # what it produced before, nothing after


@pytest.mark.parametrize("when", [0, 2])
def test_a_speculative_batch_row_that_fails_ends_alone(when):
    model = tiny_model(poe_stage_layers=[2, 2]).eval()
    params = [SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=11, temperature=0.9, seed=3),
              SamplingParams(max_new_tokens=7, temperature=1e-300, seed=4),
              SamplingParams(max_new_tokens=12, temperature=0.8, seed=5)]
    alone = [SpeculativeDecoder(model, 0, 3).generate(p, q) for p, q in zip(PROMPTS, params)]
    batch = SpeculativeDecoder(model, 0, 3).batch()
    rows = [batch.add(p, q, frozenset()) for p, q in zip(PROMPTS, params)]
    before = run_breaking_the_last(batch, rows, alone, when)
    assert rows[3].tokens == before == alone[3][:len(before)] and (when == 0) == (before == [])
    assert batch.rows == [] and batch.queued == []


def test_the_scheduler_fails_only_the_job_whose_sampling_raises(tiny_stage):
    """Four jobs in one fleet batch (the base at full depth, greedy and sampled; its stage at exit
    stage 0; and a job whose sampling raises): that job gets one ("error", ...) event and nothing
    else, the others stream the tokens they decode alone and end with ("done", ...)."""
    from poelm.infer import DecodeMode
    from poelm.serve.models import load_served
    from poelm.serve.scheduler import Job, Scheduler

    served = load_served([str(d) for d in tiny_stage])
    base, stage = list(served)
    bad = SamplingParams(max_new_tokens=8, temperature=0.7)
    bad.temperature = float("nan")  # set after the check: sampling then meets nan probabilities
    specs = [(base, DecodeMode(), SamplingParams(max_new_tokens=8), PROMPTS[0]),
             (base, DecodeMode(), SamplingParams(max_new_tokens=9, temperature=0.9, seed=2), PROMPTS[1]),
             (stage, DecodeMode(exit_stage=0), SamplingParams(max_new_tokens=7, temperature=1e-300), PROMPTS[2]),
             (stage, DecodeMode(), bad, PROMPTS[3])]
    scheduler = Scheduler(served, max_batch=8)
    alone = [scheduler.decoder(name, mode).generate(prompt, params) for name, mode, params, prompt in specs[:3]]
    events: list[list[tuple[str, object]]] = [[] for _ in specs]
    ended = [threading.Event() for _ in specs]

    def sink_of(i):
        def sink(kind, value):
            events[i].append((kind, value))
            if kind in ("done", "error"):
                ended[i].set()
        return sink

    jobs = [Job(name, prompt, params, mode, sink_of(i)) for i, (name, mode, params, prompt) in enumerate(specs)]
    for job in jobs:
        scheduler.check(job)
        scheduler.submit(job)  # all wait until the worker starts, so they join one batch
    scheduler.start()
    try:
        assert all(e.wait(60) for e in ended)
    finally:
        scheduler.stop()
    assert scheduler.shared_steps >= 1  # the base's and the stage's rows stepped in one batch
    for i in range(3):
        assert [v for k, v in events[i] if k == "token"] == alone[i], i
        assert events[i][-1][0] == "done" and not any(k == "error" for k, _ in events[i])
    assert len(events[3]) == 1 and events[3][0][0] == "error"
    assert events[3][0][1].startswith("RuntimeError: ") and "probability tensor" in events[3][0][1]
    assert scheduler._jobs == {} and scheduler.active == 0
