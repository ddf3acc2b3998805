"""The command line: every command's happy path, and bad input as one line, non-zero exit, no
traceback (unless --debug), and nothing half-written."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from poelm.app.cli import main
from poelm import models


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()  # progress lines may come first; the error is one line, last
    errors = [l for l in lines if l.startswith("poelm: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for f in fragments:
        assert f in errors[0], (f, errors[0])


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer_dir, capsys):
    code, out, err = run(capsys, "init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "2",
                         "--seq-len", "256", "--out", str(tmp_path / "m"))
    assert code == 0, err
    return tmp_path / "m"


def command_paths(parser=None, path=()):
    """Every command path of the parser (["init"], ["tokenizer"], ["tokenizer", "train"], ...), aliases included."""
    import argparse

    from poelm.app.cli import build_parser

    for action in (parser or build_parser())._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield [*path, name]
                yield from command_paths(sub, (*path, name))


def test_help_for_every_command(capsys):
    """`python -m poelm --help` in a fresh process (the module entry point), then every command's and
    group's --help in this one: each prints its usage and exits 0."""
    r = subprocess.run([sys.executable, "-m", "poelm", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("usage: poelm"), r.stderr
    paths = list(command_paths())
    assert len(paths) > 20 and ["tokenizer", "train"] in paths and ["convert", "nanochat"] in paths
    for argv in paths:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        out, err = capsys.readouterr()
        assert exit_.value.code == 0 and out.startswith("usage: poelm ") and not err, (argv, err)


def test_init_derives_the_nanochat_shape(tmp_path, tiny_tokenizer_dir, capsys):
    code, out, err = run(capsys, "init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "2",
                         "--out", str(tmp_path / "m"))
    assert code == 0
    assert "derived: n_embd=128, n_head=1, n_kv_head=1, poe_stage_layers=[1, 1] (head_dim 128)" in err
    assert "total" in out and "wrote" in out
    m = models.open(tmp_path / "m").model()
    assert m.config.n_embd == 128 and m.config.vocab_size == 512


def test_init_with_explicit_shape(tmp_path, tiny_tokenizer_dir, capsys):
    code, _, err = run(capsys, "init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "6", "--n-embd", "96",
                       "--n-head", "4", "--n-kv-head", "2", "--poe-stage-layers", "4,1,1", "--poe-mode", "none",
                       "--window-pattern", "SL", "--seq-len", "1024", "--seed", "3", "--out", str(tmp_path / "m"))
    assert code == 0, err
    c = models.open(tmp_path / "m").config
    assert (c.n_head, c.n_kv_head, c.poe_stage_layers, c.poe_mode) == (4, 2, [4, 1, 1], "none")
    assert c.layer_windows == [256, 1024, 256, 1024, 256, 1024]


def test_init_errors(tmp_path, tiny_tokenizer_dir, model_dir, capsys):
    code, _, err = run(capsys, "init", "--tokenizer", str(tmp_path / "nope"), "--depth", "2", "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "nope")
    code, _, err = run(capsys, "init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "2", "--n-head", "3",
                       "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "'n_embd'", "multiple of n_head=3")
    code, _, err = run(capsys, "init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "4",
                       "--poe-stage-layers", "2,1", "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "'poe_stage_layers'", "summing to n_layer=4")
    assert not (tmp_path / "x").exists()
    before = (model_dir / "model.safetensors").read_bytes()
    code, _, err = run(capsys, "init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "2", "--seed", "9",
                       "--out", str(model_dir))
    assert_one_line_error(code, err, "already exists")
    assert (model_dir / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_overwrite_replaces_atomically(tmp_path, tiny_tokenizer_dir, model_dir, capsys, monkeypatch):
    """--overwrite: a failure at the last step of writing (the digests) leaves the old directory whole;
    a successful run replaces it completely, with nothing left beside it."""
    argv = ["init", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "2", "--seq-len", "256", "--seed", "9",
            "--out", str(model_dir), "--overwrite"]
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("poelm.models.directory.write_manifest", fail)
    code, out, err = run(capsys, *argv)
    assert code == 1 and "disk full" in err and "wrote" not in out
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    monkeypatch.undo()
    code, out, _ = run(capsys, *argv)
    assert code == 0 and f"wrote {model_dir}" in out
    after = load_file(str(model_dir / "model.safetensors"))
    assert not torch.equal(load_file_bytes(before["model.safetensors"])["transformer.wte.weight"],
                           after["transformer.wte.weight"])
    assert models.open(model_dir).config.n_layer == 2  # complete, and its digests match
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def test_inspect(model_dir, capsys):
    code, out, _ = run(capsys, "inspect", str(model_dir))
    assert code == 0 and "2 layers in stages [1, 1]" in out and "[0] base" in out and "model.safetensors" in out
    code, out, _ = run(capsys, "inspect", str(model_dir), "--json")
    data = json.loads(out)
    assert data["config"]["n_layer"] == 2 and data["assembled_params"] > 0
    assert data["links"][0]["fingerprint"].startswith("xxh3-128:")


def test_the_old_stage_group_still_works_and_says_its_new_name(model_dir, tmp_path, capsys):
    """`poelm stage ...` was renamed `poelm specialist ...` (a stage is also a cut of the base): the old name
    runs the same command, after one line on stderr naming the new one; the new name says nothing of it."""
    code, out, err = run(capsys, "stage", "attach", str(model_dir), "--layers", "1", "--name", "code",
                         "--out", str(tmp_path / "old"))
    assert code == 0 and "attached stage 'code'" in out
    assert [l for l in err.splitlines() if "poelm specialist" in l] == [
        "poelm: `poelm stage` is now `poelm specialist` (the old name still works)"]
    code, out, err = run(capsys, "specialist", "attach", str(model_dir), "--layers", "1", "--name", "code",
                         "--out", str(tmp_path / "new"))
    assert code == 0 and "attached stage 'code'" in out and "is now" not in err
    old, new = (load_file(tmp_path / d / "delta.safetensors") for d in ("old", "new"))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_bad_model_directories(tmp_path, model_dir, capsys):
    """Each damaged file is named in one line: first by its digest; then, with the edit's digest
    re-recorded (a deliberate edit), by the check that reads its content."""
    from poelm.core.files import update_manifest

    weights = model_dir / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    code, _, err = run(capsys, "inspect", str(model_dir))
    assert_one_line_error(code, err, "model.safetensors", "content does not match digests.json", "truncated")
    update_manifest(model_dir, ["model.safetensors"])
    code, _, err = run(capsys, "inspect", str(model_dir))
    assert_one_line_error(code, err, "model.safetensors", "unreadable")

    weights.write_bytes(good)
    tensors = load_file(str(weights))
    tensors["lm_head.weight"] = torch.zeros(512, 7)
    save_file(tensors, str(weights))
    update_manifest(model_dir, ["model.safetensors"])
    code, _, err = run(capsys, "inspect", str(model_dir))
    assert_one_line_error(code, err, "model.safetensors", "'lm_head.weight' has shape [512, 7], expected [512, 128]")

    tensors["lm_head.weight"] = torch.zeros(512, 128)
    tensors["stowaway"] = torch.zeros(1)
    save_file(tensors, str(weights))
    update_manifest(model_dir, ["model.safetensors"])
    code, _, err = run(capsys, "inspect", str(model_dir))
    assert_one_line_error(code, err, "unexpected tensor 'stowaway'")

    del tensors["stowaway"], tensors["smear_lambda"]
    save_file(tensors, str(weights))
    update_manifest(model_dir, ["model.safetensors"])
    code, _, err = run(capsys, "inspect", str(model_dir))
    assert_one_line_error(code, err, "missing tensor 'smear_lambda'")

    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "vocab_size": 600}))
    code, _, err = run(capsys, "inspect", str(model_dir))
    assert_one_line_error(code, err, "config.json", "content does not match digests.json")
    update_manifest(model_dir, ["config.json"])
    code, _, err = run(capsys, "inspect", str(model_dir))
    assert_one_line_error(code, err, "tokenizer has 512 tokens but config.json says vocab_size 600")

    (model_dir / "config.json").unlink()
    code, _, err = run(capsys, "inspect", str(model_dir))
    assert_one_line_error(code, err, "config.json: missing")
    code, _, err = run(capsys, "inspect", str(tmp_path / "elsewhere"))
    assert_one_line_error(code, err, "not a directory")


def test_tokenizer_train_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, the quick brown fox 12345\n" * 200 + "".join(chr(i) for i in range(32, 900)))
    code, out, err = run(capsys, "tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
                         "--out", str(tmp_path / "tok"))
    assert code == 0, err
    assert "<|bos|>=291" in out and "<|assistant_start|>=294" in out
    code, _, err = run(capsys, "tokenizer", "train", "--input", str(tmp_path / "missing.txt"),
                       "--vocab-size", "300", "--out", str(tmp_path / "tok2"))
    assert_one_line_error(code, err, "missing.txt")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9".encode("latin-1"))
    code, _, err = run(capsys, "tokenizer", "train", "--input", str(binary), "--vocab-size", "300",
                       "--out", str(tmp_path / "tok2"))
    assert_one_line_error(code, err, "latin1.txt")
    assert not (tmp_path / "tok2").exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    """Without --debug one line (here, through `main`); with it the traceback, through the module entry
    point in a fresh process."""
    code, _, err = run(capsys, "inspect", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "nope")
    debug = subprocess.run([sys.executable, "-m", "poelm", "inspect", str(tmp_path / "nope"), "--debug"],
                           capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "PoelmError" in debug.stderr
