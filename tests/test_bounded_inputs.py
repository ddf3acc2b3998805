"""Inputs are checked before they cost (issue 23 #3, #4): every size field of a config.json (digests
re-recorded, so only the content is wrong) and of a nanochat checkpoint's meta is bounded and typed, a
directory's config is compared with its safetensors header before any model is built, and a digests.json
entry outside its directory is malformed, never followed. Each ends in one line naming the field (or file)
and what was expected, within a second, while Python allocates less than the files' own size (tracemalloc
sees every Python object; a tensor allocation that large would take far longer than the second)."""

from __future__ import annotations

import json
import re
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest

from poelm.app.cli import main
from poelm.core.config import SIZE_LIMITS, PoEConfig
from poelm.core.files import update_manifest

try:
    from tests import nanochat_poe_ref as fork
    from tests import nanochat_ref as ref
except ImportError:
    import nanochat_poe_ref as fork
    import nanochat_ref as ref


def run(capsys, argv: list, inputs: Path) -> str:
    """`poelm ARGV`: its one error line, after checking the time (< 1 s) and Python's peak allocation
    (< the bytes of the files under `inputs`). The same command runs first on a path that does not
    exist, so what is measured is the command, not the first import of its modules."""
    missing = inputs.parent / "does-not-exist"
    main([str(missing) if Path(str(a)) == inputs else str(a) for a in argv])
    capsys.readouterr()
    budget = sum(p.stat().st_size for p in inputs.rglob("*") if p.is_file())
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        code = main([str(a) for a in argv])
    finally:
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("poelm: error: "), err
    assert seconds < 1.0, (seconds, err)
    assert peak < budget, (peak, budget, err)
    return err[0]


@pytest.fixture
def base(tiny_stage, tmp_path, capsys):
    """A copy of the tiny base."""
    out = tmp_path / "base"
    shutil.copytree(tiny_stage[0], out)
    return out


def rewrite_config(directory: Path, **changes) -> None:
    """config.json with `changes`, its digest re-recorded: a deliberate edit, so only the content is wrong."""
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))
    update_manifest(directory, ["config.json"])


@pytest.mark.parametrize("name", sorted(SIZE_LIMITS))
@pytest.mark.parametrize("value", ["over", 0, -1, "4", 4.5, True, None, 2**40])
def test_every_size_field_of_a_config_is_typed_and_bounded(base, capsys, name, value):
    bound = SIZE_LIMITS[name]
    value = bound + 1 if value == "over" else value
    rewrite_config(base, **{name: value})
    message = run(capsys, ["inspect", base], base)
    assert f"{base / 'config.json'}: config field '{name}' = {value!r}: expected an integer in [1, {bound}] " \
           f"(poelm's bound on {name})" in message


@pytest.mark.parametrize("changes, expected", [
    (dict(n_layer=1000000), "config field 'n_layer' = 1000000: expected an integer in [1, 1024]"),
    (dict(n_embd=2**40), "config field 'n_embd' = 1099511627776: expected an integer in [1, 65536]"),
    (dict(layer_windows=[128] * 5000), "config field 'layer_windows' = [128, 128, 128, 128, 128, 128, ...]: "
                                       "expected a list of at most n_layer=3 integers in [0, 2097152]"),
    (dict(layer_windows=[128] * 1000000), "config.json: 5000xxx bytes; a config.json holds at most 1048576 "
                                          "(poelm's bound"),
    (dict(layer_windows=[128, "128", 64]), "config field 'layer_windows' = [128, '128', 64]: expected a list"),
    (dict(poe_stage_layers=[2, 1.5]), "config field 'poe_stage_layers' = [2, 1.5]: expected a list"),
    (dict(window_pattern="S" * 5000), "config field 'window_pattern' = 'SSSSSSSSSSSS...SSSSSSSSSSSSS': expected at "
                                      "most 1024 characters"),
    (dict(rope_base=float("inf")), "config field 'rope_base' = inf: expected a finite number"),
    (dict(softcap="15"), "config field 'softcap' = '15': expected a finite number"),
    (dict(smear="yes"), "config field 'smear' = 'yes': expected true or false"),
    (dict(backout_layer=10**12), "config field 'backout_layer' = 1000000000000: expected an integer in [0, n_layer=3]"),
])
def test_the_issues_configs_fail_at_once(base, capsys, changes, expected):
    rewrite_config(base, **changes)
    size = (base / "config.json").stat().st_size
    assert expected.replace("5000xxx", str(size)) in run(capsys, ["inspect", base], base)


def consistent(config: dict, **changes) -> dict:
    """A config.json content in which every structural field agrees with `changes` (as `poelm init` writes)."""
    fields = {k: v for k, v in config.items() if k in PoEConfig.__dataclass_fields__}
    fields.update(layer_windows=None, value_embed_layers=None, backout_layer=None, poe_backout_stages=None,
                  n_base_stages=None, **changes)
    return PoEConfig(**fields).to_dict()


