"""What `--stage-loss-fraction F` costs in bits per byte: the demo's pretraining (its base, data and
steps) once per F and seed, the val bpb of every stage and of the Log-OP after the same steps (the mean
over the seeds), side by side, with the training tokens/s (median over steps and seeds). A benchmark,
not a test.

    python benchmarks/stage_loss_fraction.py [--init runs/demo/base-init] [--steps 120]
                                             [--fractions 1,0.5,0.25] [--seeds 0,1,2] [--json]

Needs `make demo` first (its initialised base and tokenizer); the data is the demo's stdlib corpus.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from poelm.core.errors import PoelmError
from poelm.data.embedded import stdlib_corpus
from poelm.app.demo import CORPUS_BYTES, PRETRAIN_BATCH
from poelm.train.metrics import MetricsLog
from poelm.train.pretrain import PretrainArgs, pretrain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", default="runs/demo/base-init")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--fractions", default="1,0.5,0.25")
    p.add_argument("--seeds", default="0", help="one run per F and seed (data order, drawn positions); "
                   "the mean is reported: one run's bpb moves by a few percent with the seed at this size")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not Path(args.init, "config.json").is_file():
        raise PoelmError(f"{args.init}: no model there; run `make demo` first (or give --init)")
    paths = stdlib_corpus(CORPUS_BYTES)
    try:
        seeds = [int(v) for v in args.seeds.split(",")]
        fractions = [float(v) for v in args.fractions.split(",")]
    except ValueError:
        raise PoelmError(f"--seeds {args.seeds!r} / --fractions {args.fractions!r}: expected comma-separated numbers")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for f in fractions:
            runs = []
            for seed in seeds:
                out = Path(tmp) / f"F{f:g}-s{seed}"
                summary = pretrain(PretrainArgs(init=args.init, data=paths, out=str(out), steps=args.steps,
                                                device_batch_size=PRETRAIN_BATCH, eval_every=args.steps,
                                                eval_tokens=32768, sample_tokens=0, seed=seed, stage_loss_fraction=f))
                rates = [r["tok_per_s"] for r in MetricsLog(out).records() if "tok_per_s" in r]
                runs.append({"val_bpb": summary["val_bpb"][-1][1], "tok_per_s": statistics.median(rates)})
            names = list(runs[0]["val_bpb"])
            rows[f"F={f:g}"] = {"val_bpb": {n: statistics.mean(r["val_bpb"][n] for r in runs) for n in names},
                                "logop_per_seed": [round(r["val_bpb"]["logop"], 4) for r in runs],
                                "tok_per_s": round(statistics.median(r["tok_per_s"] for r in runs), 1)}
    ref = rows[next(iter(rows))]["val_bpb"]["logop"]
    for row in rows.values():
        row["logop_vs_first"] = round(row["val_bpb"]["logop"] / ref, 4)
    if args.json:
        print(json.dumps({"steps": args.steps, "runs": rows}))
        return
    names = list(next(iter(rows.values()))["val_bpb"])
    print(f"{'':8}" + "".join(f"{n:>9}" for n in names) + f"{'Log-OP / first':>16}{'tok/s':>9}")
    for name, row in rows.items():
        print(f"{name:8}" + "".join(f"{row['val_bpb'][n]:9.4f}" for n in names)
              + f"{row['logop_vs_first']:16.4f}{row['tok_per_s']:9.0f}")


if __name__ == "__main__":
    from entry import run  # one line on bad input, never a traceback (benchmarks/entry.py)

    run(main)
