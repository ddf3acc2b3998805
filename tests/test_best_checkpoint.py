"""The best-so-far weights (`RUNDIR/checkpoints/best`, exported as `RUNDIR/best/`): there is always one
complete copy, a kill while it is replaced leaves the previous one, and after a kill + --resume it is
the best step recorded by the restored checkpoint, bit for bit what an uninterrupted run exports."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poelm.core.config import PoEConfig
from poelm.core.errors import PoelmError
from poelm.train.dist import Dist
from poelm.train.loop import LoopConfig, RunArgs, TrainLoop
from poelm.train.pretrain import PretrainArgs, pretrain


SHAPE = dict(n_layer=3, n_head=2, n_kv_head=1, n_embd=64, sequence_len=64, poe_stage_layers=[2, 1])


class Killed(Exception):
    """Stands for a SIGKILL: raised in-process at a chosen point, nothing after it runs."""


def run_args(out, tokenizer_dir, corpus_dir, **changes):
    base = dict(data=[str(corpus_dir)], out=str(out), tokenizer=str(tokenizer_dir),
                config=PoEConfig(vocab_size=512, **SHAPE), steps=8, device_batch_size=4, eval_every=1,
                save_every=4, eval_tokens=256, seq_len=32, sample_tokens=0, val_fraction=0.1, device="cpu")
    base.update(changes)
    return PretrainArgs(**base)


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def differing(a, b):
    """The tensor names whose values (or presence) differ; [] when bit for bit equal."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def same(a, b):
    return not differing(a, b)


def metrics(run):
    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ 1. kill after a new best, resume
# The val bpb each evaluation reports for the best key (logop), by step: the true curve has its
# minimum at step 4. The killed attempt sees a spuriously low value at step 6 (as on a GPU, where a
# re-evaluation need not reproduce a value bit for bit), so it writes a new best at step 6 after the
# last checkpoint (step 4) and dies right after. The resumed run re-trains steps 5-6, finds no value
# below step 4's, and must export the step-4 weights.
CURVE = {0: 9.0, 1: 8.0, 2: 7.0, 3: 6.0, 4: 5.0, 5: 5.5, 6: 5.25, 7: 5.75, 8: 6.5}


def script_evaluation(monkeypatch, noise: dict[int, float], kill_after: int | None = None):
    """Make every evaluation report CURVE (+ noise) for logop; raise Killed after the eval of `kill_after`."""
    init, eval_and_log = TrainLoop.__init__, TrainLoop._eval_and_log

    def patched_init(self, *a, **kw):
        init(self, *a, **kw)
        real = self.evaluate

        def evaluate(step):
            result = real(step)
            result["val_bpb"] = {**result["val_bpb"], "logop": CURVE[step] + noise.get(step, 0.0)}
            return result
        self.evaluate = evaluate

    def patched_eval_and_log(self, step, record, progress):
        eval_and_log(self, step, record, progress)
        if step == kill_after:
            raise Killed(f"killed after the evaluation of step {step}")

    monkeypatch.setattr(TrainLoop, "__init__", patched_init)
    monkeypatch.setattr(TrainLoop, "_eval_and_log", patched_eval_and_log)


def test_resume_after_a_new_best_exports_the_recorded_best(tmp_path, tiny_tokenizer_dir, corpus_dir):
    with pytest.MonkeyPatch.context() as mp:
        script_evaluation(mp, noise={})
        ref = pretrain(run_args(tmp_path / "ref", tiny_tokenizer_dir, corpus_dir))
    assert ref["best_step"] == 4
    # Each complete checkpoint removed the best folders no complete checkpoint records.
    assert sorted(p.name for p in (tmp_path / "ref" / "checkpoints").iterdir()) == \
        ["000004", "000008", "best", "best-000004"]

    victim = tmp_path / "victim"
    with pytest.MonkeyPatch.context() as mp:
        script_evaluation(mp, noise={6: -1.0}, kill_after=6)
        with pytest.raises(Killed):
            pretrain(run_args(victim, tiny_tokenizer_dir, corpus_dir))
    ckpts = victim / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["000004"]
    assert json.loads((ckpts / "best" / "best.json").read_text())["step"] == 6  # the pre-kill new best
    assert json.loads((ckpts / "000004" / "state.json").read_text())["best_step"] == 4

    with pytest.MonkeyPatch.context() as mp:
        script_evaluation(mp, noise={})
        summary = pretrain(run_args(victim, tiny_tokenizer_dir, corpus_dir, resume=True))
    assert summary["best_step"] == 4
    exported = json.loads((victim / "best" / "config.json").read_text())["training"]
    assert exported["step"] == summary["best_step"] == 4
    evals = {r["step"]: r["val_bpb"]["logop"] for r in metrics(victim) if "val_bpb" in r}
    assert sorted(evals) == list(range(9))  # re-trained steps logged once
    assert evals[exported["step"]] == min(evals.values()) == summary["best_val_bpb"]
    assert differing(weights(victim / "best"), weights(tmp_path / "ref" / "best")) == []
    assert differing(weights(victim / "final"), weights(tmp_path / "ref" / "final")) == []
    assert json.loads((ckpts / "best" / "best.json").read_text())["step"] == 4
    # Only the recorded best is kept beside the checkpoints.
    assert sorted(p.name for p in ckpts.iterdir()) == ["000004", "000008", "best", "best-000004"]


