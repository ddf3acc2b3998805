"""Recorded settings vs this run: record what a run was made with, and refuse a rerun made otherwise.

Design choices:
- One comparison for every command that continues earlier work (a training run's `--resume`, an
  interrupted `data tokenize`, a HumanEval output folder): a field differs when its recorded value is
  not this run's; the fields are this run's (`union=True`: the recorded ones too), less those the
  caller lets change (`ignore`).
- A refusal names every field that differs, with both values, and says how to start again (`fix` is
  required). Each caller words the sentence around the fields (`said`, with `{changes}` where they go,
  and `describe` for one field); the skeleton `said; fix` is this module's.
- Settings are JSON (docs/formats.md): `record_or_refuse` writes them once, atomically, and compares a
  rerun with what it wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from ..core.errors import PoelmError
from ..core.files import read_json, write_json


@dataclass(frozen=True)
class Change:
    """One field whose recorded value (`then`) is not this run's (`now`)."""

    field: str
    then: Any
    now: Any


def then_and_now(change: Change) -> str:
    return f"{change.field}: {change.then} then, {change.now} now"


def changes(recorded: Mapping[str, Any], current: Mapping[str, Any], *, ignore: Iterable[str] = (),
            union: bool = False) -> list[Change]:
    """Every field whose recorded value differs from this run's, in this run's order (`union`: sorted,
    the recorded fields included)."""
    fields = sorted(set(recorded) | set(current)) if union else list(current)
    skip = set(ignore)
    return [Change(k, recorded.get(k), current.get(k)) for k in fields
            if k not in skip and recorded.get(k) != current.get(k)]


def refuse_changes(recorded: Mapping[str, Any], current: Mapping[str, Any], *, said: str, fix: str,
                   describe: Callable[[Change], str] = then_and_now, ignore: Iterable[str] = (),
                   union: bool = False) -> None:
    """Raise a PoelmError `said` (its `{changes}` replaced by every differing field, `describe`d and
    joined with "; "), then "; " and `fix`, when any field differs; return otherwise."""
    found = changes(recorded, current, ignore=ignore, union=union)
    if found:
        raise PoelmError(said.replace("{changes}", "; ".join(describe(c) for c in found)) + "; " + fix)


def record_or_refuse(path: str | os.PathLike, settings: Mapping[str, Any], *, said: str, fix: str,
                     describe: Callable[[Change], str] = then_and_now) -> None:
    """Record `settings` in the JSON file `path`, or, when it exists, refuse them if they differ from
    what it records (`refuse_changes`)."""
    if not os.path.isfile(path):
        write_json(path, dict(settings))
        return
    refuse_changes(read_json(path, verify=False), settings, said=said, fix=fix, describe=describe)
