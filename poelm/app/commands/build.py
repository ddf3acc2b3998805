"""Making a base: `tokenizer train`, `data tokenize`, `init`, `pretrain` and `convert`."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ...core.errors import PoelmError
from ..arguments import OVERWRITE, STORE_DTYPE, add_command, add_group, arg, int_list, out
from .models import overrides_text, print_param_table


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from ...models.directory import save_tokenizer_dir
    from ...common.atomic import check_output
    from ...data.tokenizer_train import train_tokenizer

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
    from ...core.tokenizer import Tokenizer
    from ...data.shards import tokenize

    tok = Tokenizer.load(args.tokenizer)
    index = tokenize(args.input, tok, args.out, workers=args.workers, shard_tokens=args.shard_tokens,
                     val_fraction=args.val_fraction, text_column=args.text_column, overwrite=args.overwrite,
                     tokenizer_dir=args.tokenizer)
    print(f"{args.out}: train {index['train']['tokens']:,} tokens in {len(index['train']['shards'])} shard(s), "
          f"val {index['val']['tokens']:,} tokens in {len(index['val']['shards'])} shard(s) ({index['dtype']}); "
          f"pretrain with --data {args.out}")
    return 0


def build_config(args: argparse.Namespace, vocab_size: int):
    """A PoEConfig from init/pretrain shape flags; with only --depth, nanochat's derived shape."""
    from ...core.config import PoEConfig, nanochat_shape, split_stages

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
    p.add_argument("--poe-stage-layers", type=int_list, help="layers per stage, e.g. 6,6,6,6 "
                   "(default: min(4, depth) near-equal stages)")
    p.add_argument("--poe-mode", choices=("none", "flat", "residual_logop"), default="flat" if for_init else None,
                   help="training objective: none (BP control), flat (one detached loss per stage), "
                        "residual_logop (default flat" + ("" if for_init else "; with --init, the model's") + ")")
    p.add_argument("--poe-alpha", type=float, default=0.0 if for_init else None,
                   help="stage-loss and Log-OP exponent in [0, 1] (default 0: the mean)")
    p.add_argument("--poe-stage-heads", action="store_true", help="add zero-initialised per-stage heads")


def cmd_init(args: argparse.Namespace) -> int:
    import torch

    from ...core.model import PoEGPT
    from ...core.tokenizer import Tokenizer
    from ...models.directory import init_model_dir
    from ...common.atomic import check_output

    inputs = [("tokenizer", args.tokenizer)]
    check_output(args.out, inputs, args.overwrite)
    tok = Tokenizer.load(args.tokenizer)
    config = build_config(args, tok.vocab_size)
    init_model_dir(config, tok, args.out, seed=args.seed, dtype=args.dtype, overwrite=args.overwrite, inputs=inputs)
    with torch.device("meta"):
        print_param_table(PoEGPT(config))
    print(f"wrote {args.out} ({args.dtype})")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ...common.options import from_namespace
    from ...train.pretrain import PretrainArgs, pretrain

    if args.init is None and (args.tokenizer is None or args.depth is None):
        raise PoelmError("pretrain needs --init MODELDIR, or --tokenizer TOKDIR and --depth N")
    if args.init is not None and (args.tokenizer is not None or args.depth is not None):
        raise PoelmError("--init takes its tokenizer and shape from MODELDIR: drop --tokenizer/--depth")
    config = None
    if args.init is None:
        from ...core.tokenizer import Tokenizer

        args.seq_len = args.seq_len or 2048
        args.poe_mode = args.poe_mode or "flat"
        args.poe_alpha = 0.0 if args.poe_alpha is None else args.poe_alpha
        config = build_config(args, Tokenizer.load(args.tokenizer).vocab_size)
    pretrain(from_namespace(PretrainArgs, args, config=config, seq_len=args.seq_len,
                            poe_mode=args.poe_mode if args.init else None,
                            poe_alpha=args.poe_alpha if args.init else None,
                            poe_stage_layers=args.poe_stage_layers if args.init else None))
    return 0


def cmd_convert_nanochat(args: argparse.Namespace) -> int:
    """`convert nanochat` and `convert nanochat-poe`: a base from a checkpoint folder, and what was mapped."""
    from ...models.convert_nanochat import convert_nanochat
    from ...models.convert_nanochat_poe import convert_nanochat_poe

    convert, label = {"nanochat": (convert_nanochat, "migration"),
                      "nanochat-poe": (convert_nanochat_poe, "note:")}[args.convert_command]
    out, notes = convert(args.checkpoint, args.out, step=args.step, tokenizer=args.tokenizer, overwrite=args.overwrite,
                         dtype=args.dtype)
    for n in notes:
        print(f"{label} {n}")
    print(f"wrote {out}")
    return 0