def test_resume_reproduces_a_best_after_the_checkpoint(tmp_path, tiny_tokenizer_dir, corpus_dir):
    """Deterministic re-training: the new best lost with the kill (step 6) comes again and is exported."""
    with pytest.MonkeyPatch.context() as mp:
        script_evaluation(mp, noise={6: -1.0})
        ref = pretrain(run_args(tmp_path / "ref", tiny_tokenizer_dir, corpus_dir))
    assert ref["best_step"] == 6
    # The best each complete checkpoint records is kept (step 4's checkpoint: 4, step 8's: 6).
    assert sorted(p.name for p in (tmp_path / "ref" / "checkpoints").iterdir()) == \
        ["000004", "000008", "best", "best-000004", "best-000006"]
    victim = tmp_path / "victim"
    with pytest.MonkeyPatch.context() as mp:
        script_evaluation(mp, noise={6: -1.0}, kill_after=6)
        with pytest.raises(Killed):
            pretrain(run_args(victim, tiny_tokenizer_dir, corpus_dir))
    with pytest.MonkeyPatch.context() as mp:
        script_evaluation(mp, noise={6: -1.0})
        summary = pretrain(run_args(victim, tiny_tokenizer_dir, corpus_dir, resume=True))
    assert summary["best_step"] == 6
    assert json.loads((victim / "best" / "config.json").read_text())["training"]["step"] == 6
    assert differing(weights(victim / "best"), weights(tmp_path / "ref" / "best")) == []


# ------------------------------------------------------------- 2. a failure while the best is replaced
def tiny_loop(run_dir: Path) -> tuple[TrainLoop, torch.nn.Module]:
    model = torch.nn.Linear(4, 3)
    run = RunArgs(out=str(run_dir), eval_every=1, save_every=5, warmup_frac=0.0, warmdown_frac=0.0, final_lr_frac=0.0)
    cfg = LoopConfig(run, steps=10, accum_steps=1, tokens_per_step=1, best_key="logop")
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    loop = TrainLoop(d, cfg, model=model, ddp_model=model, optimizer=None, loader=None, loss_fn=None,
                     evaluate=None, trainable=lambda: dict(model.state_dict()), count_fn=None)
    return loop, model


def fail_on(monkeypatch, name: str, when):
    """Make os.<name> raise Killed on its first call for which `when(*args)` holds."""
    real = getattr(os, name)
    fired = []

    def fake(*args, **kw):
        if not fired and when(*args):
            fired.append(args)
            raise Killed(f"killed in os.{name}{args}")
        return real(*args, **kw)
    monkeypatch.setattr(os, name, fake)
    return fired


@pytest.mark.parametrize("where", ["switch", "symlink", "rename"])
def test_failure_while_saving_a_best_keeps_the_previous_one(tmp_path, monkeypatch, where):
    loop, model = tiny_loop(tmp_path / "run")
    (tmp_path / "run").mkdir()
    loop._save_best(1, 2.0)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    best = tmp_path / "run" / "checkpoints" / "best"
    if where == "switch":  # the call that puts the new best in place under the name `best`
        fired = fail_on(monkeypatch, "replace", lambda src, dst, *a: Path(dst) == best)
    elif where == "symlink":
        fired = fail_on(monkeypatch, "symlink", lambda *a: True)
    else:  # the complete temporary folder renamed to its final name
        fired = fail_on(monkeypatch, "replace", lambda src, dst, *a: Path(src).name.startswith(".best-"))
    with pytest.raises(Killed):
        loop._save_best(2, 1.0)
    assert fired, "no failure was injected"
    monkeypatch.undo()
    assert (best / "model.safetensors").is_file()
    assert differing(load_file(str(best / "model.safetensors")), first) == []
    assert json.loads((best / "best.json").read_text())["step"] == 1
    assert same(loop.best_weights(), first)
    # The next best still goes in cleanly.
    loop._save_best(3, 0.5)
    assert json.loads((best / "best.json").read_text())["step"] == 3
    assert same(loop.best_weights(), dict(model.state_dict()))


