"""What verifying every file costs when a model loads: the same directories loaded with and without
checking them against their digests (digests.json), side by side in one run.

It writes a ~100 MB float32 base (vocab 4096, 6 layers, width 512) and a 2-block specialist stage on
it into a temporary folder, warms the page cache, then alternates verified and unverified loads
(`poelm.models.open(..., verify=True/False).model()` and transformers' `from_pretrained(...,
verify=True/False)`) and prints the median of each and their ratio. A benchmark, not a test.

    python benchmarks/load.py [--rounds 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from poelm.core.config import PoEConfig
from poelm.core.errors import PoelmError
from poelm.core.model import PoEGPT
from poelm import models
from poelm.models.directory import save_model_dir
from poelm.models.specialist import attach, save_specialist
from poelm.core.tokenizer import SPECIAL_TOKENS, Tokenizer

VOCAB = 4096


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """256 single bytes plus filler tokens that never occur in UTF-8 text (they start with 0xFF)."""
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(256, vocab_size - len(SPECIAL_TOKENS)):
        ranks[b"\xff" + i.to_bytes(3, "big")] = i
    return Tokenizer(ranks)


def median_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.rounds < 1:
        raise PoelmError(f"--rounds {args.rounds}: expected a positive int")
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        config = PoEConfig(vocab_size=VOCAB, n_layer=6, n_head=4, n_kv_head=4, n_embd=512, sequence_len=1024,
                           poe_stage_layers=[3, 3])
        model = PoEGPT(config)
        model.init_weights(0)
        base = save_model_dir(model, Path(tmp) / "base", synthetic_tokenizer(VOCAB))
        stage = save_specialist(attach(base, 2, seed=1)[0], base, Path(tmp) / "stage", "stage")
        megabytes = (base / "model.safetensors").stat().st_size / 1e6
        delta_mb = (stage / "delta.safetensors").stat().st_size / 1e6
        loaders = {
            "poelm base": lambda verify: models.open(base, verify=verify).model(),
            "poelm base + stage": lambda verify: models.open(stage, verify=verify).model(),
            "transformers base": lambda verify: AutoModelForCausalLM.from_pretrained(
                str(base), trust_remote_code=True, verify=verify),
            "transformers base + stage": lambda verify: AutoModelForCausalLM.from_pretrained(
                str(stage), trust_remote_code=True, verify=verify),
        }
        rows = {}
        for name, load in loaders.items():
            load(True), load(False)  # page cache and imports warm
            with_s, without_s = [], []
            for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
                with_s.append(median_seconds(lambda: load(True), 1))
                without_s.append(median_seconds(lambda: load(False), 1))
            w, wo = statistics.median(with_s), statistics.median(without_s)
            rows[name] = {"verified_s": round(w, 4), "unverified_s": round(wo, 4), "ratio": round(w / wo, 3)}
    result = {"base_mb": round(megabytes, 1), "delta_mb": round(delta_mb, 1), "rounds": args.rounds,
              "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        print(json.dumps(result))
        return
    print(f"base model.safetensors {megabytes:.1f} MB, stage delta {delta_mb:.1f} MB; median of {args.rounds} "
          f"alternating rounds")
    for name, r in rows.items():
        print(f"{name:<28} verified {r['verified_s'] * 1e3:7.1f} ms   unverified {r['unverified_s'] * 1e3:7.1f} ms"
              f"   ratio {r['ratio']:.3f}x")


if __name__ == "__main__":
    from entry import run  # one line on bad input, never a traceback (benchmarks/entry.py)

    run(main)
