"""How every script in benchmarks/ ends: its result, or one line on stderr — never a traceback.

Design choices:
- `run(main)` is each script's `if __name__ == "__main__":`. Bad input (a `PoelmError`: a missing model
  directory, an impossible shape, a missing calibration) prints `NAME: error: <message>` and exits 2;
  anything else prints `NAME: internal error: <type>: <message> (rerun with --debug for the traceback)`
  and exits 1; Ctrl-C prints `NAME: interrupted` and exits 130. `--debug` anywhere on the command line
  lets the traceback through, as the `poelm` command does.
- argparse keeps its own usage errors (exit 2), as every command line tool does.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from poelm.core.errors import PoelmError


def run(main: Callable[[], int | None]) -> None:
    """Run a benchmark's `main` and exit with its status (see the module docstring)."""
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    debug = "--debug" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        code = main()
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except PoelmError as e:
        if debug:
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a bug, not bad input: still one line
        if debug:
            raise
        print(f"{name}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
