"""A stage's parent can move (issue 23 #2): `base_model_name_or_path` is the user's to point, by hand or
with `poelm specialist relink`, and both poelm and `transformers` then load the stage with the logits it had;
any other edit of any recorded file still fails to load, naming the file and the command that records a
deliberate edit. A missing parent says where it was looked for; a cycle says cycle.

The digests cover every file poelm writes except README.md (the card, meant to be edited) and the
shipped `.py` code (transformers runs its own cached copy): docs/formats.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poelm.app.cli import main
from poelm.core.errors import PoelmError
from poelm.core.files import PARENT_FIELD, read_manifest
from poelm import models
from poelm.core.tokenizer import Tokenizer
from poelm.models.directory import save_model_dir

from util import perturb_

IDS = torch.tensor([[503, 5, 17, 200, 33, 90, 501, 7, 64, 128, 250, 3]])


def logits(directory) -> torch.Tensor:
    with torch.no_grad():
        return models.open(directory).model()(IDS).logits


def hf_logits(directory) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True).eval()
    with torch.no_grad():
        return model(IDS).logits


def one_line_error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("poelm: error: "), err
    return err[0]


@pytest.fixture
def moved(tiny_stage, tmp_path):
    """The tiny base and its stage downloaded into two unrelated folders: the stage's relative parent
    reference ("../base") no longer leads anywhere. Returns (base, stage, the stage's logits before)."""
    base, stage = tiny_stage
    want = logits(stage)
    new_base, new_stage = tmp_path / "models" / "d24-base", tmp_path / "specialists" / "code"
    shutil.copytree(base, new_base)
    shutil.copytree(stage, new_stage)
    return new_base, new_stage, want


def edit_parent_by_hand(stage: Path, value: str) -> None:
    """What a person does in an editor: replace the value's text, every other byte kept."""
    path = stage / "config.json"
    text = path.read_text()
    old = json.dumps(json.loads(text)[PARENT_FIELD])
    assert text.count(old) == 1
    path.write_text(text.replace(old, json.dumps(value)))


def test_a_missing_parent_says_missing_where_it_looked_and_what_to_do(moved, capsys):
    _, stage, _ = moved
    message = one_line_error(capsys, "inspect", stage)
    assert f"{stage / 'config.json'}: parent '../base' is missing (looked for a directory at {stage / '../base'}, " \
           f"{Path('../base').absolute()})" in message
    assert f"poelm specialist relink {stage} --parent DIR" in message


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_editing_the_parent_field_by_hand_loads_in_poelm_and_transformers(moved, how):
    base, stage, want = moved
    edit_parent_by_hand(stage, str(base) if how == "absolute" else os.path.relpath(base, stage))
    assert torch.equal(logits(stage), want)
    assert torch.equal(hf_logits(stage), want)


def test_relink_checks_the_parent_then_changes_one_value(moved, tmp_path, capsys, monkeypatch):
    base, stage, want = moved
    before = (stage / "config.json").read_text()
    assert main(["specialist", "relink", str(stage), "--parent", str(base)]) == 0
    assert f"{stage}: parent ../base -> {base}" in capsys.readouterr().out
    after = (stage / "config.json").read_text()
    assert after == before.replace('"../base"', json.dumps(str(base)))  # nothing else moved
    recorded = read_manifest(stage)["files"]["config.json"]
    assert recorded["bytes"] == len(after.encode())  # the new bytes are recorded: no tolerance needed now
    assert torch.equal(logits(stage), want) and torch.equal(hf_logits(stage), want)

    # Relative: recorded relative to the stage, so base and stage can move on together.
    monkeypatch.chdir(tmp_path)
    assert main(["specialist", "relink", str(stage.relative_to(tmp_path)), "--parent",
                 str(base.relative_to(tmp_path))]) == 0
    assert json.loads((stage / "config.json").read_text())[PARENT_FIELD] == "../../models/d24-base"
    (tmp_path / "elsewhere").mkdir()
    shutil.move(str(tmp_path / "models"), str(tmp_path / "elsewhere" / "models"))
    shutil.move(str(tmp_path / "specialists"), str(tmp_path / "elsewhere" / "specialists"))
    assert torch.equal(logits(tmp_path / "elsewhere" / "specialists" / "code"), want)


def test_relink_refuses_another_parent_a_base_and_a_cycle(moved, tmp_path, capsys):
    base, stage, _ = moved
    other = save_model_dir(perturb_(models.open(base).model(), seed=99, scale=0.01), tmp_path / "other",
                           Tokenizer.load(base))
    before = (stage / "config.json").read_bytes(), (stage / "digests.json").read_bytes()
    message = one_line_error(capsys, "specialist", "relink", stage, "--parent", other)
    assert f"parent {other} has fingerprint xxh3-128:" in message and "this stage was trained on" in message
    message = one_line_error(capsys, "specialist", "relink", base, "--parent", other)
    assert f"{base / 'config.json'}: no {PARENT_FIELD}: {base} is a base, not a stage" in message
    message = one_line_error(capsys, "specialist", "relink", stage, "--parent", stage)
    assert "cycle" in message
    message = one_line_error(capsys, "specialist", "relink", stage, "--parent", tmp_path / "nowhere")
    assert f"{tmp_path / 'nowhere'}: not a directory" in message
    assert ((stage / "config.json").read_bytes(), (stage / "digests.json").read_bytes()) == before  # untouched


def test_relink_onto_its_own_child_is_a_cycle(moved, tmp_path, capsys):
    from poelm.models.specialist import attach, save_specialist

    base, stage, _ = moved
    assert main(["specialist", "relink", str(stage), "--parent", str(base)]) == 0
    child = save_specialist(attach(stage, 1, seed=1)[0], stage, tmp_path / "child", "child")
    capsys.readouterr()
    message = one_line_error(capsys, "specialist", "relink", stage, "--parent", child)
    assert f"--parent {child}: its chain holds {stage} itself; the chain would be a cycle" in message


def test_a_cycle_made_by_hand_says_cycle(moved, capsys):
    base, stage, _ = moved
    edit_parent_by_hand(stage, ".")
    assert "base_model_name_or_path leads back to" in one_line_error(capsys, "inspect", stage)
    assert "the chain is a cycle" in one_line_error(capsys, "inspect", stage)


def flips(path: Path, stage_config: bool) -> list[int]:
    """Byte offsets to flip: the first, the middle and the last; for a stage's config.json also every byte
    of the parent reference's key and of the line after it. Never a byte of the reference's value."""
    data = path.read_bytes()
    offsets = {0, len(data) // 2, len(data) - 1}
    if not stage_config:
        return sorted(offsets)
    key = data.index(b'"base_model_name_or_path"')
    value = data.index(b'"', data.index(b":", key))
    value_end = data.index(b'"', value + 1) + 1
    line_end = data.index(b"\n", value_end)
    offsets |= set(range(key, key + len(b'"base_model_name_or_path"'))) | set(range(value_end, data.index(b"\n", line_end + 1)))
    return sorted(o for o in offsets if not value <= o < value_end)


@pytest.mark.parametrize("which", ["base", "stage"])
def test_any_other_edit_of_any_recorded_file_fails_naming_it_and_the_command(moved, which, capsys):
    """Every file digests.json records, in the base and in the stage, flipped at several bytes (a stage's
    config.json also at every byte of the line after the parent reference, and in the key): the stage
    does not load, and the one line names the file and `poelm digest DIR`. The parent reference moved
    by hand at the same time does not hide it."""
    base, stage, want = moved
    edit_parent_by_hand(stage, str(base))
    directory = {"base": base, "stage": stage}[which]
    names = sorted(read_manifest(directory)["files"])
    assert {"config.json", "poelm_tokenizer.json", "token_bytes.json", "tokenizer_config.json"} <= set(names)
    tried = 0
    for name in names:
        path = directory / name
        good = path.read_bytes()
        for offset in flips(path, which == "stage" and name == "config.json"):
            bad = bytearray(good)
            bad[offset] ^= 0x20 if chr(bad[offset]).isalpha() else 0x01
            path.write_bytes(bytes(bad))
            with pytest.raises(PoelmError) as e:
                models.open(stage).model()
            message = str(e.value)
            assert message.startswith(f"{path}: ") and f"`poelm digest {directory}` records it" in message, message
            assert "\n" not in message
            tried += 1
        path.write_bytes(good)
    assert tried >= 3 * len(names)
    assert torch.equal(logits(stage), want)  # restored: loads again


def test_transformers_refuses_another_edit_of_a_stage_config(moved):
    base, stage, _ = moved
    edit_parent_by_hand(stage, str(base))
    path = stage / "config.json"
    path.write_text(path.read_text().replace('"stage_name": "code"', '"stage_name": "cod"'))
    with pytest.raises(Exception) as e:  # the directory's own copy of PoelmError (remote code)
        hf_logits(stage)
    assert type(e.value).__name__ == "PoelmError"
    assert f"{path}: content does not match digests.json" in str(e.value)
    assert f"`poelm digest {stage}` records it" in str(e.value) and "poelm specialist relink" in str(e.value)


def test_a_key_written_twice_is_not_a_relink(moved, capsys):
    """A second `base_model_name_or_path` (JSON takes the last) is an edit of the file, not of the value."""
    base, stage, _ = moved
    path = stage / "config.json"
    text = path.read_text()
    path.write_text(text.replace('\n  "stage_name"', f'\n  "{PARENT_FIELD}": {json.dumps(str(base))},\n  "stage_name"'))
    assert "content does not match digests.json" in one_line_error(capsys, "inspect", stage)


def test_a_hub_id_parent_that_is_not_here_says_so(moved, tmp_path):
    """The seed card ships its parent as a hub id; offline and not downloaded, the error says where it looked."""
    _, stage, _ = moved
    edit_parent_by_hand(stage, "karpathy/nanochat-d24-poe")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "poelm", "inspect", str(stage)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "parent 'karpathy/nanochat-d24-poe' is missing: no directory at " in r.stderr
    assert "the hub could not provide it" in r.stderr and "poelm specialist relink" in r.stderr
