"""How poelm writes what a command produces: never over its inputs, never half-written.

- Inputs first: before any work, `check_output` refuses an output that is, contains or lies inside one
  of the command's inputs (compared as resolved real paths, so symlinks and `..` hide nothing), and an
  existing output unless the caller passed `overwrite`. `chain_inputs` lists a model's whole chain.
- Then atomically: `AtomicDir` builds a directory under a temporary sibling name and renames it into
  place only when complete, so the path always names one complete directory (an existing one is
  swapped in one `renameat2(RENAME_EXCHANGE)` where Linux offers it). docs/formats.md, "What a command
  may write", has the fallback and the one command that writes into its input.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from ..core.errors import PoelmError

Inputs = Iterable[tuple[str, "str | os.PathLike"]]


def overlap(out: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """How `out` overlaps `path` ("is", "contains", "lies inside"), or None."""
    o, p = Path(out).resolve(), Path(path).resolve()
    if o == p:
        return "is"
    if o in p.parents:
        return "contains"
    if p in o.parents:
        return "lies inside"
    return None


def check_output(out: str | os.PathLike, inputs: Inputs = (), overwrite: bool = False) -> None:
    """Refuse `out` before anything is written: overlapping an input, or existing without overwrite."""
    for label, path in inputs:
        how = overlap(out, path)
        if how is not None:
            raise PoelmError(f"{out}: the output {how} the {label} {path}; a command never writes over its own "
                             "inputs (choose another output path)")
    if Path(out).exists() and not overwrite:
        raise PoelmError(f"{out}: already exists (choose another --out, or pass --overwrite)")


def chain_inputs(model, label: str = "model") -> list[tuple[str, Path]]:
    """Every directory of a model's chain (the model, then its parents to the root) as inputs; `model`
    is a chain value (core/cascade.Chain) or a directory, whose links are then only located."""
    from ..core.cascade import Chain, resolve_chain

    links = model.links if isinstance(model, Chain) else resolve_chain(model, verify=False)
    return [(label if link.path == links[-1].path else f"{label}'s ancestor", link.path) for link in links[::-1]]


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one system call (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or the file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory `new` at `target`, replacing what is there."""
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):  # `new` now holds the old directory
        shutil.rmtree(new, ignore_errors=True)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, aside / "x")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside / "x", target)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


class AtomicDir:
    """Build a directory under a temporary name, then rename it into place on success.

    Usage: `with AtomicDir(out, overwrite, inputs) as tmp: ...write into tmp...`. `inputs` are checked
    again here (commands check them first, before their work). On an exception the temporary folder
    is removed and `out` is untouched.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, inputs: Inputs = ()):
        self.out = Path(out)
        self.overwrite = overwrite
        self.inputs = list(inputs)

    def __enter__(self) -> Path:
        check_output(self.out, self.inputs, self.overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        self.tmp.chmod(0o755)
        try:
            replace_dir(self.tmp, self.out)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
