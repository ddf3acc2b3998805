"""How every script in benchmarks/ ends: its result, or one line on stderr — never a traceback.

`run(main)` is each script's `if __name__ == "__main__":`; the policy is the `poelm` command's own
(poelm/app/exits.py): `NAME: error: <message>` and exit 2 for bad input (a `PoelmError`), `NAME:
internal error: ...` and exit 1 for anything else, `NAME: interrupted` and 130 for Ctrl-C, and
`--debug` anywhere on the command line lets the traceback through. argparse keeps its own usage errors
(exit 2), as every command line tool does.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from poelm.app.exits import exit_status, split_debug


def run(main: Callable[[], int | None]) -> None:
    """Run a benchmark's `main` and exit with its status (see the module docstring)."""
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    sys.argv[1:], debug = split_debug(sys.argv[1:])
    sys.exit(exit_status(name, main, debug))


def model_flags(p: argparse.ArgumentParser, *, depth: int | None = None, n_embd: int, n_head: int | None = None,
                vocab: int | None = None, stages: str | None = None, seq_len: int = 256, batch: int = 8) -> None:
    """The shape flags the benchmarks share (each script its own defaults; a flag given None is left out):
    --depth, --n-embd, --n-head, --vocab, --stages (layers per stage, e.g. 2,2), --seq-len, --batch."""
    for flag, value, kind in (("--depth", depth, int), ("--n-embd", n_embd, int), ("--n-head", n_head, int),
                              ("--vocab", vocab, int), ("--stages", stages, str), ("--seq-len", seq_len, int),
                              ("--batch", batch, int)):
        if value is not None:
            p.add_argument(flag, type=kind, default=value)
