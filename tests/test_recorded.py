"""Recorded settings vs this run (poelm/common/recorded.py): the one comparison behind `--resume`, an
interrupted tokenize and a HumanEval output folder."""

import json

import pytest

from poelm.common.recorded import Change, changes, record_or_refuse, refuse_changes
from poelm.core.errors import PoelmError


def test_every_differing_field_is_named_with_both_values_and_how_to_start_again():
    with pytest.raises(PoelmError) as e:
        refuse_changes({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "c": 4}, said="out: other settings ({changes})",
                       fix="remove out to start again")
    assert str(e.value) == "out: other settings (b: 2 then, 5 now; c: 3 then, 4 now); remove out to start again"
    refuse_changes({"a": 1}, {"a": 1}, said="never ({changes})", fix="-")  # the same settings: no refusal


def test_fields_this_run_has_or_both_have_less_those_that_may_change():
    then, now = {"seed": 0, "old": 1, "eval_every": 10}, {"seed": 5, "eval_every": 20, "new": 2}
    assert changes(then, now) == [Change("seed", 0, 5), Change("eval_every", 10, 20), Change("new", None, 2)]
    assert changes(then, now, union=True, ignore=("eval_every",)) == [
        Change("new", None, 2), Change("old", 1, None), Change("seed", 0, 5)]


def test_record_once_then_refuse_a_rerun_made_otherwise(tmp_path):
    path = tmp_path / "run.json"
    record_or_refuse(path, {"format": "chat", "k": [1, 10]}, said="x ({changes})", fix="y")
    assert json.loads(path.read_text()) == {"format": "chat", "k": [1, 10]}
    record_or_refuse(path, {"format": "chat", "k": [1, 10]}, said="x ({changes})", fix="y")  # the same: goes on
    with pytest.raises(PoelmError, match=r"^x \(format: chat then, completion now\); y$"):
        record_or_refuse(path, {"format": "completion", "k": [1, 10]}, said="x ({changes})", fix="y")
