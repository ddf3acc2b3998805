"""Build the decode benchmark's paper-shaped base: 4 stages of equal depth, wide enough that the layers
(not the head) dominate a token's FLOPs, trained on the standard library's source for a wall-clock
budget, calibrated for adaptive depth.

Every step is the real command line (`python -m poelm ...`, printed as `$ poelm ...`):
1. the tokenizer: the demo's (`runs/demo/tokenizer`) when it exists, else `poelm tokenizer train` on
   the same ~5 MB of stdlib source (8192 tokens);
2. `poelm init`: 8 layers in stages 2,2,2,2, width 384 (3 heads of 128), context 256, `flat` mode;
   prints the FLOPs of one decode step split into layers and head read-outs (benchmarks/flops.py);
3. a 3-step `poelm pretrain` timing run (in OUT/timing), which sets the number of steps the budget
   allows (evaluations, saving and calibration are budgeted too);
4. `poelm pretrain` for those steps (OUT/pretrain), then its `best/` copied to OUT/base;
5. `poelm calibrate OUT/base` on stdlib text (adaptive.json), so the adaptive rows of decode.py run.
Prints the config, tokens, steps, seconds and each stage's final val bpb, and writes OUT/base.json.
A failure prints one line (`bench_base: error: ...`) and exits 2 (benchmarks/entry.py); an existing
OUT/base is refused unless --overwrite (which replaces OUT/init, OUT/timing, OUT/pretrain and OUT/base).

    python benchmarks/bench_base.py [--minutes 10] [--out runs/bench] [--n-embd 384] [--layers 8]
        [--stages 4] [--seq-len 256] [--batch 8] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flops import step_split  # noqa: E402

from poelm.app.demo import CORPUS_BYTES, VOCAB_SIZE  # noqa: E402 - the demo's corpus and vocabulary
from poelm.core.errors import PoelmError  # noqa: E402

DEMO_TOKENIZER = Path("runs/demo/tokenizer")
EVAL_TOKENS = 16384
EVALS = 4  # after step 0


class Failure(PoelmError):
    """What stops the build: one line, `bench_base: error: ...` (benchmarks/entry.py)."""


def poelm(*argv) -> None:
    args = [str(a) for a in argv]
    shown = args if len(args) < 16 else args[:8] + [f"... ({len(args) - 14} more)"] + args[-6:]
    print("$ poelm " + " ".join(shown), flush=True)
    r = subprocess.run([sys.executable, "-m", "poelm", *args])
    if r.returncode != 0:
        raise Failure(f"`poelm {' '.join(args[:2])}` exited with {r.returncode} (its error is above)")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise Failure(f"{path}: missing after the run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build(args) -> dict:
    """The five steps of the module docstring; the summary (also OUT/base.json)."""
    from poelm.core.tokenizer import Tokenizer
    from poelm.data.embedded import stdlib_corpus

    t_start = time.time()
    out = Path(args.out)
    check_args(args, out)
    for name in ("init", "timing", "pretrain", "base"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    paths = stdlib_corpus(CORPUS_BYTES)
    tok_dir = tokenizer(out, paths)
    config, split = init(args, out, tok_dir)
    common = ["--data", *paths, "--device-batch-size", args.batch, "--sample-tokens", 16, "--seed", 0]
    steps, tok_per_s = timing(args, out, common, t_start)
    t0 = time.time()
    poelm("pretrain", "--init", out / "init", "--out", out / "pretrain", "--steps", steps,
          "--eval-every", max(steps // EVALS, 1), "--eval-tokens", EVAL_TOKENS, *common)
    train_s = time.time() - t0
    evals = [r for r in records(out / "pretrain") if "val_bpb" in r]
    best_dir = out / "pretrain" / "best"
    if not best_dir.is_dir():
        raise Failure(f"{best_dir}: missing after the run")
    best_step = json.loads((best_dir / "config.json").read_text())["training"]["step"]
    base = out / "base"
    shutil.copytree(best_dir, base)
    poelm("calibrate", base, "--data", *paths[-20:], "--max-tokens", 64 * args.seq_len)
    tokens = steps * args.batch * args.seq_len
    vocab = Tokenizer.load(tok_dir).vocab_size
    summary = {
        "base": str(base), "tokenizer": str(tok_dir), "vocab_size": vocab,
        "config": {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
                   "poe_stage_layers": config.poe_stage_layers, "sequence_len": config.sequence_len,
                   "poe_output": config.poe_output, "poe_mode": config.poe_mode},
        "flops_split_at_position_64": split,
        "steps": steps, "tokens": tokens, "train_tok_per_s": round(tok_per_s, 1),
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t_start, 1),
        "best_step": best_step, "val_bpb": [[e["step"], e["val_bpb"]] for e in evals],
    }
    (out / "base.json").write_text(json.dumps(summary, indent=1) + "\n")
    first, last = evals[0]["val_bpb"], evals[-1]["val_bpb"]
    for name in last:
        print(f"val bpb {name:<7} {first[name]:.4f} -> {last[name]:.4f}")
    print(f"bench base: {base} ({config.n_layer} layers in stages {config.poe_stage_layers}, width {config.n_embd}, "
          f"vocab {vocab}); {steps} steps, {tokens:,} tokens, {train_s:.0f} s training, "
          f"{time.time() - t_start:.0f} s in all; summary {out / 'base.json'}")
    return summary


def check_args(args, out: Path) -> None:
    if (out / "base").exists() and not args.overwrite:
        raise Failure(f"{out / 'base'}: already exists (pass --overwrite to rebuild it)")
    for name in ("layers", "stages", "n_embd", "seq_len", "batch"):
        if getattr(args, name) < 1:
            raise Failure(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive int")
    if args.layers % args.stages:
        raise Failure(f"--layers {args.layers} does not split into {args.stages} stages of equal depth")


def tokenizer(out: Path, paths: list[str]) -> Path:
    """1. The demo's tokenizer when it exists, else one trained on the same corpus."""
    if DEMO_TOKENIZER.is_dir():
        print(f"tokenizer: reusing {DEMO_TOKENIZER}")
        return DEMO_TOKENIZER
    tok_dir = out / "tokenizer"
    if not tok_dir.is_dir():
        poelm("tokenizer", "train", "--input", *paths, "--vocab-size", VOCAB_SIZE, "--out", tok_dir)
    return tok_dir


