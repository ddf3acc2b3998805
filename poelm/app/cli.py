"""The `poelm` command line (docs/cli.md): argparse subcommands, each a thin call into the library.

Design choices:
- The commands live by group in app/commands/ (build, models, decode, serve, evaluate); this module
  builds the parser from them and runs one.
- How a command ends is app/exits.py's policy: bad input (`PoelmError`) is one line on stderr and
  exit 2, a bug one line and exit 1, the traceback only under `--debug` (accepted anywhere).
- A renamed command keeps its old name as an alias that says the new one on stderr (never silently).
- Commands that write a directory write it atomically; log lines go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from .. import __version__
from .arguments import add_command, arg
from .commands import build, decode, evaluate, models, serve
from .exits import exit_status, split_debug


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), main)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poelm", description="Modular Product-of-Experts language models.")
    parser.add_argument("--version", action="version", version=f"poelm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (build, models, decode, serve, evaluate):
        group.add_commands(sub)
    add_command(sub, "demo", cmd_demo, "run the pipeline end to end on the embedded default",
                arg("--out", default="runs/demo", metavar="DIR"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["poelm", *argv])  # what produced a result (model cards record it)
    if args.command in models.RENAMED:
        print(f"poelm: `poelm {args.command}` is now `poelm {models.RENAMED[args.command]}` (the old name still "
              f"works)", file=sys.stderr)
    return exit_status("poelm", lambda: args.func(args), debug)


if __name__ == "__main__":
    sys.exit(main())
