"""Every script in benchmarks/ ends bad input with one line on stderr and a non-zero status, never a
traceback (benchmarks/entry.py); decode.py on a model without a calibration says how to make one in one
line and skips those rows."""

import subprocess
import sys
from pathlib import Path

import pytest

from poelm.app.cli import main

ROOT = Path(__file__).resolve().parent.parent


def bench(*argv, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / argv[0]), *map(str, argv[1:])], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv, message", [
    (["bench_base.py", "--layers", "0", "--out", "{tmp}/bb"], "bench_base: error: --layers 0: expected a positive int"),
    (["bp_gap.py", "--tokenizer", "{tmp}/none", "--data", "{tmp}", "--out", "{tmp}/o"],
     "bp_gap: error: {tmp}/none/poelm_tokenizer.json: missing"),
    (["data.py", "--tokenizer", "{tmp}/none"], "{tmp}/none: no tokenizer directory"),
    (["decode.py", "{tmp}/none"], "decode: error: {tmp}/none: not a directory"),
    (["load.py", "--rounds", "0"], "load: error: --rounds 0: expected a positive int"),
    (["pretrain_overhead.py", "--stages", "3,3"], "pretrain_overhead: error: config field 'poe_stage_layers'"),
    (["serve.py", "{tmp}/none", "{tmp}/none2"], "serve: error: {tmp}/none: not a directory"),
    (["stage_loss_fraction.py", "--init", "{tmp}/none"], "stage_loss_fraction: error: {tmp}/none: no model there"),
    (["stage_parallel.py", "--stages", "5,5"], "stage_parallel: error: config field 'poe_stage_layers'"),
    (["stage_train.py", "--base-layers", "0"], "stage_train: error: config field 'n_layer' = 0"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_bad_input_is_one_line(tmp_path, argv, message):
    r = bench(*[a.format(tmp=tmp_path) for a in argv])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-2000:]
    assert message.format(tmp=tmp_path) in lines[0] and "Traceback" not in r.stderr


def test_every_benchmark_script_is_covered():
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py") if "\nif __name__ == \"__main__\":" in p.read_text()}
    covered = {"bench_base.py", "bp_gap.py", "data.py", "decode.py", "load.py", "pretrain_overhead.py", "serve.py",
               "stage_loss_fraction.py", "stage_parallel.py", "stage_train.py"}
    assert scripts == covered  # a new benchmark gets a bad-input case above


def test_decode_without_a_calibration_skips_adaptive_rows_in_one_line(tmp_path, tiny_tokenizer_dir):
    assert main(["init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "2", "--n-embd", "64", "--n-head", "1",
                 "--seq-len", "128", "--poe-stage-layers", "1,1", "--out", str(tmp_path / "m")]) == 0
    r = bench("decode.py", tmp_path / "m", "--quick", "--new-tokens", "4", "--rounds", "1", "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = [line for line in r.stderr.splitlines() if line.startswith("adaptive rows skipped")]
    assert len(skipped) == 1 and f"run `poelm calibrate {tmp_path / 'm'} --data ...` first" in skipped[0]
    assert "Traceback" not in r.stderr
