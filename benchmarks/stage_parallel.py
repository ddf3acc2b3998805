"""Stage-parallel (P=2) against data-parallel (D=2) pretraining on the same two processes and the same
tokens per step: tokens/s, parameter + optimizer memory per rank, bytes each rank sends per step, and
the pipeline's bubble (the share of a step the last rank waits for its first activations). Both
settings run in one invocation, one after the other, on random tokens (no data files). A benchmark,
not a test.

    python benchmarks/stage_parallel.py [--depth 12 --n-embd 768 --n-head 6 --vocab 32768 --stages 3,3,3,3
                                         --seq-len 256 --batch 2 --accum 4 --steps 3] [--json]

The parent launches `torchrun --nproc_per_node 2` of this file once per setting (`--worker`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from entry import model_flags  # benchmarks/entry.py


def make_config(args):
    """The benchmark's shape (a PoelmError naming the field when it cannot be built)."""
    from poelm.core.config import PoEConfig

    try:
        stages = [int(s) for s in args.stages.split(",")]
    except ValueError:
        from poelm.core.errors import PoelmError

        raise PoelmError(f"--stages {args.stages!r}: expected comma-separated layer counts, e.g. 3,3,3,3") from None
    return PoEConfig(vocab_size=args.vocab, n_layer=args.depth, n_head=args.n_head, n_kv_head=args.n_head,
                     n_embd=args.n_embd, sequence_len=args.seq_len, poe_stage_layers=stages, poe_mode="flat")


def worker(args) -> None:
    from poelm.core.model import PoEGPT
    from poelm.train.optim import optimizer_state
    from poelm.train.dist import init_dist

    d = init_dist("cpu")
    torch.manual_seed(0)
    config = make_config(args)
    model = PoEGPT(config)
    model.init_weights(0)
    g = torch.Generator().manual_seed(1)
    # the same tokens per step: data-parallel ranks take half the micro-batches each
    micro = args.accum if args.mode == "stage" else args.accum // 2
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g) for _ in range(micro)]
    batches = [(b[:, :-1], b[:, 1:]) for b in batches]
    setup = stage_parallel_step if args.mode == "stage" else data_parallel_step
    train_step, optimizer, sent, pipeline = setup(args, d, config, model, batches)
    train_step()  # warm-up (and the optimizer state's allocation)
    times = []
    bubble0 = pipeline.bubble_s if pipeline is not None else 0.0
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        train_step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    tensors, _ = optimizer_state(optimizer)
    memory = sum(p.numel() * p.element_size() for p in model.parameters())
    memory += sum(t.numel() * t.element_size() for t in tensors.values())
    bubble = (pipeline.bubble_s - bubble0) / sum(times) if pipeline is not None else 0.0
    tokens = args.batch * args.seq_len * args.accum
    row = {"rank": d.rank, "tok_per_s": tokens / statistics.median(times), "memory_mb": memory / 2**20,
           "sent_mb_per_step": sent / 2**20, "bubble": bubble}
    rows = [None] * d.world_size
    dist.all_gather_object(rows, row)
    if d.rank == 0:
        with open(args.out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def stage_parallel_step(args, d, config, model, batches):
    """(one optimizer step, the optimizer, bytes this rank sends per step, the pipeline step) with the
    stages split over 2 ranks."""
    from poelm.train.optim import build_optimizer
    from poelm.train.pipeline import PipelineStep, make_pipeline, strip

    pipe = make_pipeline(d, config, 2)
    strip(model, pipe)
    step = PipelineStep(pipe, model)
    optimizer = build_optimizer(model)
    acts = args.batch * args.seq_len * args.n_embd * 4  # float32 residual (and backout) per micro-batch
    backout = 1 if config.backout and config.backout_layer < pipe.layers[1] else 0
    shared = sum(p.numel() * p.element_size() for p in step.shared)
    # an all-reduce over 2 ranks sends about the tensor's size from each rank
    sent = (0 if pipe.last else len(batches) * acts * (1 + backout)) + shared

    def train_step():
        step(batches, lambda y: int((y >= 0).sum()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step, optimizer, sent, step


def data_parallel_step(args, d, config, model, batches):
    """The same, data-parallel (DDP): every rank holds the whole model."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from poelm.train.optim import build_optimizer

    ddp = DDP(model)
    optimizer = build_optimizer(model)
    sent = sum(p.numel() * p.element_size() for p in model.parameters())  # every gradient, all-reduced

    def train_step():
        count = sum(int((y >= 0).sum()) for _, y in batches) * d.world_size
        for i, (x, y) in enumerate(batches):
            with ddp.no_sync() if i < len(batches) - 1 else nullcontext():  # DDP averages: undo it
                (ddp(x, targets=y, loss_reduction="sum").loss * d.world_size / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step, optimizer, sent, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_flags(p, depth=12, n_embd=768, n_head=6, vocab=32768, stages="3,3,3,3", seq_len=256, batch=2)
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step in all (even)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("stage", "data"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    make_config(args)  # a shape that cannot be built is one line here, not a trace from each worker
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("data", "stage"):
            out = os.path.join(tmp, f"{mode}.json")
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k not in ("json", "worker", "mode", "out")]
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                __file__, "--worker", f"--mode={mode}", f"--out={out}", *flags],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{mode}-parallel run failed:\n{r.stderr[-3000:]}")
            with open(out) as f:
                result[mode] = json.load(f)
    data, stage = result["data"], result["stage"]
    summary = {
        "shape": {k: getattr(args, k) for k in ("depth", "n_embd", "vocab", "stages", "seq_len", "batch", "accum")},
        "tok_per_s": {"data": round(data[0]["tok_per_s"], 1), "stage": round(stage[0]["tok_per_s"], 1)},
        "stage_vs_data_tok_per_s": round(stage[0]["tok_per_s"] / data[0]["tok_per_s"], 3),
        "memory_mb_per_rank": {"data": [round(r["memory_mb"], 1) for r in data],
                               "stage": [round(r["memory_mb"], 1) for r in stage]},
        "stage_vs_data_memory": round(max(r["memory_mb"] for r in stage) / max(r["memory_mb"] for r in data), 3),
        "sent_mb_per_step_per_rank": {"data": [round(r["sent_mb_per_step"], 1) for r in data],
                                      "stage": [round(r["sent_mb_per_step"], 1) for r in stage]},
        "bubble_last_rank": round(stage[-1]["bubble"], 3),
    }
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=1))


if __name__ == "__main__":
    from entry import run  # one line on bad input, never a traceback (benchmarks/entry.py)

    run(main)