def cmd_convert_nanochat_poe_stage(args: argparse.Namespace) -> int:
    from ...models.convert_nanochat_poe import convert_nanochat_poe_stage

    out, overrides = convert_nanochat_poe_stage(args.checkpoint, args.parent, args.out, step=args.step,
                                                name=args.name, overwrite=args.overwrite, dtype=args.dtype)
    if overrides:
        print(f"note: the fork's stage overrides its parent's {overrides_text(overrides)}: converted as declared "
              f"parent_overrides; this stage does not preserve its parent (poelm inspect, check-preservation)")
    print(f"wrote {out}")
    return 0


def add_commands(sub) -> None:
    from ...data.corpus import VAL_FRACTION
    from ...data.shards import DEFAULT_SHARD_TOKENS
    from ...train.pretrain import PretrainArgs

    tok = add_group(sub, "tokenizer", "train a BPE tokenizer")
    add_command(tok, "train", cmd_tokenizer_train, "train byte-level BPE on text files, directories or records",
                arg("--input", nargs="+", required=True, metavar="PATH"),
                arg("--vocab-size", type=int, required=True, help="total vocabulary, the 9 special tokens included"),
                out("TOKDIR"), OVERWRITE)
    data = add_group(sub, "data", "prepare training data")
    add_command(data, "tokenize", cmd_data_tokenize, "tokenize a corpus once into memory-mapped shards for "
                "pretrain --data DATADIR (an interrupted run continues when rerun)",
                arg("--tokenizer", required=True, metavar="TOKDIR", help="a tokenizer or model directory"),
                arg("--input", nargs="+", required=True, metavar="PATH",
                    help="text files, directories, JSONL/JSON records, Parquet, `datasets` folders; .gz/.zst read"),
                arg("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                    help="tokenizing processes (default: the CPUs, at most 8; 0: in this process)"),
                arg("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N", help="tokens per shard"),
                arg("--val-fraction", type=float, default=VAL_FRACTION, metavar="F",
                    help=f"share of documents held out (default {VAL_FRACTION})"),
                arg("--text-column", default="text", help="Parquet / `datasets` column (JSON records: 'text')"),
                out("DATADIR"), OVERWRITE)
    add_shape_flags(add_command(sub, "init", cmd_init, "write a randomly initialised base model directory",
                                arg("--tokenizer", required=True, metavar="TOKDIR"), arg("--seed", type=int, default=0),
                                STORE_DTYPE("float32"), out("MODELDIR"), OVERWRITE))
    add_shape_flags(add_command(sub, "pretrain", cmd_pretrain, "pretrain a PoE base (or the BP control) on text "
                                "(--init MODELDIR, or --tokenizer TOKDIR with shape flags)", options=(PretrainArgs,)),
                    for_init=False)
    add_convert_commands(add_group(sub, "convert", "convert a checkpoint from another format"))


def add_convert_commands(conv) -> None:
    step = arg("--step", type=int, help="checkpoint step (default: the latest present)")
    for name, help in (("nanochat", "convert a nanochat base_train checkpoint"),
                       ("nanochat-poe", "convert a nanochat-poe (the paper's fork) PoE base checkpoint, with the "
                                        "fork's logits")):
        add_command(conv, name, cmd_convert_nanochat, help,
                    arg("--checkpoint", required=True, metavar="DIR",
                        help="folder with model_NNNNNN.pt and meta_NNNNNN.json"), step,
                    arg("--tokenizer", metavar="DIR", help="nanochat tokenizer folder (tokenizer.pkl) or poelm tokenizer"),
                    STORE_DTYPE("float32"), out("MODELDIR"), OVERWRITE)
    add_command(conv, "nanochat-poe-stage", cmd_convert_nanochat_poe_stage, "convert a nanochat-poe specialist stage "
                "delta onto a converted parent",
                arg("--checkpoint", required=True, metavar="DIR", help="the fork's stage folder (model/meta_NNNNNN)"),
                step,
                arg("--parent", required=True, metavar="MODELDIR", help="the converted base, or converted stage"),
                arg("--name", help="the stage's name (default: the fork's output tag, or the folder's name)"),
                STORE_DTYPE(None), out("STAGEDIR"), OVERWRITE)
