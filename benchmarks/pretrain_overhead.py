"""Throughput of PoE `flat` training against the end-to-end `none` control, measured side by side.

Same model shape, batch, data and optimizer; the two modes alternate in rounds so machine noise hits
both alike, and the median step time of each is reported. `--stage-loss-fractions 1,0.5,0.25` times one
flat run per F (every stage but the last scores a fraction F of the positions). Prints one JSON line:
{"shape": ..., "tokens_per_step": ..., "tok_per_s": {"none": .., "flat F=1": .., ...},
 "ratio_vs_none": {"flat F=1": none/flat, ...}} (how much slower flat is; the paper paid 1.33x).
A benchmark, not a test: never asserts a time.

    python benchmarks/pretrain_overhead.py [--depth 4 --n-embd 128 --vocab 8192 --stages 2,2 --seq-len 256
                                            --batch 8 --rounds 5 --stage-loss-fractions 1,0.5,0.25
                                            --device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from poelm.core.config import PoEConfig
from poelm.core.model import PoEGPT
from poelm.train.optim import build_optimizer

from entry import model_flags  # benchmarks/entry.py


def step_time(model, optimizer, x, y, device, fraction: float = 1.0) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(x, targets=y, stage_loss_fraction=fraction)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_flags(p, depth=4, n_embd=128, n_head=2, vocab=8192, stages="2,2", seq_len=256, batch=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--stage-loss-fractions", default="1", help="flat runs, one per F (e.g. 1,0.5,0.25)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    stages = [int(s) for s in args.stages.split(",")]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(device)
    y = x.roll(-1, 1)
    fractions = [float(f) for f in args.stage_loss_fractions.split(",")]
    runs = {}
    for name, mode, fraction in [("none", "none", 1.0)] + [(f"flat F={f:g}", "flat", f) for f in fractions]:
        config = PoEConfig(vocab_size=args.vocab, n_layer=args.depth, n_head=args.n_head, n_kv_head=args.n_head,
                           n_embd=args.n_embd, sequence_len=args.seq_len, poe_stage_layers=stages, poe_mode=mode)
        model = PoEGPT(config).to(device)
        model.init_weights(0)
        optimizer = build_optimizer(model)
        step_time(model, optimizer, x, y, device, fraction)  # warm-up
        runs[name] = (model, optimizer, fraction, [])
    for _ in range(args.rounds):  # interleaved: a noisy moment hits every setting alike
        for name, (model, optimizer, fraction, times) in runs.items():
            times += [step_time(model, optimizer, x, y, device, fraction) for _ in range(args.steps_per_round)]
    tokens = args.batch * args.seq_len
    rate = {name: tokens / statistics.median(times) for name, (_, _, _, times) in runs.items()}
    print(json.dumps({
        "shape": {"depth": args.depth, "n_embd": args.n_embd, "vocab": args.vocab, "stages": stages,
                  "seq_len": args.seq_len, "batch": args.batch, "device": str(device),
                  "threads": torch.get_num_threads()},
        "tokens_per_step": tokens,
        "tok_per_s": {name: round(r, 1) for name, r in rate.items()},
        "ratio_vs_none": {name: round(rate["none"] / r, 3) for name, r in rate.items() if name != "none"},
    }))


if __name__ == "__main__":
    from entry import run  # one line on bad input, never a traceback (benchmarks/entry.py)

    run(main)
