"""Command options declared once: a dataclass field is the flag, the run record and the resume check.

A command's arguments are one dataclass (`PretrainArgs`, `StageTrainArgs`, `SamplingParams`,
`DecodeMode`). A field made with `option(...)` carries its help text and how `--resume` treats it:
`resume="same"` (recorded in run.json; a resumed run must match), `"free"` (recorded, may change:
evaluation cadence) or None (not part of the run: output paths, device, logging). From the fields,
`add_options` derives the argparse flags, `from_namespace` the dataclass back, `run_record` what
run.json records and `free_on_resume` what `--resume` may change, so the parser, the record and the
resume check cannot drift apart (litgpt derives its CLI from `setup()` signatures for the same reason).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

RESUME = ("same", "free", None)


def option(default: Any = dataclasses.MISSING, help: str = "", *, resume: str | None = "same",
           positional: bool = False, metavar: str | None = None, flag: str | None = None,
           choices: tuple | None = None, parse: Any = None) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring). `parse`
    turns the flag's text into the value when the annotation's type cannot (e.g. "1,0.5")."""
    if resume not in RESUME:
        raise ValueError(f"resume={resume!r}: expected one of {RESUME}")
    meta = {"option": True, "help": help, "resume": resume, "positional": positional, "metavar": metavar,
            "flag": flag, "choices": choices, "parse": parse}
    return dataclasses.field(default=default, metadata=meta)


def _options(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("option")]


def _base(annotation: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return annotation, False


def add_options(parser: argparse.ArgumentParser, cls, defaults: dict[str, Any] | None = None) -> None:
    """Add a flag (or positional argument) for every option field of dataclass `cls`; `defaults`
    replaces a field's default on this command line only.

    The flag is the field's name with dashes (or `flag`); the type comes from the annotation (int, float,
    str, `list[X]`/`tuple[X, ...]` as nargs="+", `X | None`) or from `parse`; a bool is a switch
    (`store_true`, or `store_false` under `--no-...` for a field that defaults to True); `positional=True`
    makes a positional argument. Fields without option metadata (computed values) get no flag."""
    for f, annotation in _options(cls):
        kind, _ = _base(annotation)
        default = (defaults or {}).get(f.name, f.default)
        required = default is dataclasses.MISSING
        meta = f.metadata
        help_text = meta["help"]
        shown = not (default is None or isinstance(default, bool) or default == ())
        if not required and shown and "default" not in help_text:
            help_text = f"{help_text} (default {default})".strip()
        kw: dict[str, Any] = {"help": help_text, "dest": f.name}
        if kind is bool:
            flag = meta["flag"] or ("--no-" if f.default is True else "--") + f.name.replace("_", "-")
            parser.add_argument(flag, action="store_false" if f.default is True else "store_true", **kw)
            continue
        if meta["parse"] is not None:
            kind = meta["parse"]
        elif typing.get_origin(kind) in (list, tuple):
            kw["nargs"] = "+"
            kind = typing.get_args(kind)[0]
        kw.update(type=kind, metavar=meta["metavar"], choices=meta["choices"])
        if meta["positional"]:
            parser.add_argument(f.name, **{k: v for k, v in kw.items() if k != "dest"})
            continue
        if required:
            kw["required"] = True
        else:
            kw["default"] = default
        parser.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), **kw)


def from_namespace(cls, namespace: argparse.Namespace, **computed: Any):
    """The dataclass from parsed flags (its option fields) plus `computed` values for the others."""
    values = {}
    for f, annotation in _options(cls):
        value = getattr(namespace, f.name)
        if typing.get_origin(_base(annotation)[0]) is tuple and isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**{**values, **computed})


def run_record(args) -> dict[str, Any]:
    """The option values a run records in run.json (those with resume "same" or "free")."""
    return {f.name: getattr(args, f.name) for f, _ in _options(type(args)) if f.metadata["resume"] is not None}


def free_on_resume(cls) -> tuple[str, ...]:
    """The recorded options `--resume` lets change."""
    return tuple(f.name for f, _ in _options(cls) if f.metadata["resume"] == "free")
