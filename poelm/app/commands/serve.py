"""`poelm serve`: the OpenAI-compatible server (docs/serving.md), its flags from `ServeOptions`."""

from __future__ import annotations

import argparse

from ...core.errors import PoelmError
from ..arguments import add_command, arg


def cmd_serve(args: argparse.Namespace) -> int:
    from ...common.options import from_namespace
    from ...serve.options import ServeOptions

    try:
        from ...serve.app import serve
    except ImportError as e:
        raise PoelmError(f"poelm serve needs its extras: pip install 'poelm[serve]' ({e.name} is missing)") from None
    serve(args.models, args.name, from_namespace(ServeOptions, args))
    return 0


def add_commands(sub) -> None:
    from ...serve.options import ServeOptions

    add_command(sub, "serve", cmd_serve, "an OpenAI-compatible server for a base and its specialists",
                arg("models", nargs="+", metavar="MODELDIR", help="a base and stage directories of that base"),
                arg("--name", action="append", help="model ids, in the order of the directories (default: the "
                    "stage name or the directory's name)"),
                options=(ServeOptions,))
