"""How a poelm program ends: its result, or one line on stderr and an exit status — never a traceback
unless asked. The one owner of this policy: the `poelm` command (cli.py) and every script in
benchmarks/ (benchmarks/entry.py) call `exit_status`.

- Bad input raises `PoelmError` inside the library: `NAME: error: <message>`, exit 2.
- Any other exception is a bug: `NAME: internal error: <type>: <message> (rerun with --debug for the
  traceback)`, exit 1; with `--debug` (accepted anywhere on the command line) the traceback goes through.
- Ctrl-C: `NAME: interrupted`, exit 130.
"""

from __future__ import annotations

import sys
from typing import Callable

from ..core.errors import PoelmError


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """(`argv` without `--debug`, whether `--debug` was anywhere in it)."""
    return [a for a in argv if a != "--debug"], "--debug" in argv


def exit_status(name: str, run: Callable[[], int | None], debug: bool = False) -> int:
    """Run `run` and return its exit status (None counts as 0), turning what it raises into one line
    on stderr (see the module docstring)."""
    try:
        return run() or 0
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except PoelmError as e:
        if debug:
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not bad input: say so in one line, traceback under --debug
        if debug:
            raise
        print(f"{name}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