def init(args, out: Path, tok_dir: Path):
    """2. `poelm init`, and the FLOPs of a decode step split into layers and head read-outs."""
    from poelm.core.config import PoEConfig

    per = args.layers // args.stages
    stages = ",".join([str(per)] * args.stages)
    poelm("init", "--tokenizer", tok_dir, "--depth", args.layers, "--n-embd", args.n_embd, "--seq-len", args.seq_len,
          "--poe-stage-layers", stages, "--poe-mode", "flat", "--out", out / "init")
    config = PoEConfig.from_json_file(out / "init" / "config.json")
    split = {}
    for output in ("last", "logop"):
        s = step_split(config, position=64, output=output)
        split[output] = {"layers": s.layers, "heads": s.heads, "other": s.other, "layer_share": s.layers / s.total}
        print(f"FLOPs of one full-depth decode step at position 64 (predictor {output}): layers {s.layers / 1e6:.1f}M "
              f"({s.layers / s.total:.0%}), head read-outs {s.heads / 1e6:.1f}M ({s.heads / s.total:.0%})")
    if split[config.poe_output]["layer_share"] < 0.5:
        raise Failure(f"n_embd {args.n_embd}: the head, not the layers, dominates a token's FLOPs; "
                      "choose a wider model")
    return config, split


def timing(args, out: Path, common: list, t_start: float) -> tuple[int, float]:
    """3. A 3-step run: (the steps the budget allows, training tokens/s)."""
    t0 = time.time()
    poelm("pretrain", "--init", out / "init", "--out", out / "timing", "--steps", 3, "--eval-every", 3,
          "--eval-tokens", 2048, *common)
    timing_s = time.time() - t0
    rates = [r["tok_per_s"] for r in records(out / "timing") if "tok_per_s" in r][1:]  # the first warms up
    tok_per_s = statistics.median(rates)
    tokens_per_step = args.batch * args.seq_len
    step_s = tokens_per_step / tok_per_s
    fixed_s = timing_s - 3 * step_s  # startup (corpus tokenised), two small evals, saves: paid again
    eval_s = (EVALS + 1) * EVAL_TOKENS / (2.5 * tok_per_s)  # forward only: ~3x a training token's rate
    calibrate_s = 30.0
    budget = args.minutes * 60 - (time.time() - t_start) - fixed_s - eval_s - calibrate_s
    steps = int(budget / step_s)
    print(f"timing: {tok_per_s:.0f} tok/s in training, {step_s:.2f} s/step of {tokens_per_step} tokens; "
          f"{args.minutes:g} min allow {steps} steps ({steps * tokens_per_step:,} tokens)", flush=True)
    if steps < 10:
        raise Failure(f"--minutes {args.minutes:g} allows only {steps} steps at {step_s:.1f} s/step; give more time")
    shutil.rmtree(out / "timing")
    return steps, tok_per_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget for the whole build (default 10)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="rows of --seq-len per step")
    p.add_argument("--overwrite", action="store_true")
    build(p.parse_args())


if __name__ == "__main__":
    from entry import run  # one line on bad input, never a traceback (benchmarks/entry.py)

    run(main)
