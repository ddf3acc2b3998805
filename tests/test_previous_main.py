"""Directories written by the previous main (before digests, `poelm/core` and the chain value) still
load, and give the logits that version computed (tests/fixtures/previous_main/README.md)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from poelm.cli import main
from poelm.modeldir import load_model

FIXTURE = Path(__file__).parent / "fixtures" / "previous_main"


def test_previous_main_directories_load_with_identical_logits():
    want = load_file(str(FIXTURE / "logits.safetensors"))
    ids = want["ids"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base, stage = load_model(FIXTURE / "base"), load_model(FIXTURE / "stage")
    assert any("no digests.json" in str(w.message) for w in caught)  # said, not silent
    with torch.no_grad():
        assert torch.equal(base(ids).logits[:, -6:], want["base"])
        assert torch.equal(base(ids, output="logop").logits[:, -6:], want["base_logop"])
        assert torch.equal(stage(ids).logits[:, -6:], want["stage"])


def test_previous_main_directories_can_record_digests(tmp_path, capsys):
    """`poelm digest` brings such a directory (and its stage) under verification, logits unchanged."""
    for name in ("base", "stage"):
        shutil.copytree(FIXTURE / name, tmp_path / name)
    assert main(["digest", str(tmp_path / "base"), str(tmp_path / "stage")]) == 0
    assert capsys.readouterr().out.count("fingerprint blake2b-128:") == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verified now: no warning
        stage = load_model(tmp_path / "stage")
    want = load_file(str(FIXTURE / "logits.safetensors"))
    with torch.no_grad():
        assert torch.equal(stage(want["ids"]).logits[:, -6:], want["stage"])
    assert main(["inspect", str(tmp_path / "stage")]) == 0
    assert capsys.readouterr().out.count("files match digests.json") == 2
