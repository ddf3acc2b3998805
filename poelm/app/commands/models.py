"""Model directories: `specialist attach|train|relink` (formerly `poelm stage ...`), `check-preservation`,
`export`, `inspect` and `digest`.

"stage" names a cut of the base (PoE stages, `--exit-stage`); a specialist appended to a base is a
`specialist` on the command line. The old group name stays an alias (RENAMED) that says the new one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..arguments import MODEL, OVERWRITE, JSON, STORE_DTYPE, add_command, add_group, arg, out

RENAMED = {"stage": "specialist"}  # old command name -> new one (cli.main says so on stderr)


def print_param_table(model) -> None:
    rows = model.param_table()
    width = max(len(name) for name, _ in rows)
    for name, n in rows:
        print(f"  {name:<{width}}  {n:>14,}")


def overrides_text(overrides: dict[str, list[int]]) -> str:
    """`parent_overrides` in words: "resid_lambdas of layers [0, 1, 2], layer_windows of layers [2]"."""
    return ", ".join(f"{name} of layers {layers}" for name, layers in overrides.items())


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from ... import models
    from ...core.model import PoEGPT
    from ...models.specialist import describe_chain

    chain = models.open(args.model)  # the directory's own files first: errors name them
    chain.tokenizer()  # a complete directory: its tokenizer too
    info = describe_chain(chain)
    files = {p.name: p.stat().st_size for p in sorted(Path(args.model).iterdir()) if p.is_file()}
    if args.json:
        print(json.dumps({**info, "files": files}, indent=2))
        return 0
    c = info["config"]
    print(f"{args.model}: {c['n_layer']} layers in stages {c['poe_stage_layers']}, {c['n_embd']} wide, "
          f"vocab {c['vocab_size']}, {info['assembled_params']:,} parameters assembled")
    for i, link in enumerate(info["links"]):
        print_link(i, link)
    with torch.device("meta"):  # counts only: nothing of the tensors is read
        print_param_table(PoEGPT(chain.config))
    for name, size in files.items():
        print(f"  {name:<28} {size:>12,} bytes")
    return 0


def print_link(i: int, link: dict) -> None:
    """One link of `inspect`'s chain: its files and fingerprint; a stage's delta and what it overrides."""
    print(f"  [{i}] {link['kind']} {link['name']!r} at {link['path']}: {link['n_layer']} layers, "
          f"{link['tensors']} tensors, {link['tensor_params']:,} params, {link['bytes_on_disk']:,} bytes "
          f"({link['dtype']}); "
          f"fingerprint {link['fingerprint']}; "
          + (f"{link['files_verified']} files match digests.json" if link["files_verified"] is not None
             else "no digests.json: content unverified"))
    if link["kind"] != "stage":
        return
    print(f"      +{link['new_layers']} layers on {link['parent']}; trainable {link['trainable_params']:,} "
          f"+ {link['changed_embedding_rows']} changed embedding rows ({link['changed_embedding_params']:,} "
          f"params) = delta {link['tensor_params'] - link['changed_embedding_rows']:,} params "
          f"(+{link['changed_embedding_rows']} row ids)")
    if link["parent_overrides"]:
        print(f"      DOES NOT PRESERVE ITS PARENT: overrides {overrides_text(link['parent_overrides'])} "
              f"(declared in config.json parent_overrides; converted: "
              f"{link.get('converted_from') or 'see config.json'})")


def cmd_digest(args: argparse.Namespace) -> int:
    from ...models.directory import record_digests

    for directory in args.dirs:
        data = record_digests(directory)
        print(f"{directory}: recorded {len(data['files'])} files"
              + (f", fingerprint {data['fingerprint']}" if "fingerprint" in data else "") + " in digests.json")
    return 0


def cmd_specialist_attach(args: argparse.Namespace) -> int:
    from ...common.atomic import chain_inputs, check_output
    from ... import models
    from ...models.specialist import attach_directory

    check_output(args.out, chain_inputs(args.parent, "parent"), args.overwrite)  # before reading anything big
    out, info = attach_directory(models.open(args.parent), args.out, args.layers, args.name, seed=args.seed,
                                 chat_rows=not args.no_chat_rows, dtype=args.dtype, overwrite=args.overwrite)
    rows = f"; warm-initialised chat rows {info['chat_rows']}" if info["chat_rows"] else ""
    print(f"attached stage {args.name!r}: {args.layers} blocks after layer {info['parent_layers'] - 1} "
          f"(d{info['parent_layers']} -> d{info['parent_layers'] + args.layers}){rows} -> {out}")
    return 0


def cmd_specialist_relink(args: argparse.Namespace) -> int:
    from ...models.specialist import relink

    old, new = relink(args.stage, args.parent)
    print(f"{args.stage}: parent {old} -> {new} (the parent's fingerprint matches; config.json and its digest "
          f"updated)")
    return 0


def cmd_specialist_train(args: argparse.Namespace) -> int:
    from ...common.options import from_namespace
    from ...train.sft import StageTrainArgs, stage_train

    stage_train(from_namespace(StageTrainArgs, args))
    return 0


def cmd_check_preservation(args: argparse.Namespace) -> int:
    from ...models.specialist import check_preservation

    r = check_preservation(args.base, args.stage)
    verdict = "bit-identical" if r["bit_identical"] else "CHANGED"
    print(f"base path of {args.stage} vs {args.base} over {r['tokens']} tokens: max |Δlogit| = "
          f"{r['max_abs_diff']:.6g} ({verdict})")
    if r["parent_overrides"]:
        print(f"{args.stage} declares that it does not preserve its parent: it overrides "
              f"{overrides_text(r['parent_overrides'])} (config.json parent_overrides)")
    return 0 if r["bit_identical"] else 1


def cmd_export(args: argparse.Namespace) -> int:
    from ...models.specialist import export_merged

    print(f"wrote {export_merged(args.model, args.out, overwrite=args.overwrite, dtype=args.dtype)}")
    return 0


def add_commands(sub) -> None:
    from ...train.sft import StageTrainArgs

    old = tuple(name for name, new in RENAMED.items() if new == "specialist")
    specialist = add_group(sub, "specialist", "specialist stages appended to a frozen parent: attach, train, relink "
                           f"(formerly `poelm {'|'.join(old)}`)", aliases=old)
    add_command(specialist, "attach", cmd_specialist_attach, "append a specialist stage (new blocks + zero head) to a "
                "frozen parent",
                arg("parent", metavar="PARENTDIR", help="a base or stage directory"),
                arg("--layers", type=int, required=True, help="blocks to append"),
                arg("--name", required=True, help="the stage's name, e.g. code"),
                arg("--seed", type=int, default=0, help="init of the new blocks"),
                arg("--no-chat-rows", action="store_true", help="skip the chat-token embedding warm init"),
                STORE_DTYPE(None), out("STAGEDIR"), OVERWRITE)
    add_command(specialist, "relink", cmd_specialist_relink, "point a stage at the place its parent now lives (the "
                "parent's fingerprint is checked first)",
                arg("stage", metavar="STAGEDIR"),
                arg("--parent", required=True, metavar="DIR", help="the parent's directory (a relative path is "
                    "recorded relative to STAGEDIR)"))
    add_command(specialist, "train", cmd_specialist_train, "SFT of a stage on conversations (only the stage trains)",
                options=(StageTrainArgs,))
    add_command(sub, "check-preservation", cmd_check_preservation, "exit 0 only if a stage's base path equals the "
                "base bit for bit", arg("base", metavar="BASEDIR"), arg("stage", metavar="STAGEDIR"))
    add_command(sub, "export", cmd_export, "write any chain as one standalone model directory", MODEL,
                STORE_DTYPE(None, "the model's"), out("MODELDIR"), OVERWRITE)
    add_command(sub, "inspect", cmd_inspect, "describe a model directory (a stage: its whole chain)", MODEL, JSON)
    add_command(sub, "digest", cmd_digest, "re-record a directory's digests.json from its files as they are now",
                arg("dirs", nargs="+", metavar="DIR", help="a model, stage or tokenizer directory poelm wrote"))
