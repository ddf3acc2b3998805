"""Command-line arguments as data: `arg(...)` is one argparse argument, `add_command` a subcommand
with its arguments and the flags generated from option dataclasses (common/options.py)."""

from __future__ import annotations

import argparse


def arg(*flags: str, **kw) -> tuple[tuple[str, ...], dict]:
    """One argparse argument, as data: `add_command` adds it."""
    return flags, kw


def out(metavar: str):
    return arg("--out", required=True, metavar=metavar)


OVERWRITE = arg("--overwrite", action="store_true", help="replace --out if it exists")
MODEL = arg("model", metavar="MODELDIR", help="a base or stage directory (a stage brings its whole chain)")
JSON = arg("--json", action="store_true")
NO_CARD = arg("--no-card", action="store_true", help="do not write the results into the model's card")
# What a command writes tensors in, and what a loaded model computes in (models/directory.STORAGE_DTYPES,
# core/cascade.DTYPES; spelled here so the parser needs no torch).
STORAGE_CHOICES = ("float32", "bfloat16")
LOAD_DTYPE = arg("--dtype", choices=("float32", "bfloat16", "float16"),
                 help="compute in this dtype (default: the dtype the model is stored in)")


def STORE_DTYPE(default: str | None, stored: str = "the parent's"):  # noqa: N802 (an argument, like OVERWRITE)
    """`--dtype` of a command that writes a model: the dtype its tensors are stored in (`stored` says
    what the default None means)."""
    return arg("--dtype", choices=STORAGE_CHOICES, default=default,
               help=f"store the tensors in this dtype (default: {default or stored})")


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


def add_group(sub, name: str, help: str, aliases: tuple[str, ...] = ()):
    """A command with subcommands of its own (`poelm NAME SUBCOMMAND`)."""
    return sub.add_parser(name, help=help, aliases=list(aliases)).add_subparsers(dest=f"{name}_command", required=True)


def int_list(text: str) -> list[int]:
    """`2,2` as [2, 2] (an argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 2,2") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one integer")
    return values