def test_best_is_always_complete_while_replaced(tmp_path, monkeypatch):
    """At every filesystem call of a save, `best` is the previous best or the new one, complete."""
    loop, model = tiny_loop(tmp_path / "run")
    (tmp_path / "run").mkdir()
    loop._save_best(1, 2.0)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    second = {k: v.clone() for k, v in model.state_dict().items()}
    best = tmp_path / "run" / "checkpoints" / "best"
    seen = []

    def check():
        w = load_file(str(best / "model.safetensors"))
        step = json.loads((best / "best.json").read_text())["step"]
        assert (step == 1 and same(w, first)) or (step == 2 and same(w, second)), step
        seen.append(step)

    for name in ("replace", "rename", "symlink", "unlink", "rmdir"):
        real = getattr(os, name)

        def wrapped(*args, _real=real, **kw):
            check()
            out = _real(*args, **kw)
            check()
            return out
        monkeypatch.setattr(os, name, wrapped)
    real_rmtree = shutil.rmtree

    def rmtree(*args, **kw):
        check()
        real_rmtree(*args, **kw)
        check()
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    loop._save_best(2, 1.0)
    monkeypatch.undo()
    assert seen and seen[-1] == 2


# ------------------------------------------------------------------ 3. restore: missing and legacy best
@pytest.fixture
def finished_run(tmp_path, tiny_tokenizer_dir, corpus_dir):
    """A finished 2-step run (evals at 0, 1, 2; checkpoint at 2), with its exported best/ weights."""
    a = run_args(tmp_path / "run", tiny_tokenizer_dir, corpus_dir, steps=2, save_every=2)
    summary = pretrain(a)
    run = Path(a.out)
    b = summary["best_step"]
    assert json.loads((run / "checkpoints" / "000002" / "state.json").read_text())["best_step"] == b
    return a, run, b, weights(run / "best")


def resume(a):
    return pretrain(PretrainArgs(**{**a.__dict__, "resume": True}))


def test_restore_without_the_recorded_best_is_one_clear_error(finished_run):
    a, run, b, _ = finished_run
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / f"best-{b:06d}")
    with pytest.raises(PoelmError) as e:
        resume(a)
    message = str(e.value)
    assert "\n" not in message
    assert str(ckpts / f"best-{b:06d}") in message and f"step {b}" in message


def make_legacy(run: Path, step: int) -> None:
    """Turn `checkpoints/best` into what the previous version wrote: a real folder with best.json."""
    ckpts = run / "checkpoints"
    target = ckpts / os.readlink(ckpts / "best")
    (ckpts / "best").unlink()
    os.rename(target, ckpts / "best")
    info = json.loads((ckpts / "best" / "best.json").read_text())
    (ckpts / "best" / "best.json").write_text(json.dumps({**info, "step": step}))
    (ckpts / "best" / "digests.json").unlink()  # that version recorded no digests


def test_restore_migrates_a_legacy_best_folder(finished_run):
    a, run, b, exported = finished_run
    ckpts = run / "checkpoints"
    make_legacy(run, b)
    assert (ckpts / "best").is_dir() and not (ckpts / "best").is_symlink()
    summary = resume(a)
    assert summary["best_step"] == b
    assert (ckpts / "best").is_symlink() and os.readlink(ckpts / "best") == f"best-{b:06d}"
    assert json.loads((ckpts / f"best-{b:06d}" / "best.json").read_text())["step"] == b
    assert differing(weights(run / "best"), exported) == []


def test_restore_refuses_a_legacy_best_folder_of_another_step(finished_run):
    a, run, b, _ = finished_run
    make_legacy(run, b + 1)
    with pytest.raises(PoelmError) as e:
        resume(a)
    message = str(e.value)
    assert "\n" not in message
    assert str(run / "checkpoints" / "best" / "best.json") in message
    assert f"step {b + 1}" in message and f"step {b}" in message
