"""Specialist-stage training against full fine-tuning of the same assembled model, side by side.

Stage only: the parent's layers run without autograd (`frozen_layers`), only the new blocks, their
lambdas and the specialist head train. Full: every parameter trains, autograd through all layers. Same
shape, batch and optimizer family; the two alternate in rounds and the median step time is used.
Prints one JSON line with both tokens/s and "ratio" (stage / full: how much faster the stage trains).
The seed's shape (24 frozen + 4 new layers) allows about 3x; a benchmark, not a test.

    python benchmarks/stage_train.py [--json] [--base-layers 12 --stage-layers 2 --n-embd 256 --vocab 8192
                                      --seq-len 256 --batch 8 --rounds 4]
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
from poelm.models.specialist import freeze_for_specialist, specialist_config

from entry import model_flags  # benchmarks/entry.py


def build(args, stage_only: bool):
    base = PoEConfig(vocab_size=args.vocab, n_layer=args.base_layers, n_head=args.n_embd // 64,
                     n_kv_head=args.n_embd // 64, n_embd=args.n_embd, sequence_len=args.seq_len,
                     poe_stage_layers=[args.base_layers])
    model = PoEGPT(specialist_config(base, args.stage_layers))
    model.init_weights(0)
    partial = freeze_for_specialist(model) if stage_only else []
    return model, build_optimizer(model, no_decay=set(partial))


def step(model, optimizer, x, y, frozen: int) -> float:
    t0 = time.perf_counter()
    model(x, targets=y, frozen_layers=frozen).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--base-layers", type=int, default=12)
    p.add_argument("--stage-layers", type=int, default=2)
    model_flags(p, n_embd=256, vocab=8192, seq_len=256, batch=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps-per-round", type=int, default=2)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    y = x.roll(-1, 1)
    runs = {"stage": (*build(args, True), args.base_layers, []), "full": (*build(args, False), 0, [])}
    for model, opt, frozen, _ in runs.values():
        step(model, opt, x, y, frozen)  # warm-up
    for _ in range(args.rounds):
        for model, opt, frozen, times in runs.values():
            times += [step(model, opt, x, y, frozen) for _ in range(args.steps_per_round)]
    tokens = args.batch * args.seq_len
    rate = {k: tokens / statistics.median(v[3]) for k, v in runs.items()}
    trainable = {k: sum(p.numel() for p in v[0].parameters() if p.requires_grad) for k, v in runs.items()}
    result = {"shape": {"base_layers": args.base_layers, "stage_layers": args.stage_layers, "n_embd": args.n_embd,
                        "vocab": args.vocab, "seq_len": args.seq_len, "batch": args.batch,
                        "threads": torch.get_num_threads()},
              "trainable_params": trainable, "stage_tok_per_s": round(rate["stage"], 1),
              "full_tok_per_s": round(rate["full"], 1), "ratio": round(rate["stage"] / rate["full"], 3)}
    if not args.json:
        print(f"stage-only {rate['stage']:.0f} tok/s vs full fine-tuning {rate['full']:.0f} tok/s")
    print(json.dumps(result))


if __name__ == "__main__":
    from entry import run  # one line on bad input, never a traceback (benchmarks/entry.py)

    run(main)
