"""Specialist SFT: a short run whose loss falls, preservation, export, two processes == one,
SIGKILL + resume == uninterrupted, and bad data as one-line errors with nothing left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poelm.app.cli import main
from poelm import models
from poelm.train.sft import StageTrainArgs, stage_train

from util import kill_at

QUESTIONS = ["add two numbers", "reverse a list", "count the words", "sum a list", "find the maximum",
             "sort the items", "join the strings", "square a number", "check a prime", "read a file"]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    lines = []
    for i in range(60):
        q = QUESTIONS[i % len(QUESTIONS)]
        shape = i % 3
        answer = f"def f{i}(x):\n    return x + {i}\n"
        if shape == 0:
            lines.append({"messages": [{"role": "user", "content": f"Please {q}."},
                                       {"role": "assistant", "content": answer}]})
        elif shape == 1:
            lines.append({"instruction": f"Write code to {q}", "input": "", "output": answer})
        else:
            lines.append({"conversations": [{"from": "human", "value": f"hi, {q}?"}, {"from": "gpt", "value": answer}]})
    (d / "train.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return d / "train.jsonl"


@pytest.fixture(scope="module")
def stage(tiny_stage):
    return tiny_stage


def args(stage_dir, data, out, **kw):
    base = dict(stage=str(stage_dir), data=[str(data)], out=str(out), steps=12, val_conversations=8, seq_len=64,
                device_batch_size=4, eval_every=4, seed=0, stage_head_lr=1e-2, device="cpu")
    base.update(kw)
    return StageTrainArgs(**base)


def test_short_run_learns_preserves_and_exports(stage, chat_data, tmp_path, capsys):
    base, stage_dir = stage
    summary = stage_train(args(stage_dir, chat_data, tmp_path / "run", case_augment=True))
    run = tmp_path / "run"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0]
    bpb = [b for _, b in summary["val_bpb"]]
    assert bpb[-1] < bpb[0]
    assert summary["preservation_max_abs_diff"] == 0.0
    assert all(r["preservation_max_abs_diff"] == 0.0 for r in records if "val_bpb" in r)
    for which in ("final", "best"):
        cfg = json.loads((run / which / "config.json").read_text())
        assert (run / which / cfg["base_model_name_or_path"]).resolve() == Path(base).resolve()
    capsys.readouterr()
    assert main(["check-preservation", str(base), str(run / "best")]) == 0
    assert "max |Δlogit| = 0 (bit-identical)" in capsys.readouterr().out
    x = torch.randint(0, 500, (1, 40))
    with torch.no_grad():
        assert not torch.equal(models.open(run / "best").model()(x).logits, models.open(base).model()(x).logits)
    card = (run / "best" / "README.md").read_text()
    assert "## Training" in card and "Validation bpb trajectory" in card and "Trainable params" in card
    from transformers import AutoModelForCausalLM  # the export loads through transformers' own loader

    m = AutoModelForCausalLM.from_pretrained(str(run / "best"), trust_remote_code=True)
    assert type(m).__name__ == "PoelmForCausalLM" and m.poe.config.n_layer == 4


def test_assistant_only_loss(stage, chat_data):
    """The training loss is the mean CE over exactly the assistant tokens (and their end token)."""
    from poelm.data.mixture import build_mixture
    from poelm.data.packing import pack, render_conversations
    from poelm.data.sources import load_conversations
    from poelm.core.tokenizer import Tokenizer

    _, stage_dir = stage
    model = models.open(stage_dir).model()
    tok = Tokenizer.load(stage_dir)
    sources, _ = load_conversations([str(chat_data)])
    rows = pack(render_conversations(build_mixture(sources, 4, 0).train[:6], tok), 64, tok.bos_id)
    x, y = torch.tensor(rows.inputs[:2]).long(), torch.tensor(rows.targets[:2]).long()
    doc, pos = torch.tensor(rows.doc_ids[:2]).long(), torch.tensor(rows.positions[:2]).long()
    with torch.no_grad():
        loss = model(x, targets=y, doc_ids=doc, positions=pos).loss
        logits = model(x, doc_ids=doc, positions=pos).logits
    keep = y >= 0
    manual = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    assert torch.allclose(loss, manual, atol=1e-5)
    supervised = y[keep]
    assert tok.token_id("<|assistant_end|>") in supervised.tolist()
    assert tok.token_id("<|user_start|>") not in supervised.tolist()


def cli_argv(stage_dir, data, out, *extra):
    return ["specialist", "train", str(stage_dir), "--data", str(data), "--out", str(out), "--val-conversations", "8",
            "--seq-len", "64", "--device-batch-size", "4", "--stage-head-lr", "0.01", "--device", "cpu", *extra]


def popen(*argv, env=None):
    return subprocess.Popen([sys.executable, "-m", "poelm", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def test_two_processes_equal_one(stage, chat_data, tmp_path):
    """torchrun's two data replicas end where one process (this one, the same command) ends."""
    _, stage_dir = stage
    common = ["--steps", "3", "--eval-every", "3", "--total-batch-tokens", str(8 * 64)]
    assert main(cli_argv(stage_dir, chat_data, tmp_path / "one", *common)) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "poelm", *cli_argv(stage_dir, chat_data, tmp_path / "two", *common)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "final" / "delta.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "delta.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max() <= 1e-4, k


def test_sigkill_then_resume_is_bitwise(stage, chat_data, tmp_path, capsys):
    """Killed (SIGKILL, its own process) right after its step-10 checkpoint, mid-step and 90 steps before
    its end, the run resumes (the same command with --resume, in this process: only the kill needs a
    process of its own) and ends bit for bit where an uninterrupted run (this process too) ends."""
    _, stage_dir = stage
    steps = ["--steps", "100", "--eval-every", "50", "--save-every", "10"]
    victim = popen(*cli_argv(stage_dir, chat_data, tmp_path / "victim", *steps))
    marker = tmp_path / "victim" / "checkpoints" / "000010" / "state.json"
    kill_at(victim, marker)
    assert marker.exists() and not (tmp_path / "victim" / "final").exists(), "the run was not killed mid-way"
    capsys.readouterr()
    assert main(cli_argv(stage_dir, chat_data, tmp_path / "victim", *steps, "--resume")) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err, err
    assert main(cli_argv(stage_dir, chat_data, tmp_path / "ref", *steps)) == 0
    a = load_file(str(tmp_path / "ref" / "final" / "delta.safetensors"))
    b = load_file(str(tmp_path / "victim" / "final" / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n',
     "bad.jsonl:2"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}\n', "bad.jsonl:1"),
    ("", "bad.jsonl"),
    ('{"question": "what?", "answer": "that"}\n', "bad.jsonl:1"),
])
def test_bad_data_is_one_line_and_leaves_nothing(stage, tmp_path, capsys, content, message):
    _, stage_dir = stage
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    code = main(cli_argv(stage_dir, bad, tmp_path / "run", "--steps", "2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("poelm: error: ") and message in err[-1], err
    assert not (tmp_path / "run" / "best").exists() and not (tmp_path / "run" / "final").exists()