@pytest.mark.parametrize("changes, expected", [
    (dict(n_layer=1000, poe_stage_layers=[1000]), r"model.safetensors: missing tensor 'transformer\.h\.\d+\.\S+' "
                                                  r"\(and \d{4} more\)"),
    (dict(n_embd=4096, n_head=32, n_kv_head=16), r"model.safetensors: tensor 'transformer.wte.weight' has shape "
                                                 r"\[512, 64\], expected \[512, 4096\]"),
    (dict(vocab_size=2**22), r"model.safetensors: tensor 'transformer.wte.weight' has shape \[512, 64\], expected "
                             r"\[4194304, 64\]"),
])
def test_a_config_that_does_not_fit_its_tensors_fails_on_the_header(base, capsys, changes, expected):
    """Within the bounds but not what the file holds: refused on the safetensors header, before any model
    (1000 layers of modules) or tensor is made."""
    rewrite_config(base, **consistent(json.loads((base / "config.json").read_text()), **changes))
    if "vocab_size" in changes:  # the tokenizer check would come first; compare the tensors here
        from poelm.core.cascade import open_chain
        from poelm.core.errors import PoelmError

        with pytest.raises(PoelmError, match=expected):
            open_chain(base)
        return
    assert re.search(expected, run(capsys, ["inspect", base], base))


def test_transformers_refuses_a_bounded_field_in_one_line(base):
    from transformers import AutoModelForCausalLM

    rewrite_config(base, n_layer=1000000)
    with pytest.raises(Exception) as e:
        AutoModelForCausalLM.from_pretrained(str(base), trust_remote_code=True)
    assert type(e.value).__name__ == "PoelmError" and "\n" not in str(e.value)
    assert "config field 'n_layer' = 1000000: expected an integer in [1, 1024]" in str(e.value)


def test_a_digests_entry_outside_the_directory_is_malformed_not_followed(base, capsys):
    path = base / "digests.json"
    data = json.loads(path.read_text())
    data["files"]["../../../../etc/hostname"] = {"bytes": 1, "xxh3_128": "0" * 32}
    path.write_text(json.dumps(data))
    message = run(capsys, ["inspect", base], base)
    assert f"{path}: entry '../../../../etc/hostname' is not a file name in this directory" in message
    assert "/etc" not in message.replace("'../../../../etc/hostname'", "")  # no advice about /etc


# ---- nanochat and nanochat-poe checkpoints ------------------------------------------------------------

SHAPE = dict(vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, sequence_len=512)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An upstream nanochat checkpoint and a nanochat-poe base checkpoint (tiny, by the references)."""
    root = tmp_path_factory.mktemp("checkpoints")
    ref.save_nanochat_checkpoint(ref.build_model(ref.GPTConfig(**SHAPE), seed=3, perturb=True), root / "nanochat", 10)
    model = fork.build_fork_base(ref.GPTConfig(**SHAPE), poe_every=2, seed=3)
    fork.save_fork_base(model, root / "nanochat-poe", 10, poe_mode="flat", poe_every=2, poe_alpha=0.0,
                        version="276c2ac")
    return root


@pytest.mark.parametrize("fmt", ["nanochat", "nanochat-poe"])
@pytest.mark.parametrize("name, value, expected", [
    ("n_layer", "4", "model_config 'n_layer' = '4': expected an integer in [1, 1024] (poelm's bound on n_layer)"),
    ("n_layer", 4.5, "model_config 'n_layer' = 4.5: expected an integer in [1, 1024]"),
    ("n_layer", 10**10, "model_config 'n_layer' = 10000000000: expected an integer in [1, 1024]"),
    ("n_embd", "64", "model_config 'n_embd' = '64': expected an integer in [1, 65536]"),
    ("vocab_size", -512, "model_config 'vocab_size' = -512: expected an integer in [1, 4194304]"),
    ("sequence_len", 2**40, "model_config 'sequence_len' = 1099511627776: expected an integer in [1, 2097152]"),
    ("window_pattern", 4, "model_config 'window_pattern' = 4: expected a string of 'S' and 'L'"),
])
def test_a_checkpoint_meta_is_checked_before_anything_is_read(checkpoints, tiny_tokenizer_dir, tmp_path, capsys,
                                                             fmt, name, value, expected):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints / fmt, ckpt)
    meta = ckpt / "meta_000010.json"
    data = json.loads(meta.read_text())
    data["model_config"][name] = value
    meta.write_text(json.dumps(data))
    message = run(capsys, ["convert", fmt, "--checkpoint", ckpt, "--tokenizer", tiny_tokenizer_dir,
                           "--out", tmp_path / "out"], ckpt)
    assert f"{meta}: {expected}" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value, expected", [
    ("frozen_layers", 10**10, "model_config 'frozen_layers' = 10000000000: expected an integer in [0, 1024]"),
    ("intermediate_size", "256", "model_config 'intermediate_size' = '256': expected an integer in [0, 262144]"),
])
def test_the_forks_own_fields_are_bounded(checkpoints, tiny_tokenizer_dir, tmp_path, capsys, key, value, expected):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints / "nanochat-poe", ckpt)
    meta = ckpt / "meta_000010.json"
    data = json.loads(meta.read_text())
    data["model_config"][key] = value
    meta.write_text(json.dumps(data))
    message = run(capsys, ["convert", "nanochat-poe", "--checkpoint", ckpt, "--tokenizer", tiny_tokenizer_dir,
                           "--out", tmp_path / "out"], ckpt)
    assert f"{meta}: {expected}" in message
