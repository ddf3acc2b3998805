"""Directories written by the previous main (before digests, `poelm/core` and the chain value) still
load, and give the logits that version computed (tests/fixtures/previous_main/README.md).

The logits were recorded on another machine. Bit-identity is a promise within one machine (cached vs
uncached, batch vs row, resume vs uninterrupted: tested elsewhere); across CPUs the kernels differ
(another SIMD width, another BLAS blocking, another summation order), so the promise is what float32
can keep: `TOLERANCE` below. Measured: 1.2e-6 on an AMD EPYC (AVX-512) against the fixture, 5.4e-7 on
the machine of issue 23. The tolerance still sees a 1% change of any one tensor the norms do not
cancel (tested below), far less than a loading error would cause.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from poelm.app.cli import main
from poelm import models

FIXTURE = Path(__file__).parent / "fixtures" / "previous_main"
# float32 carries 24 bits: one rounding is 6e-8 relative. The logits (|x| < 8 here) come out of a few
# hundred reassociated sums per value; 1e-5 absolute is ~10 ulps at the largest logit and 8x the largest
# cross-machine difference seen.
TOLERANCE = 1e-5
# Scaling these changes nothing by design: q and k are RMS-normed before attention, and so is the embedding.
NORMED_AWAY = ("transformer.wte.weight", "attn.c_q.weight", "attn.c_k.weight")


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    worst = (got - want).abs().max().item()
    assert worst <= TOLERANCE, f"max |Δlogit| {worst:.3g} > {TOLERANCE}"


def test_previous_main_directories_load_with_identical_logits():
    want = load_file(str(FIXTURE / "logits.safetensors"))
    ids = want["ids"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base, stage = models.open(FIXTURE / "base").model(), models.open(FIXTURE / "stage").model()
    assert any("no digests.json" in str(w.message) for w in caught)  # said, not silent
    with torch.no_grad():
        assert_close(base(ids).logits[:, -6:], want["base"])
        assert_close(base(ids, output="logop").logits[:, -6:], want["base_logop"])
        assert_close(stage(ids).logits[:, -6:], want["stage"])
        assert (stage(ids).logits[:, -6:] - want["base"]).abs().max() > 1e-2  # the tolerance tells them apart


def test_previous_main_directories_can_record_digests(tmp_path, capsys):
    """`poelm digest` brings such a directory (and its stage) under verification, logits unchanged."""
    for name in ("base", "stage"):
        shutil.copytree(FIXTURE / name, tmp_path / name)
    assert main(["digest", str(tmp_path / "base"), str(tmp_path / "stage")]) == 0
    assert capsys.readouterr().out.count("fingerprint xxh3-128:") == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verified now: no warning
        stage = models.open(tmp_path / "stage").model()
    want = load_file(str(FIXTURE / "logits.safetensors"))
    with torch.no_grad():
        assert_close(stage(want["ids"]).logits[:, -6:], want["stage"])
    assert main(["inspect", str(tmp_path / "stage")]) == 0
    assert capsys.readouterr().out.count("files match digests.json") == 2


def test_the_tolerance_sees_a_one_percent_change_of_any_tensor():
    """Each tensor of the stage's chain scaled by 1.01 alone (the norms cancel q, k and the embedding
    table: skipped) moves the recorded logits by more than TOLERANCE: the tolerance hides only rounding."""
    want = load_file(str(FIXTURE / "logits.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no digests.json: said by the test above
        stage = models.open(FIXTURE / "stage").model()
    checked = 0
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if name.endswith(NORMED_AWAY):
                continue
            kept = p.clone()
            p.mul_(1.01) if p.abs().sum() > 0 else p.add_(0.01)
            moved = (stage(want["ids"]).logits[:, -6:] - want["stage"]).abs().max().item()
            p.copy_(kept)
            assert moved > 10 * TOLERANCE, (name, moved)
            checked += 1
    assert checked >= 20


def test_a_parent_fingerprint_in_the_old_scheme_is_checked_in_that_scheme(tmp_path):
    """The fixture's stage names its parent by a blake2b-128 fingerprint (poelm before xxh3-128). After
    `poelm digest` records the base's fingerprint in xxh3-128, the stage still loads (its parent's
    blake2b-128 value recomputed and matched) and the chain's fingerprints are all xxh3-128; the same
    stage with one digit of that old value changed is refused, naming both values."""
    from poelm.core.errors import PoelmError
    from poelm.core.tensorfile import fingerprint_file

    for name in ("base", "stage"):
        shutil.copytree(FIXTURE / name, tmp_path / name)
    assert main(["digest", str(tmp_path / "base")]) == 0
    warnings.simplefilter("ignore")  # the stage has no digests.json (said by the first test); pytest restores
    chain = models.open(tmp_path / "stage")
    recorded = json.loads((tmp_path / "stage" / "config.json").read_text())["parent_fingerprint"]
    assert recorded == fingerprint_file(tmp_path / "base" / "model.safetensors", scheme="blake2b-128")
    assert [f.split(":")[0] for f in chain.fingerprints] == ["xxh3-128", "xxh3-128"]
    config = tmp_path / "stage" / "config.json"
    text = config.read_text()
    wrong = recorded[:-1] + ("0" if recorded[-1] != "0" else "1")
    config.write_text(text.replace(recorded, wrong))
    try:
        models.open(tmp_path / "stage")
    except PoelmError as e:
        message = str(e)
    else:
        raise AssertionError("a wrong old-scheme parent fingerprint was accepted")
    assert f"has fingerprint {recorded}, but this stage was trained on {wrong}" in message
