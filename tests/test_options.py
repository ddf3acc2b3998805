"""Command options declared once (poelm/options.py): the parser, the run record and the resume check
all come from the command's dataclass."""

from __future__ import annotations

import dataclasses

import pytest

from poelm.app.cli import build_parser
from poelm.common.options import add_options, free_on_resume, from_namespace, option, run_record
from poelm.train.pretrain import PretrainArgs
from poelm.train.sft import StageTrainArgs


@dataclasses.dataclass
class Example:
    path: str = option(help="a path", positional=True, resume=None)
    data: list[str] = option(help="inputs")
    steps: int = option(10, "steps")
    rate: float | None = option(None, "a rate", resume="free")
    switch: bool = option(False, "on")
    masking: bool = option(True, "off with --no-masking")
    computed: int = 0  # no flag


def test_flags_types_and_round_trip():
    import argparse

    p = argparse.ArgumentParser()
    add_options(p, Example)
    ns = p.parse_args(["here", "--data", "a", "b", "--steps", "3", "--rate", "0.5", "--switch", "--no-masking"])
    ex = from_namespace(Example, ns, computed=7)
    assert ex == Example(path="here", data=["a", "b"], steps=3, rate=0.5, switch=True, masking=False, computed=7)
    defaults = from_namespace(Example, p.parse_args(["x", "--data", "a"]))
    assert (defaults.steps, defaults.rate, defaults.switch, defaults.masking) == (10, None, False, True)
    assert not hasattr(ns, "computed")
    with pytest.raises(SystemExit):
        p.parse_args(["x"])  # --data is required (no default)
    with pytest.raises(SystemExit):
        p.parse_args(["x", "--data", "a", "--steps", "three"])
    assert run_record(ex) == {"data": ["a", "b"], "steps": 3, "rate": 0.5, "switch": True, "masking": False}
    assert free_on_resume(Example) == ("rate",)


@pytest.mark.parametrize("command, cls", [(["pretrain"], PretrainArgs), (["specialist", "train"], StageTrainArgs)])
def test_every_training_option_is_a_flag_of_the_cli(command, cls):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    if len(command) > 1:
        sub = sub._subparsers._group_actions[0].choices[command[1]]
    dests = {a.dest for a in sub._actions}
    options = [f.name for f in dataclasses.fields(cls) if f.metadata.get("option")]
    assert options and set(options) <= dests
    assert free_on_resume(cls) == ("eval_every", "save_dtype")  # the exports' storage dtype may change too
