"""Every script in benchmarks/ ends bad input with one line on stderr and exit status 2, never a
traceback (benchmarks/entry.py); decode.py on a model without a calibration says how to make one in one
line and skips those rows.

The scripts run in this process (runpy, as `__main__`, with their own argv and the benchmarks folder on
sys.path, as `python benchmarks/X.py` would): a fresh interpreter per script costs more than the check.
What only a real process shows (its exit status, the whole of its stderr: no traceback, no warning
printed) is checked once, on `python benchmarks/stage_train.py`; every script ends through the same
`entry.run`, which test_every_benchmark_script_is_covered makes sure of."""

import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from poelm.app.cli import main

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SIBLINGS = ("entry", "flops")  # the modules the scripts import from their own folder


def bench(*argv, timeout=240):
    """`python benchmarks/SCRIPT ARGS...` in a fresh interpreter."""
    return subprocess.run([sys.executable, str(BENCHMARKS / argv[0]), *map(str, argv[1:])], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def bench_here(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python benchmarks/SCRIPT ARGS...`, run in this process: the script
    as `__main__` with its own argv, cwd and sys.path. A traceback here is an exception out of runpy, which
    fails the test; a warning the script's process would print (not a deprecation: hidden by default)
    counts as a line of stderr."""
    script = BENCHMARKS / argv[0]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, argv[1:])])
    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])
    fresh = [name for name in SIBLINGS if name not in sys.modules]
    capsys.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(SystemExit) as exited:  # entry.run always ends in sys.exit
                runpy.run_path(str(script), run_name="__main__")
    finally:
        for name in fresh:  # imported from BENCHMARKS by the script: not left for other tests
            sys.modules.pop(name, None)
    out, err = capsys.readouterr()
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    err += "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught
                   if not issubclass(w.category, hidden))
    code = exited.value.code
    return 0 if code is None else code, out, err


def one_line(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("argv, message", [
    (["bench_base.py", "--layers", "0", "--out", "{tmp}/bb"], "bench_base: error: --layers 0: expected a positive int"),
    (["bp_gap.py", "--tokenizer", "{tmp}/none", "--data", "{tmp}", "--out", "{tmp}/o"],
     "bp_gap: error: {tmp}/none/poelm_tokenizer.json: missing"),
    (["data.py", "--tokenizer", "{tmp}/none"], "{tmp}/none: no tokenizer directory"),
    (["decode.py", "{tmp}/none"], "decode: error: {tmp}/none: not a directory"),
    (["load.py", "--rounds", "0"], "load: error: --rounds 0: expected a positive int"),
    (["pretrain_overhead.py", "--stages", "3,3"], "pretrain_overhead: error: config field 'poe_stage_layers'"),
    (["real_size.py", "--quick", "--dtypes", "float16"],
     "real_size: error: --dtypes float16: expected float32 and/or bfloat16"),
    (["serve.py", "{tmp}/none", "{tmp}/none2"], "serve: error: {tmp}/none: not a directory"),
    (["stage_loss_fraction.py", "--init", "{tmp}/none"], "stage_loss_fraction: error: {tmp}/none: no model there"),
    (["stage_parallel.py", "--stages", "5,5"], "stage_parallel: error: config field 'poe_stage_layers'"),
    (["stage_train.py", "--base-layers", "0"], "stage_train: error: config field 'n_layer' = 0"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, argv, message):
    code, _, err = bench_here(monkeypatch, capsys, *[a.format(tmp=tmp_path) for a in argv])
    lines = one_line(err)
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert message.format(tmp=tmp_path) in lines[0] and "Traceback" not in err


def test_bad_input_in_a_fresh_process_is_one_line(tmp_path):
    """The entry point as a process: `python benchmarks/stage_train.py` with bad input prints exactly one
    line (nothing else on stderr: no traceback, no warning) and exits with status 2."""
    r = bench("stage_train.py", "--base-layers", "0")
    assert r.returncode == 2 and one_line(r.stderr) == [r.stderr.strip()], r.stderr[-2000:]
    assert "stage_train: error: config field 'n_layer' = 0" in r.stderr and "Traceback" not in r.stderr


def test_every_benchmark_script_is_covered():
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if "\nif __name__ == \"__main__\":" in p.read_text()}
    covered = {"bench_base.py", "bp_gap.py", "data.py", "decode.py", "load.py", "pretrain_overhead.py", "real_size.py",
               "serve.py",
               "stage_loss_fraction.py", "stage_parallel.py", "stage_train.py"}
    assert scripts == covered  # a new benchmark gets a bad-input case above
    for name in scripts:  # each ends through entry.run: the policy the fresh-process check sees on one of them
        assert "\nif __name__ == \"__main__\":\n    from entry import run" in (BENCHMARKS / name).read_text(), name


def test_decode_without_a_calibration_skips_adaptive_rows_in_one_line(tmp_path, tiny_tokenizer_dir, monkeypatch,
                                                                      capsys):
    assert main(["init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "2", "--n-embd", "64", "--n-head", "1",
                 "--seq-len", "128", "--poe-stage-layers", "1,1", "--out", str(tmp_path / "m")]) == 0
    code, out, err = bench_here(monkeypatch, capsys, "decode.py", tmp_path / "m", "--quick", "--new-tokens", "4",
                                "--rounds", "1", "--json")
    assert code == 0, err[-3000:]
    skipped = [line for line in err.splitlines() if line.startswith("adaptive rows skipped")]
    assert len(skipped) == 1 and f"run `poelm calibrate {tmp_path / 'm'} --data ...` first" in skipped[0]
    assert "Traceback" not in err and '"rows"' in out
