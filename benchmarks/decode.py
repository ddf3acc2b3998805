"""Decoding speed of one model, measured side by side: transformers' generate, the engine at full
depth, each exit stage (prefix pruning), and self-speculative greedy decoding for several K and S.

Greedy, the same prompts, median of rounds; the engine also at batch 16 (the 4 prompts x 4, one
batch: aggregate tokens/s against batch 1, and whether every row equals its own decoding). Prints a table (or one JSON line with --json) with tokens/s,
the ratio to transformers' generate, the engine's ratio, speculative acceptance and tokens per
verification, and whether every speculative setting produced exactly the plain greedy tokens.
Adaptive depth is measured against full-depth Log-OP greedy decoding (its target), with the bounds
`poelm calibrate` stored beside the model (skipped, with a note, when there are none), and with those
bounds scaled x2 and x4 (more conservative): top-1 agreement and the exit histogram are reported.
Then the same speculative settings in bfloat16, against the engine in bfloat16: how many outputs are
identical, the share of tokens before the first divergence, and the largest engine margin (top logit
minus the logit of the token speculative chose) at a divergence — the near-ties where a k-row block
and a one-row step round differently (speculative.py states the guarantee). A benchmark, not a test.

    python benchmarks/decode.py MODELDIR [--json] [--new-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from poelm.core.errors import PoelmError
from poelm.infer import DecodeMode, SamplingParams, make_decoder
from poelm.infer.adaptive import AdaptiveDecoder, load_calibration
from poelm.infer.speculative import compare_with_engine
from poelm.modeldir import load_model, load_tokenizer

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self", "import os\n\ndef walk(", "    return self."]


def timed(fn, rounds: int) -> tuple[float, list]:
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    prompts = [[tok.bos_id] + tok.encode(t) for t in PROMPTS]
    n = args.new_tokens
    greedy = SamplingParams(max_new_tokens=n)
    rows = {}

    def decoder(mode: DecodeMode):  # no early stop: every setting decodes n tokens
        return make_decoder(model, mode, stop_ids=set(), model_dir=args.model)

    def all_prompts(dec):
        return [dec.generate(ids, greedy) for ids in prompts]

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()

    def hf_generate(ids):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=tok.token_id("<|assistant_end|>"))
        return out[0, len(ids):].tolist()

    seconds, _ = timed(lambda: [hf_generate(ids) for ids in prompts], args.rounds)
    rows["transformers generate"] = {"tok_per_s": n * len(prompts) / seconds}
    engine = decoder(DecodeMode())
    seconds, reference = timed(lambda: all_prompts(engine), args.rounds)
    rows["engine (full depth)"] = {"tok_per_s": n * len(prompts) / seconds}
    batch = [ids for _ in range(4) for ids in prompts]  # 16 rows
    seconds, outs = timed(lambda: engine.generate_batch(batch, greedy), args.rounds)
    rows["engine batch 16 (aggregate)"] = {"tok_per_s": n * len(batch) / seconds,
                                           "rows_identical_to_alone": outs == reference * 4}
    for k in range(model.config.n_stages - 1):
        exit_k = decoder(DecodeMode(exit_stage=k))
        seconds, _ = timed(lambda: all_prompts(exit_k), args.rounds)
        rows[f"engine exit stage {k}"] = {"tok_per_s": n * len(prompts) / seconds}
    for s in range(model.config.n_stages - 1):
        for k in (2, 4, 6):
            spec = decoder(DecodeMode(speculative=k, draft_stage=s))  # its stats accumulate over the rounds
            seconds, outs = timed(lambda: all_prompts(spec), args.rounds)
            st = spec.stats
            rows[f"speculative S={s} K={k}"] = {
                "tok_per_s": n * len(prompts) / seconds, "acceptance": st.acceptance,
                "tokens_per_verification": st.tokens_per_verification, "greedy_identical": outs == reference}
    logop_reference = all_prompts(decoder(DecodeMode(output="logop")))
    try:
        bounds = load_calibration(args.model, model.config.n_stages)
    except PoelmError as e:
        print(f"adaptive rows skipped: {e}")
        bounds = None
    for scale in (1, 2, 4) if bounds is not None else ():
        adaptive = AdaptiveDecoder(model, [b * scale for b in bounds], set())  # scaled: built here, not from a mode
        seconds, outs = timed(lambda: all_prompts(adaptive), args.rounds)
        same = sum(a == b for o, r in zip(outs, logop_reference) for a, b in zip(o, r))
        exits = [e // args.rounds for e in adaptive.stats.exits]
        rows[f"adaptive bounds x{scale}"] = {"tok_per_s": n * len(prompts) / seconds,
                                             "top1_agreement": same / (n * len(prompts)), "exits": exits}
    bf16 = load_model(args.model, dtype=torch.bfloat16)
    for s in range(model.config.n_stages - 1):
        for k in (2, 4, 6):
            a = compare_with_engine(bf16, prompts, n, draft_stage=s, k=k)
            rows[f"bf16 speculative S={s} K={k}"] = {
                "identical_outputs": f"{a.identical}/{a.prompts}", "tokens_before_divergence": a.agreeing / a.tokens,
                "max_divergence_margin": max((d.engine_margin for d in a.divergences), default=0.0)}
    base = rows["transformers generate"]["tok_per_s"]
    engine_rate = rows["engine (full depth)"]["tok_per_s"]
    for r in rows.values():
        if "tok_per_s" in r:
            r["x_transformers"] = r["tok_per_s"] / base
            r["x_engine"] = r["tok_per_s"] / engine_rate
    result = {"model": args.model, "new_tokens": n, "prompts": len(prompts), "threads": torch.get_num_threads(),
              "rows": {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                       for k, v in rows.items()}}
    if args.json:
        print(json.dumps(result))
        return
    for name, r in rows.items():
        if "identical_outputs" in r:
            print(f"{name:<26} identical outputs {r['identical_outputs']}, {r['tokens_before_divergence']:.1%} of "
                  f"tokens before a divergence, largest engine margin there {r['max_divergence_margin']:.3f}")
            continue
        if "rows_identical_to_alone" in r:
            print(f"{name:<26} {r['tok_per_s']:8.1f} tok/s  {r['x_engine']:5.2f}x the engine at batch 1; every row "
                  f"identical to its own decoding: {r['rows_identical_to_alone']}")
            continue
        extra = (f"  acceptance {r['acceptance']:.1%}, {r['tokens_per_verification']:.2f} tok/verify, "
                 f"identical {r['greedy_identical']}" if "acceptance" in r else "")
        if "top1_agreement" in r:
            extra = f"  agreement {r['top1_agreement']:.1%} with Log-OP greedy, exits {r['exits']}"
        print(f"{name:<26} {r['tok_per_s']:8.1f} tok/s  {r['x_transformers']:5.2f}x hf  {r['x_engine']:5.2f}x engine{extra}")


if __name__ == "__main__":
    main()
