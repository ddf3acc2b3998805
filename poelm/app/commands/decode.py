"""Decoding: `generate`, `chat`, `compose` and `calibrate` (the bounds `--adaptive` reads).

The decoding flags come from `SamplingParams` and `DecodeMode` (common/options.py); a bad flag fails
before the model loads. An answer reaches the terminal through app/terminal.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ...core.errors import PoelmError
from ..arguments import LOAD_DTYPE, MODEL, add_command, arg
from ..terminal import stats_line, stream_answer


def sampling_params(args: argparse.Namespace, seed_offset: int = 0):
    from ...infer import SamplingParams
    from ...common.options import from_namespace

    return from_namespace(SamplingParams, args, seed=args.seed + seed_offset)


def decode_mode(args: argparse.Namespace):
    from ...infer import DecodeMode
    from ...common.options import from_namespace

    return from_namespace(DecodeMode, args)


def load_dtype(args: argparse.Namespace):
    """`--dtype` as a torch dtype; None (the stored dtype) when not given."""
    from ...core.cascade import DTYPES

    return DTYPES[args.dtype] if getattr(args, "dtype", None) else None


def load_decoder(args: argparse.Namespace, params):
    """The model, its tokenizer and the decoder the flags name; bad flags fail before the model loads."""
    from ... import models
    from ...infer import make_decoder

    mode = decode_mode(args)
    mode.check(params)
    chain = models.open(args.model)  # a missing or bad directory fails here, naming it
    tok = chain.tokenizer()
    return make_decoder(chain.model(dtype=load_dtype(args)), mode, tokenizer=tok, model_dir=args.model), tok


def read_prompts(args: argparse.Namespace) -> list[str]:
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
    params = sampling_params(args)  # bad flags fail before the model loads
    texts = read_prompts(args)
    if len(texts) > 1 and not decode_mode(args).batches:
        raise PoelmError("--compose decodes one prompt at a time: give one --prompt (several prompts decode as "
                         "one batch with the engine, --exit-stage, --speculative or --adaptive)")
    decoder, tok = load_decoder(args, params)
    prompts = [tok.render_prompt([{"role": "user", "content": t}]) if args.chat else [tok.bos_id] + tok.encode(t)
               for t in texts]
    if len(prompts) == 1:
        stream_answer(decoder, tok, prompts[0], params)
        print(stats_line(decoder), file=sys.stderr)
        return 0
    outputs = decoder.generate_batch(prompts, params)
    for i, (text, tokens) in enumerate(zip(texts, outputs)):
        answer = tok.decode([t for t in tokens if t not in decoder.stop_ids])
        print(f"[{i}] {text}\n{answer}")
    print(f"{len(prompts)} prompts as one batch: {stats_line(decoder)}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ..chat import run_chat

    params = sampling_params(args)  # turn t samples with seed + t (chat_repl)
    decoder, tok = load_decoder(args, params)
    return run_chat(decoder, tok, params, args.model, decode_mode(args))


def cmd_compose(args: argparse.Namespace) -> int:
    import torch

    from ...core.tokenizer import Tokenizer
    from ...infer.compose import Composition

    comp = Composition(args.stages, args.weights)
    tok = Tokenizer.load(args.stages[0])
    ids = [tok.bos_id] + tok.encode(args.prompt)
    logp = comp.log_probs(torch.tensor([ids]))[0, -1]
    top = torch.topk(logp, args.top_k)
    print(f"composition of {len(args.stages)} sibling(s), weights {comp.weights}, over one trunk pass "
          f"({comp.trunk_layers} shared layers); next token after {args.prompt!r}:")
    for v, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {tok.decode([i])!r:>20}  p={math.exp(v):.4f}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from ...data.documents import read_documents
    from ...data.loader import eval_batches
    from ...infer.adaptive import CALIBRATION, calibrate, save_calibration
    from ... import models
    from ...common.atomic import check_output

    # adaptive.json is written into MODELDIR by design; the calibration text must not be or hold it.
    check_output(Path(args.model) / CALIBRATION, [("data", path) for path in args.data], overwrite=True)
    chain = models.open(args.model)
    model, tok = chain.model(), chain.tokenizer()
    del chain  # the model holds the tensors it needs
    tokens: list[int] = []
    for doc in read_documents(args.data):
        tokens += [tok.bos_id] + tok.encode(doc.text)
        if len(tokens) >= args.max_tokens:
            break
    seq = min(256, model.config.sequence_len)
    rows = max(1, min(len(tokens), args.max_tokens) // seq)
    batches = eval_batches(np.array(tokens, dtype=np.int64), 4, seq, max_rows=rows, pad_id=tok.bos_id)
    bounds = calibrate(model, batches, args.percentile)
    path = save_calibration(args.model, bounds, args.percentile, rows * seq)
    print(f"bounds per stage (the {args.percentile}th percentile of how far each later stage moves the top-1 "
          f"margin, over {rows * seq:,} tokens): {[round(b, 4) for b in bounds]} -> {path}")
    return 0


def add_commands(sub) -> None:
    from ...infer import DecodeMode, SamplingParams

    generation = (SamplingParams, DecodeMode)
    add_command(sub, "generate", cmd_generate, "continue a prompt (or answer it with --chat), streaming to stdout",
                MODEL, arg("--prompt", action="append", help="a prompt; repeat it for a batch"),
                arg("--prompts", metavar="FILE", help="more prompts, one per line (decoded with --prompt as one batch)"),
                arg("--chat", action="store_true", help="render each prompt as one user turn"), LOAD_DTYPE,
                options=generation, defaults={"max_new_tokens": 256})
    add_command(sub, "chat", cmd_chat, "a conversation with the model (/help for commands; /exit or EOF "
                "ends it); answers on stdout, everything else on stderr", MODEL, LOAD_DTYPE,
                options=generation, defaults={"max_new_tokens": 256})
    add_command(sub, "compose", cmd_compose, "sibling stages over one trunk pass, combined in log space",
                arg("stages", nargs="+", metavar="STAGEDIR"),
                arg("--weights", type=lambda t: [float(v) for v in t.split(",")], help="one weight per stage"),
                arg("--prompt", required=True), arg("--top-k", type=int, default=5))
    add_command(sub, "calibrate", cmd_calibrate, "bounds for --adaptive, stored beside the model (adaptive.json)",
                MODEL, arg("--data", nargs="+", required=True, metavar="PATH", help="calibration text"),
                arg("--percentile", type=float, default=99.9), arg("--max-tokens", type=int, default=65536))
