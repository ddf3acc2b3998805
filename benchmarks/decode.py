"""Decoding speed of one model, measured side by side: transformers' generate, the engine at full
depth, each exit stage (prefix pruning), and self-speculative greedy decoding for several K and S.

Greedy, the same prompts, median of rounds after an untimed warm-up; the engine also at batch 16 (the 4
prompts x 4, one batch: aggregate tokens/s against batch 1, `x_batch1`, and whether every row equals its
own decoding). Prints a table (or one JSON object with --json) with tokens/s, the ratio to
transformers' generate, the engine's ratio, speculative acceptance and tokens per verification, and
whether every speculative setting produced exactly the plain greedy tokens.
Adaptive depth is measured against full-depth Log-OP greedy decoding (its target), with the bounds
`poelm calibrate` stored beside the model (skipped, with a note, when there are none), and with those
bounds scaled x2 and x4 (more conservative): top-1 agreement and the exit histogram are reported
(beside the engine decoding the Log-OP at full depth, their target).
Then the same speculative settings in bfloat16, against the engine in bfloat16: how many outputs are
identical, the share of tokens before the first divergence, and the largest engine margin (top logit
minus the logit of the token speculative chose) at a divergence — the near-ties where a k-row block
and a one-row step round differently (speculative.py states the guarantee). A benchmark, not a test.

Next to every wall-clock figure, the compute-only one: `flops_per_token` (analytic FLOPs per produced
token, prefill included: benchmarks/flops.py says what is counted) and `x_engine_flops` (the engine's
FLOPs per token over this row's: the speedup the algorithm alone would give). `x_engine` against
`x_engine_flops` tells overhead from algorithm: speculative rows use the measured acceptance, adaptive
rows the measured exit histogram. `--quick`: one round, K in (2, 4).

Also: speculative decoding of the 16 rows as one batch (ragged acceptance; every row identical to its
own greedy decoding) against the engine at batch 16; `step_ms`, where a token's time goes (one full
decode step, one draft step per draft stage, one verification of K positions, through the model's
own layer walk), and for each speculative row the speedup those step times predict
(`time_model_x_engine` = tokens per verification x full step / (K x draft step + verification)): the
gap to the measured `x_engine` is the decoder's own overhead. `targets`: the issue's figures, each
with its target and whether this run reached it.

    python benchmarks/decode.py MODELDIR [--json] [--new-tokens 64] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from poelm.core.errors import PoelmError
from poelm.core.model import KVCache
from poelm.infer import DecodeMode, SamplingParams, make_decoder
from poelm.infer.adaptive import AdaptiveDecoder, load_calibration
from poelm.infer.speculative import compare_with_engine
from poelm import models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import adaptive_flops, engine_flops, speculative_flops, step_split  # noqa: E402

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self", "import os\n\ndef walk(", "    return self."]


def timed(fn, rounds: int) -> tuple[float, list]:
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.inference_mode()
def step_times(model, prompt: list[int], drafts: list[int], ks: tuple[int, ...], reps: int = 30) -> dict:
    """Where a token's time goes: milliseconds (median of `reps`) of one full decode step, one draft
    step of each draft stage S (layers 0..end(S) and its read-out), and one verification of K drafted
    positions (the deeper layers over a K-row block and their read-out), all through the model's own
    layer walk, after `prompt` is cached (the cache is cropped back after each)."""
    c = model.config
    cache = KVCache()
    model(torch.tensor([prompt]), cache=cache)
    base, last = cache.get_seq_length(), prompt[-1]

    def median_ms(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            model.rollback(cache, base, last)
        return 1e3 * statistics.median(times)

    one = torch.tensor([[last]])
    out = {"full step": median_ms(lambda: model(one, cache=cache))}

    def draft(s: int):
        walk = model.run_layers(model.begin(one, cache), c.stage_ends[s] + 1, cache)
        return model.readout(walk, s)

    def verify(s: int, k: int):
        walk = model.run_layers(model.begin(torch.tensor([[last] * k]), cache), c.stage_ends[s] + 1, cache)
        t0 = time.perf_counter()
        for stage in range(s + 1, c.n_stages):
            walk = model.run_layers(walk, c.stage_ends[stage] + 1, cache)
        model.readout(walk, c.n_stages - 1)
        return time.perf_counter() - t0

    for s in drafts:
        out[f"draft step S={s}"] = median_ms(lambda: draft(s))
        for k in ks:
            times = []
            for _ in range(reps):
                times.append(verify(s, k))
                model.rollback(cache, base, last)
            out[f"verify S={s} K={k}"] = 1e3 * statistics.median(times)
    return out


class Bench:
    """What every measurement shares: the model, the prompts, the settings, and the timed decoders' rows."""

    def __init__(self, args):
        chain = models.open(args.model)
        self.model, self.tok = chain.model(), chain.tokenizer()
        del chain  # the model holds its own copy of the tensors
        self.model_dir, self.rounds, self.n = args.model, args.rounds, args.new_tokens
        self.ks = (2, 4) if args.quick else (2, 4, 6)
        self.c = self.model.config
        self.prompts = [[self.tok.bos_id] + self.tok.encode(t) for t in PROMPTS]
        self.lens = [len(ids) for ids in self.prompts]
        self.batch = [ids for _ in range(4) for ids in self.prompts]  # 16 rows
        self.greedy = SamplingParams(max_new_tokens=self.n)
        self.rows: dict[str, dict] = {}

    def decoder(self, mode: DecodeMode):  # no early stop: every setting decodes n tokens
        return make_decoder(self.model, mode, stop_ids=set(), model_dir=self.model_dir)

    def all_prompts(self, dec) -> list[list[int]]:
        return [dec.generate(ids, self.greedy) for ids in self.prompts]

    def timed(self, fn) -> tuple[float, list]:
        return timed(fn, self.rounds)

    def rate(self, seconds: float, rows: int | None = None) -> float:
        return self.n * (rows or len(self.prompts)) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one round, K in (2, 4)")
    args = p.parse_args()
    if args.quick:
        args.rounds = 1
    b = Bench(args)
    reference = measure_engine(b)
    times = measure_speculative(b, reference)
    measure_adaptive(b)
    measure_bf16(b)
    targets = add_ratios(b.rows, engine_flops(b.c, b.lens, b.n))
    split_position = max(b.lens) + b.n // 2
    split = step_split(b.c, position=split_position)
    if args.json:
        c = b.c
        print(json.dumps({
            "model": args.model, "new_tokens": b.n, "prompts": len(b.prompts), "prompt_tokens": b.lens,
            "rounds": args.rounds, "threads": torch.get_num_threads(),
            "config": {"n_layer": c.n_layer, "n_embd": c.n_embd, "poe_stage_layers": c.poe_stage_layers,
                       "vocab_size": c.vocab_size, "poe_output": c.poe_output},
            "step_flops": {"layers": int(split.layers), "heads": int(split.heads),
                           "layer_share": round(split.layers / split.total, 3)},
            "step_ms": {k: round(v, 3) for k, v in times.items()},
            "targets": {k: {"measured": round(m, 3), "target": t, "reached": m >= t} for k, (m, t) in targets.items()},
            "rows": {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                     for k, v in b.rows.items()}}))
        return
    print_rows(b.rows)
    print(f"one decode step at position {split_position}: layers {split.layers / 1e6:.2f}M FLOPs "
          f"({split.layers / split.total:.0%}), head read-outs {split.heads / 1e6:.2f}M")
    print("step times (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()))
    for name, (measured, target) in targets.items():
        print(f"target {name}: {measured:.2f}x (target {target}x) {'reached' if measured >= target else 'NOT reached'}")


def measure_engine(b: Bench) -> list[list[int]]:
    """transformers' generate, the engine at batch 1 and 16, each exit stage; the engine's greedy tokens."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(b.model_dir, trust_remote_code=True).eval()

    def hf_generate(ids):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=b.n, min_new_tokens=b.n, do_sample=False,
                              pad_token_id=b.tok.token_id("<|assistant_end|>"))
        return out[0, len(ids):].tolist()

    # Warm-up, untimed (first calls pay for allocations and kernel choices; with --rounds 1 they would be timed).
    hf_generate(b.prompts[0])
    b.all_prompts(b.decoder(DecodeMode()))
    b.decoder(DecodeMode(speculative=2, draft_stage=0)).generate(b.prompts[0], b.greedy)
    seconds, _ = b.timed(lambda: [hf_generate(ids) for ids in b.prompts])
    engine_fpt = engine_flops(b.c, b.lens, b.n)  # the same forward as poelm's engine, through transformers
    b.rows["transformers generate"] = {"tok_per_s": b.rate(seconds), "flops_per_token": engine_fpt}
    engine = b.decoder(DecodeMode())
    seconds, reference = b.timed(lambda: b.all_prompts(engine))
    b.rows["engine (full depth)"] = {"tok_per_s": b.rate(seconds), "flops_per_token": engine_fpt}
    seconds, outs = b.timed(lambda: engine.generate_batch(b.batch, b.greedy))
    b.rows["engine batch 16 (aggregate)"] = {
        "tok_per_s": b.rate(seconds, len(b.batch)),
        "flops_per_token": engine_flops(b.c, [len(r) for r in b.batch], b.n, batched=True),
        "rows_identical_to_alone": outs == reference * 4}
    for k in range(b.c.n_stages - 1):
        exit_k = b.decoder(DecodeMode(exit_stage=k))
        seconds, _ = b.timed(lambda: b.all_prompts(exit_k))
        b.rows[f"engine exit stage {k}"] = {"tok_per_s": b.rate(seconds),
                                            "flops_per_token": engine_flops(b.c, b.lens, b.n, exit_stage=k)}
    return reference


def measure_speculative(b: Bench, reference: list[list[int]]) -> dict:
    """Every (S, K), one prompt at a time and as a batch of 16; the step times and what they predict."""
    for s in range(b.c.n_stages - 1):
        for k in b.ks:
            spec = b.decoder(DecodeMode(speculative=k, draft_stage=s))  # its stats accumulate over the rounds
            seconds, outs = b.timed(lambda: b.all_prompts(spec))
            st = spec.stats
            b.rows[f"speculative S={s} K={k}"] = {
                "tok_per_s": b.rate(seconds), "flops_per_token": speculative_flops(b.c, s, st, b.lens * b.rounds, b.n),
                "acceptance": st.acceptance,
                "tokens_per_verification": st.tokens_per_verification, "greedy_identical": outs == reference}
    spec = b.decoder(DecodeMode(speculative=4, draft_stage=0))  # a batch: ragged acceptance, rows as alone
    seconds, outs = b.timed(lambda: spec.generate_batch(b.batch, b.greedy))
    b.rows["speculative S=0 K=4 batch 16 (aggregate)"] = {
        "tok_per_s": b.rate(seconds, len(b.batch)), "acceptance": spec.stats.acceptance,
        "flops_per_token": speculative_flops(b.c, 0, spec.stats, [len(r) for r in b.batch] * b.rounds, b.n),
        "tokens_per_verification": spec.stats.tokens_per_verification, "greedy_identical": outs == reference * 4}
    times = step_times(b.model, b.prompts[0], list(range(b.c.n_stages - 1)), b.ks)
    for s in range(b.c.n_stages - 1):  # the time model: what the measured step times predict for a round
        for k in b.ks:
            r = b.rows[f"speculative S={s} K={k}"]
            r["time_model_x_engine"] = (r["tokens_per_verification"] * times["full step"]
                                        / (k * times[f"draft step S={s}"] + times[f"verify S={s} K={k}"]))
    return times


def measure_adaptive(b: Bench) -> None:
    """The engine decoding the Log-OP at full depth, and adaptive depth (its bounds x1, x2, x4) against it."""
    logop_engine = b.decoder(DecodeMode(output="logop"))
    seconds, logop_reference = b.timed(lambda: b.all_prompts(logop_engine))
    logop_fpt = engine_flops(b.c, b.lens, b.n, output="logop")
    b.rows["engine Log-OP (full depth)"] = {"tok_per_s": b.rate(seconds), "flops_per_token": logop_fpt}
    try:
        bounds = load_calibration(b.model_dir, b.c.n_stages)
    except PoelmError as e:
        print(f"adaptive rows skipped: {e}", file=sys.stderr)  # stdout stays one JSON object
        return
    for scale in (1, 2, 4):
        adaptive = AdaptiveDecoder(b.model, [x * scale for x in bounds], set())  # scaled: built here, not from a mode
        seconds, outs = b.timed(lambda: b.all_prompts(adaptive))
        same = sum(x == y for o, r in zip(outs, logop_reference) for x, y in zip(o, r))
        exits = [e // b.rounds for e in adaptive.stats.exits]
        fpt = adaptive_flops(b.c, exits, b.lens, b.n)
        b.rows[f"adaptive bounds x{scale}"] = {"tok_per_s": b.rate(seconds), "flops_per_token": fpt,
                                               "x_logop_engine_flops": logop_fpt / fpt,
                                               "top1_agreement": same / (b.n * len(b.prompts)), "exits": exits}


def measure_bf16(b: Bench) -> None:
    """The speculative settings in bfloat16 against the engine in bfloat16: where they diverge."""
    bf16 = models.open(b.model_dir).model(dtype=torch.bfloat16)
    for s in range(b.c.n_stages - 1):
        for k in b.ks:
            a = compare_with_engine(bf16, b.prompts, b.n, draft_stage=s, k=k)
            b.rows[f"bf16 speculative S={s} K={k}"] = {
                "identical_outputs": f"{a.identical}/{a.prompts}", "tokens_before_divergence": a.agreeing / a.tokens,
                "max_divergence_margin": max((d.engine_margin for d in a.divergences), default=0.0)}


def add_ratios(rows: dict[str, dict], engine_fpt: float) -> dict[str, tuple[float, float]]:
    """Each row against transformers, the engine (time and FLOPs), batch 1 and the Log-OP engine; the
    issue's figures as {name: (measured, target)}."""
    base = rows["transformers generate"]["tok_per_s"]
    engine_rate = rows["engine (full depth)"]["tok_per_s"]
    for r in rows.values():
        if "tok_per_s" in r:
            r["x_transformers"] = r["tok_per_s"] / base
            r["x_engine"] = r["tok_per_s"] / engine_rate
            r["flops_per_token"] = int(round(r["flops_per_token"]))
            r["x_engine_flops"] = engine_fpt / r["flops_per_token"]
    batch16 = rows["engine batch 16 (aggregate)"]
    batch16["x_batch1"] = batch16["x_engine"]
    rows["speculative S=0 K=4 batch 16 (aggregate)"]["x_engine_batch16"] = (
        rows["speculative S=0 K=4 batch 16 (aggregate)"]["tok_per_s"] / batch16["tok_per_s"])
    logop_rate = rows["engine Log-OP (full depth)"]["tok_per_s"]
    for name, r in rows.items():
        if name.startswith("adaptive"):
            r["x_logop_engine"] = r["tok_per_s"] / logop_rate
    speculative = {name: r for name, r in rows.items() if name.startswith("speculative S=") and "batch" not in name}
    best = max(speculative, key=lambda name: speculative[name]["x_engine"])
    adaptive = {name: r for name, r in rows.items() if name.startswith("adaptive") and r["top1_agreement"] == 1.0}
    targets = {  # the figures: (measured, target)
        "engine batch 16 vs batch 1": (batch16["x_batch1"], 8.0),
        "engine vs transformers generate": (rows["engine (full depth)"]["x_transformers"], 2.0),
        f"speculative vs engine (best: {best})": (speculative[best]["x_engine"], 1.5),
    }
    if adaptive:
        name = max(adaptive, key=lambda a: adaptive[a]["x_logop_engine"])
        targets[f"adaptive at 100% agreement vs the Log-OP engine (best: {name})"] = (adaptive[name]["x_logop_engine"], 1.3)
    return targets


def print_rows(rows: dict[str, dict]) -> None:
    for name, r in rows.items():
        if "identical_outputs" in r:
            print(f"{name:<28} identical outputs {r['identical_outputs']}, {r['tokens_before_divergence']:.1%} of "
                  f"tokens before a divergence, largest engine margin there {r['max_divergence_margin']:.3f}")
            continue
        compute = f"  {r['flops_per_token'] / 1e6:7.2f} MFLOP/tok  {r['x_engine_flops']:5.2f}x engine FLOPs"
        if "rows_identical_to_alone" in r:
            print(f"{name:<28} {r['tok_per_s']:8.1f} tok/s  {r['x_batch1']:5.2f}x the engine at batch 1{compute}; "
                  f"every row identical to its own decoding: {r['rows_identical_to_alone']}")
            continue
        extra = (f"  acceptance {r['acceptance']:.1%}, {r['tokens_per_verification']:.2f} tok/verify, "
                 f"identical {r['greedy_identical']}" if "acceptance" in r else "")
        if "time_model_x_engine" in r:
            extra += f", step times predict {r['time_model_x_engine']:.2f}x"
        if "x_engine_batch16" in r:
            extra += f", {r['x_engine_batch16']:.2f}x the engine at batch 16"
        if "top1_agreement" in r:
            extra = (f"  {r['x_logop_engine']:.2f}x Log-OP engine ({r['x_logop_engine_flops']:.2f}x its FLOPs), "
                     f"agreement {r['top1_agreement']:.1%} with Log-OP greedy, exits {r['exits']}")
        print(f"{name:<28} {r['tok_per_s']:8.1f} tok/s  {r['x_transformers']:5.2f}x hf  {r['x_engine']:5.2f}x engine"
              f"{compute}{extra}")


if __name__ == "__main__":
    from entry import run  # one line on bad input, never a traceback (benchmarks/entry.py)

    run(main)
