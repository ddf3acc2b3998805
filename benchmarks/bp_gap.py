"""The paper's comparison at small scale: a PoE base (`flat`) against its backprop control (`none`),
same data, tokens, shape and seed; prints the bpb gap as one JSON line.

The paper (1.3B, docs/model.md §2): PoE 0.7209 vs BP 0.6768 val bpb, a 6.52% gap. Each arm is judged by
its own predictor: the Log-OP of all stages for `flat`, the last stage for `none` (its early stages
are never trained to predict). Runs go to OUT/none and OUT/flat (resumable with --resume).

    python benchmarks/bp_gap.py --tokenizer TOKDIR --data PATH [PATH ...] --out RUNROOT
        [--depth 4 --n-embd 128 --n-head 2 --stages 2,2 --seq-len 256 --steps 150 --batch 8 --seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from poelm.core.config import PoEConfig
from poelm.core.tokenizer import Tokenizer
from poelm.train.pretrain import PretrainArgs, pretrain

from entry import model_flags  # benchmarks/entry.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", required=True)
    model_flags(p, depth=4, n_embd=128, n_head=2, stages="2,2", seq_len=256, batch=8)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    vocab = Tokenizer.load(args.tokenizer).vocab_size
    result = {}
    for mode in ("none", "flat"):
        config = PoEConfig(vocab_size=vocab, n_layer=args.depth, n_head=args.n_head, n_kv_head=args.n_head,
                           n_embd=args.n_embd, sequence_len=args.seq_len,
                           poe_stage_layers=[int(s) for s in args.stages.split(",")], poe_mode=mode)
        summary = pretrain(PretrainArgs(
            data=args.data, out=str(Path(args.out) / mode), tokenizer=args.tokenizer, config=config,
            steps=args.steps, device_batch_size=args.batch, eval_every=args.eval_every,
            eval_tokens=args.eval_tokens, seed=args.seed, resume=args.resume, sample_tokens=0))
        result[mode] = {"predictor": summary["best_key"], "val_bpb": summary["best_val_bpb"],
                        "step": summary["best_step"]}
    gap = result["flat"]["val_bpb"] / result["none"]["val_bpb"] - 1
    print(json.dumps({"bp": result["none"], "poe": result["flat"], "gap": round(gap, 4),
                      "gap_percent": round(100 * gap, 2), "paper_gap_percent": 6.52}))


if __name__ == "__main__":
    from entry import run  # one line on bad input, never a traceback (benchmarks/entry.py)

    run(main)
