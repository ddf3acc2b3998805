"""Pretraining: accumulation == one big batch, checkpoints and bit-exact resume (also after SIGKILL),
two processes == one, run-folder outputs, and every bad input as one clear error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poelm.app.cli import main
from poelm.core.config import PoEConfig
from poelm.core.errors import PoelmError
from poelm.train.pretrain import PretrainArgs, pretrain

from util import kill_at

# 3 layers: with 2, the backout layer (n_layer // 2) is the last layer, where the norm cancels the
# backout exactly and its gradient is pure float noise.
SHAPE = dict(n_layer=3, n_head=2, n_kv_head=1, n_embd=64, sequence_len=64, poe_stage_layers=[2, 1])


def args(tmp_path, tiny_tokenizer_dir, corpus_dir, name="run", **changes):
    base = dict(data=[str(corpus_dir)], out=str(tmp_path / name), tokenizer=str(tiny_tokenizer_dir),
                config=PoEConfig(vocab_size=512, **SHAPE), steps=6, device_batch_size=4, eval_every=3,
                eval_tokens=512, seq_len=32, sample_tokens=4, val_fraction=0.1, device="cpu")
    base.update(changes)
    return PretrainArgs(**base)


def weights(run_dir, which="final"):
    return load_file(str(Path(run_dir) / which / "model.safetensors"))


def test_run_folder_outputs(tmp_path, tiny_tokenizer_dir, corpus_dir):
    a = args(tmp_path, tiny_tokenizer_dir, corpus_dir, steps=6)
    summary = pretrain(a)
    run = Path(a.out)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    evals = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert set(evals[0]["val_bpb"]) == {"stage0", "stage1", "logop"}
    for r in records[1:]:
        assert {"tokens", "lr", "train_loss", "stage_losses", "tok_per_s"} <= set(r)
    assert records[-1]["tokens"] == 6 * 4 * 32
    assert (run / "val_bpb.png").stat().st_size > 1000
    # Every complete checkpoint keeps the best weights it records (best-NNNNNN); `best` points at the newest.
    recorded = sorted({f"best-{json.loads((run / 'checkpoints' / c / 'state.json').read_text())['best_step']:06d}"
                       for c in ("000003", "000006")})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["000003", "000006", "best", *recorded]
    assert os.readlink(run / "checkpoints" / "best") == f"best-{summary['best_step']:06d}"
    card = (run / "best" / "README.md").read_text()
    assert "## Training" in card and "## Validation bpb trajectory" in card and "← best" in card
    best = json.loads((run / "best" / "config.json").read_text())["training"]
    assert best["step"] == summary["best_step"]
    assert summary["best_val_bpb"] == min(e["val_bpb"]["logop"] for e in evals)


@pytest.fixture(scope="module")
def moved_base(tmp_path_factory, tiny_tokenizer):
    """A base moved off its init. At init every block is the identity, so some scalars (the backout)
    have an exactly-zero gradient whose float noise Adam would blow up into full-size steps, and runs
    that differ only in summation order would then differ visibly."""
    from poelm.core.model import PoEGPT
    from poelm.models.directory import save_model_dir
    from util import perturb_

    model = PoEGPT(PoEConfig(vocab_size=512, **SHAPE))
    model.init_weights(0)
    return save_model_dir(perturb_(model, seed=3, scale=0.1), tmp_path_factory.mktemp("base") / "moved",
                          tiny_tokenizer)


def test_accumulation_equals_one_big_batch(tmp_path, tiny_tokenizer_dir, corpus_dir, moved_base):
    common = dict(init=str(moved_base), tokenizer=None, config=None, steps=3)
    big = args(tmp_path, tiny_tokenizer_dir, corpus_dir, "big", device_batch_size=8, **common)
    small = args(tmp_path, tiny_tokenizer_dir, corpus_dir, "small", device_batch_size=4,
                 total_batch_tokens=8 * 32, **common)
    pretrain(big)
    pretrain(small)
    a, b = weights(big.out), weights(small.out)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_resume_is_bitwise(tmp_path, tiny_tokenizer_dir, corpus_dir, fraction):
    """Also with --stage-loss-fraction 0.5: the positions it draws come from the checkpointed RNG."""
    full = args(tmp_path, tiny_tokenizer_dir, corpus_dir, "full", steps=6, save_every=2, stage_loss_fraction=fraction)
    pretrain(full)
    # A copy of the finished run rolled back to its step-2 checkpoint, as if it had died there, and resumed.
    run = tmp_path / "part"
    shutil.copytree(full.out, run, symlinks=True)
    for name in ("000004", "000006"):
        shutil.rmtree(run / "checkpoints" / name)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "best")
    pretrain(args(tmp_path, tiny_tokenizer_dir, corpus_dir, "part", steps=6, save_every=2, resume=True,
                  stage_loss_fraction=fraction))
    a, b = weights(full.out), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(7))  # nothing logged twice


def cli(*argv, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "poelm", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def pretrain_argv(tokenizer_dir, corpus_dir, out, *extra):
    return ["pretrain", "--tokenizer", str(tokenizer_dir), "--depth", "3", "--n-embd", "64", "--n-head", "2",
            "--n-kv-head", "1", "--seq-len", "32", "--poe-stage-layers", "2,1", "--data", str(corpus_dir),
            "--out", str(out), "--device-batch-size", "4", "--eval-every", "10", "--eval-tokens", "256",
            "--sample-tokens", "0", "--val-fraction", "0.1", "--device", "cpu", *extra]


def test_sigkill_then_resume_is_bitwise(tmp_path, tiny_tokenizer_dir, corpus_dir, capsys):
    """Killed (SIGKILL, its own process) right after its step-10 checkpoint, mid-step and 50 steps before
    its end, the run resumes (the same command with --resume, in this process: only the kill needs a
    process of its own) and ends bit for bit where an uninterrupted run (this process too) ends."""
    steps = ["--steps", "60", "--save-every", "10"]
    victim = cli(*pretrain_argv(tiny_tokenizer_dir, corpus_dir, tmp_path / "victim", *steps))
    marker = tmp_path / "victim" / "checkpoints" / "000010" / "state.json"
    kill_at(victim, marker)
    assert marker.exists() and not (tmp_path / "victim" / "final").exists(), "the run was not killed mid-way"
    capsys.readouterr()
    assert main(pretrain_argv(tiny_tokenizer_dir, corpus_dir, tmp_path / "victim", *steps, "--resume")) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err, err
    assert main(pretrain_argv(tiny_tokenizer_dir, corpus_dir, tmp_path / "ref", *steps)) == 0
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "victim")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_equal_one(tmp_path, tiny_tokenizer_dir, corpus_dir):
    """torchrun's two data replicas (each half of the batch, gradients averaged) end where one process
    (this one, the same command) ends."""
    common = ["--steps", "4", "--total-batch-tokens", str(8 * 32)]
    assert main(pretrain_argv(tiny_tokenizer_dir, corpus_dir, tmp_path / "one", *common)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "poelm", *pretrain_argv(tiny_tokenizer_dir, corpus_dir, tmp_path / "two", *common)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 data replica(s) x 1 accumulation" in r.stderr
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-4, k


@pytest.mark.parametrize("changes, message", [
    (dict(seq_len=128), "--seq-len 128: this model takes sequences of 2..64"),
    (dict(total_batch_tokens=100), "--total-batch-tokens 100 is not divisible by device batch 4 x seq len 32"),
    (dict(resume=True), "--resume: no complete checkpoint"),
    (dict(data=["/nonexistent/corpus"]), "/nonexistent/corpus"),
    (dict(stage_loss_fraction=1.5), "--stage-loss-fraction 1.5: expected a fraction in (0, 1]"),
    (dict(stage_loss_fraction=0.5, config=PoEConfig(vocab_size=512, poe_mode="none", **SHAPE)),
     "--stage-loss-fraction 0.5: applies to --poe-mode flat, this model trains none"),
])
def test_bad_input(tmp_path, tiny_tokenizer_dir, corpus_dir, changes, message):
    with pytest.raises(PoelmError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        pretrain(args(tmp_path, tiny_tokenizer_dir, corpus_dir, **changes))
    assert not (tmp_path / "run" / "final").exists()


def test_bad_files_are_named(tmp_path, tiny_tokenizer_dir, corpus_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(PoelmError, match="empty.txt"):
        pretrain(args(tmp_path, tiny_tokenizer_dir, corpus_dir, data=[str(empty)]))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    with pytest.raises(PoelmError, match="latin.txt"):
        pretrain(args(tmp_path, tiny_tokenizer_dir, corpus_dir, data=[str(latin)]))


def test_existing_run_and_changed_config(tmp_path, tiny_tokenizer_dir, corpus_dir):
    a = args(tmp_path, tiny_tokenizer_dir, corpus_dir, steps=2, eval_every=2)
    pretrain(a)
    before = weights(a.out)
    with pytest.raises(PoelmError, match="already holds a run"):
        pretrain(a)
    with pytest.raises(PoelmError, match=r"--resume: .*run.json was made with seed=0, this run has seed=5"):
        pretrain(args(tmp_path, tiny_tokenizer_dir, corpus_dir, steps=2, eval_every=2, resume=True, seed=5))
    after = weights(a.out)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing overwritten


def test_init_dir_and_bp_control(tmp_path, tiny_tokenizer_dir, corpus_dir, capsys):
    from poelm.app.cli import main

    assert main(["init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "3", "--n-embd", "64", "--n-head", "2",
                 "--poe-stage-layers", "2,1", "--seq-len", "64", "--out", str(tmp_path / "base")]) == 0
    a = args(tmp_path, tiny_tokenizer_dir, corpus_dir, init=str(tmp_path / "base"), tokenizer=None, config=None,
             poe_mode="none", steps=2, eval_every=2)
    pretrain(a)
    config = json.loads((Path(a.out) / "final" / "config.json").read_text())
    assert config["poe_mode"] == "none" and config["poe_stage_layers"] == [2, 1]
