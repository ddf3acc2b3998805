"""Trust: every file poelm wrote is verified when read, and no command writes over its own inputs.

- Digests: a flipped bit or a truncation in any tensor file of a chain (root, middle, leaf) stops
  `from_pretrained`, `poelm inspect`, `generate`, `stage train` and `export` with one line naming the
  file, and nothing is written (issue 9 #2). Property-based (hypothesis): any bit flip or truncation
  of any file of a model directory is named by `poelm inspect` in one line.
- Outputs: for every command that writes, an output that is, contains or lies inside one of its
  inputs is refused before anything is touched, and the inputs are byte-for-byte unchanged (#1).
- Atomic replacement survives a failure in the middle of writing and in the middle of the swap.
- Strict loads: a tensor of another dtype than config.json declares is refused (#8).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from poelm.app.cli import main
from poelm.core.config import PoEConfig
from poelm.core.errors import PoelmError
from poelm.core.model import PoEGPT
from poelm import models
from poelm.core.tokenizer import Tokenizer
from poelm.models.directory import save_model_dir
from poelm.models.specialist import attach, save_specialist

from util import perturb_

QUESTION = {"messages": [{"role": "user", "content": "add two numbers"},
                         {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"}]}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_tokenizer):
    """root (4 layers) -> mid (+1: h.4) -> leaf (+1: h.5), each link moved off its init."""
    root_dir = tmp_path_factory.mktemp("chain")
    model = PoEGPT(PoEConfig(vocab_size=512, n_layer=4, n_head=2, n_kv_head=1, n_embd=64, sequence_len=128,
                             poe_stage_layers=[2, 2]))
    model.init_weights(0)
    root = save_model_dir(perturb_(model, seed=1, scale=0.1), root_dir / "root", tiny_tokenizer)
    mid = save_specialist(attach(root, 1, seed=1)[0], root, root_dir / "mid", "mid")
    leaf = save_specialist(attach(mid, 1, seed=2)[0], mid, root_dir / "leaf", "leaf")
    data = root_dir / "chat.jsonl"
    data.write_text("".join(json.dumps(QUESTION) + "\n" for _ in range(12)))
    return {"root": root, "mid": mid, "leaf": leaf, "data": data}


def tensor_offset(path: Path, name: str) -> int:
    """Byte offset of tensor `name`'s first element in a safetensors file (8-byte header size, JSON)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


def flip_exponent(path: Path, name: str) -> None:
    """Flip the top exponent bit of the first float32 of `name` (byte 3, bit 6, little-endian): the
    weight becomes ~1e38 and the logits NaN — the audit's silent corruption."""
    raw = bytearray(path.read_bytes())
    raw[tensor_offset(path, name) + 3] ^= 0x40
    path.write_bytes(bytes(raw))


def snapshot(*paths: Path) -> dict[str, str]:
    """Every file under `paths` with its sha256: to show that inputs are untouched."""
    out = {}
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_line_error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.startswith("poelm: ")]
    assert code == 2 and len(err) == 1 and err[0].startswith("poelm: error: "), err
    return err[0]


# ---- digests ------------------------------------------------------------------------------------

TARGETS = {"root": ("model.safetensors", "transformer.h.1.mlp.c_fc.weight"),
           "mid": ("delta.safetensors", "transformer.h.4.mlp.c_fc.weight"),
           "leaf": ("delta.safetensors", "transformer.h.5.mlp.c_fc.weight")}


@pytest.fixture(scope="module")
def corrupted(chain, tmp_path_factory):
    """For each link, a copy of the whole chain with one exponent bit flipped in that link's tensors."""
    out = {}
    for link, (file, tensor) in TARGETS.items():
        root = tmp_path_factory.mktemp(f"flip-{link}")
        for name in ("root", "mid", "leaf"):
            shutil.copytree(chain[name], root / name)
        flip_exponent(root / link / file, tensor)
        out[link] = (root, root / link / file)
    return out


@pytest.mark.parametrize("link", ["root", "mid", "leaf"])
def test_a_flipped_bit_anywhere_in_a_chain_is_named_by_every_entry_point(link, corrupted, chain, tmp_path, capsys):
    """Issue 9 #2 and Done-when 2: from_pretrained, inspect, generate, stage train and export."""
    root, bad_file = corrupted[link]
    leaf = root / "leaf"
    before = snapshot(root)
    for argv in (["inspect", leaf], ["generate", leaf, "--prompt", "def add(", "--max-new-tokens", "4"],
                 ["export", leaf, "--out", tmp_path / "merged"],
                 ["specialist", "train", leaf, "--data", chain["data"], "--out", tmp_path / "run", "--steps", "2",
                  "--val-conversations", "2", "--seq-len", "64", "--device-batch-size", "2", "--device", "cpu"]):
        message = one_line_error(capsys, *argv)
        assert f"{bad_file}: content does not match digests.json" in message, (argv, message)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "run" / "best").exists()
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception) as e:  # the directory's own copy of errors.PoelmError (remote code)
        AutoModelForCausalLM.from_pretrained(str(leaf), trust_remote_code=True)
    assert type(e.value).__name__ == "PoelmError"
    assert f"{bad_file}: content does not match digests.json" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(root) == before


def test_a_flipped_bit_in_a_base_is_named_by_from_pretrained(chain, tmp_path):
    """A base directory loads through transformers' own loader: its files are checked first."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(chain["root"], tmp_path / "root")
    flip_exponent(tmp_path / "root" / "model.safetensors", TARGETS["root"][1])
    with pytest.raises(Exception, match="model.safetensors: content does not match digests.json") as e:
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "root"), trust_remote_code=True)
    assert type(e.value).__name__ == "PoelmError"  # the directory's own copy (remote code)
    m = AutoModelForCausalLM.from_pretrained(str(chain["root"]), trust_remote_code=True)  # the intact one loads
    assert torch.equal(m.poe.lm_head.weight, models.open(chain["root"]).model().lm_head.weight)


def test_every_written_directory_records_its_files(chain, tiny_tokenizer_dir, tmp_path, capsys):
    """Model, stage, merged export and tokenizer directories list every data file; the recorded
    fingerprint of a stage is the one its child records as parent_fingerprint."""
    from poelm.core.files import listed_files, read_manifest

    text = tmp_path / "text.txt"  # some text (a .json file named explicitly is read as records)
    text.write_bytes((tiny_tokenizer_dir / "poelm_tokenizer.json").read_bytes())
    assert main(["tokenizer", "train", "--input", str(text), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    assert main(["export", str(chain["leaf"]), "--out", str(tmp_path / "merged")]) == 0
    for d in (chain["root"], chain["mid"], chain["leaf"], tmp_path / "merged", tmp_path / "tok"):
        manifest = read_manifest(d)
        assert manifest is not None and sorted(manifest["files"]) == listed_files(d)
        assert {"config.json", "poelm_tokenizer.json"} & set(manifest["files"]), d
    leaf_config = json.loads((chain["leaf"] / "config.json").read_text())
    assert leaf_config["parent_fingerprint"] == read_manifest(chain["mid"])["fingerprint"]
    assert "model.safetensors" in read_manifest(tmp_path / "merged")["files"]
    assert main(["inspect", str(chain["leaf"])]) == 0
    assert capsys.readouterr().out.count("files match digests.json") == 3


def test_recorded_fingerprints_equal_computed_ones(chain):
    """The verified load reads fingerprints from digests.json; they equal the ones computed from the
    tensors (the path a directory without digests takes)."""
    from poelm.core.cascade import assemble, fingerprint_tensors, resolve_chain

    chain_links = resolve_chain(chain["leaf"])
    _, _, recorded = assemble(chain_links)
    for link in chain_links:
        link.manifest = None
    _, _, computed = assemble(chain_links)
    assert recorded == computed
    assert recorded[0] == fingerprint_tensors(models.open(chain["root"]).model().state_dict())


def test_legacy_directory_loads_with_a_warning_and_digest_records_it(chain, tmp_path, capsys):
    shutil.copytree(chain["root"], tmp_path / "old")
    (tmp_path / "old" / "digests.json").unlink()
    with pytest.warns(UserWarning, match="no digests.json"):
        old = models.open(tmp_path / "old").model()
    assert torch.equal(old.lm_head.weight, models.open(chain["root"]).model().lm_head.weight)
    assert main(["digest", str(tmp_path / "old")]) == 0
    assert "recorded" in capsys.readouterr().out
    assert (tmp_path / "old" / "digests.json").read_text() == (chain["root"] / "digests.json").read_text()


def test_a_deliberate_edit_is_refused_until_recorded(chain, tmp_path, capsys):
    shutil.copytree(chain["root"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "poe_output": "logop"}, indent=2))
    assert "config.json: content does not match" in one_line_error(capsys, "inspect", tmp_path / "m")
    assert main(["digest", str(tmp_path / "m")]) == 0
    assert models.open(tmp_path / "m").config.poe_output == "logop"


def test_transformers_save_pretrained_records_digests_and_writes_a_standalone_model(chain, tmp_path):
    """A stage chain loaded through transformers and saved again is one standalone directory (no stage
    fields), with digests, whose logits equal the chain's."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(chain["leaf"]), trust_remote_code=True)
    m.save_pretrained(str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "base_model_name_or_path" not in config and "parent_fingerprint" not in config
    assert "model.safetensors" in json.loads((tmp_path / "saved" / "digests.json").read_text())["files"]
    x = torch.tensor([[503, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(models.open(tmp_path / "saved").model()(x).logits,
                                   models.open(chain["leaf"]).model()(x).logits)


def test_a_dtype_other_than_declared_is_refused(chain, tmp_path, capsys):
    """Issue 9 #8: same names and shapes, float64 instead of the declared float32 (no digests, so the
    strict load is what answers; before, the tensor was silently cast)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(chain["root"], tmp_path / "m")
    (tmp_path / "m" / "digests.json").unlink(missing_ok=True)
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].double()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.warns(UserWarning, match="no digests.json"), pytest.raises(PoelmError) as e:
        models.open(tmp_path / "m").model()
    assert "'lm_head.weight' has dtype float64, expected float32" in str(e.value)


FILES = ("config.json", "generation_config.json", "poelm_tokenizer.json", "token_bytes.json",
         "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def chain_copy(chain, root: Path, digests: bool = True) -> Path:
    """A copy of the chain's three directories under `root` (without digests.json if not `digests`)."""
    for link in ("root", "mid", "leaf"):
        shutil.copytree(chain[link], root / link)
        if not digests:
            (root / link / "digests.json").unlink()
    return root


@contextlib.contextmanager
def damaged(root: Path, which: str, name: str, truncate: bool, where: float, bit: int):
    """File `name` of link `which` under `root` cut at `where` or with bit `bit` flipped there, for the
    block; then its bytes put back, so the next example starts from the intact copy again.
    Yields (the damaged file's path, the bytes cut off)."""
    name = name if name != "tensors" else ("model.safetensors" if which == "root" else "delta.safetensors")
    path = root / which / name
    intact = path.read_bytes()
    raw = bytearray(intact)
    at = int(where * len(raw))
    cut = bytes(raw[at:]) if truncate else b""
    if truncate:
        raw = raw[:at]
    else:
        raw[at] ^= 1 << bit
    path.write_bytes(bytes(raw))
    try:
        yield path, cut
    finally:
        path.write_bytes(intact)


@pytest.fixture(scope="module")
def chain_to_damage(chain, tmp_path_factory):
    """One copy of the chain that the property tests damage, one file at a time, and repair."""
    return chain_copy(chain, tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def legacy_chain_to_damage(chain, tmp_path_factory):
    """The same without digests.json (directories written before poelm recorded them)."""
    return chain_copy(chain, tmp_path_factory.mktemp("legacy"), digests=False)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(which=st.sampled_from(["root", "leaf"]), name=st.sampled_from(FILES + ("tensors",)),
       truncate=st.booleans(), where=st.floats(0.0, 1.0, exclude_max=True), bit=st.integers(0, 7))
def test_any_damaged_file_is_one_line_naming_it(chain_to_damage, capsys, which, name, truncate, where, bit):
    """Property: truncating any file of a model or stage directory anywhere, or flipping any bit of
    it, makes `poelm inspect` (which reads the whole chain and checks every recorded file) and, for
    the files it reads, `poelm export` fail with one line naming that file; export writes nothing.
    (Each example damages one file of an intact copy of the chain, which is repaired after it.)"""
    root = chain_to_damage
    with damaged(root, which, name, truncate, where, bit) as (path, _):
        assert str(path) in one_line_error(capsys, "inspect", root / "leaf")
        reads = ("config.json", "poelm_tokenizer.json", "model.safetensors", "delta.safetensors") + \
            (("token_bytes.json",) if which == "leaf" else ())  # what export reads (the leaf's tokenizer only)
        if path.name in reads:
            assert str(path) in one_line_error(capsys, "export", root / "leaf", "--out", root / "merged")
        assert not (root / "merged").exists()


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(which=st.sampled_from(["root", "leaf"]),
       name=st.sampled_from(("config.json", "poelm_tokenizer.json", "token_bytes.json", "tensors")),
       truncate=st.booleans(), where=st.floats(0.0, 1.0, exclude_max=True), bit=st.integers(0, 7))
def test_readers_without_digests_fail_cleanly(legacy_chain_to_damage, capsys, which, name, truncate, where, bit):
    """Property, for directories without digests (written before poelm recorded them): the readers
    themselves never crash on a damaged file. `poelm inspect` either succeeds (a flip that leaves a
    valid file: a changed weight, a changed digit) or fails with one line naming the damaged file —
    never an internal error; a truncated file it reads is always such an error. (Each example damages
    one file of an intact copy of the chain, which is repaired after it.)"""
    root = legacy_chain_to_damage
    with damaged(root, which, name, truncate, where, bit) as (_, cut):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no digests.json": what these directories are
            code = main(["inspect", str(root / "leaf")])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("poelm: ")]
    assert code in (0, 2) and not any("internal error" in l for l in err), err
    if code == 2:  # the file, or (a parent's changed weights) its directory through the fingerprint
        assert len(err) == 1 and err[0].startswith("poelm: error: ") and str(root / which) in err[0], err
    read = name != "token_bytes.json" or which == "leaf"  # inspect reads the leaf's tokenizer only
    if truncate and cut.strip() and read:  # only trailing whitespace cut off can leave a valid file
        assert code == 2


def test_damaged_digests_json_is_named(chain, tmp_path, capsys):
    shutil.copytree(chain["root"], tmp_path / "m")
    manifest = tmp_path / "m" / "digests.json"
    manifest.write_text(manifest.read_text()[:40])
    assert f"{manifest}: not valid JSON" in one_line_error(capsys, "inspect", tmp_path / "m")
    manifest.write_text(json.dumps({"format": "poelm-digests", "format_version": 1, "algorithm": "md5", "files": {}}))
    assert f"{manifest}: expected a JSON object" in one_line_error(capsys, "inspect", tmp_path / "m")


def test_a_checkpoint_file_is_verified_on_resume(tmp_path, tiny_tokenizer_dir, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text((f"the model {i} of the stage. " * 40 + "\n") * 8)
    argv = ["pretrain", "--tokenizer", str(tiny_tokenizer_dir), "--depth", "2", "--n-embd", "64", "--n-head", "2",
            "--seq-len", "32", "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "4",
            "--device-batch-size", "2", "--eval-every", "2", "--eval-tokens", "64", "--sample-tokens", "0",
            "--device", "cpu"]
    assert main(argv) == 0
    capsys.readouterr()
    opt = tmp_path / "run" / "checkpoints" / "000004" / "optimizer_rank0.safetensors"
    raw = bytearray(opt.read_bytes())
    raw[-1] ^= 1
    opt.write_bytes(bytes(raw))
    assert f"{opt}: content does not match digests.json" in one_line_error(capsys, *argv, "--resume")


# ---- outputs never overlap inputs -----------------------------------------------------------------

def overlap_cases(chain, tok_dir, tmp):
    """(command argv, the input it must not touch) for every command that writes, per relation."""
    root, mid, leaf, data = chain["root"], chain["mid"], chain["leaf"], chain["data"]
    text = tmp / "corpus"
    text.mkdir(exist_ok=True)
    for i in range(2):
        (text / f"{i}.txt").write_text((f"the model {i} of the stage. " * 40 + "\n") * 30)

    pretrain = ["pretrain", "--steps", "1", "--device-batch-size", "1", "--seq-len", "16", "--device", "cpu"]
    sft = ["--steps", "1", "--val-conversations", "2", "--seq-len", "32", "--device-batch-size", "1", "--device", "cpu"]
    cases = []
    for out, relation in ((None, "is"), ("up", "contains"), ("down", "lies inside")):
        def at(path: Path) -> Path:
            return {"is": path, "contains": path.parent, "lies inside": path / "out"}[relation] if out is not None \
                else path
        cases += [
            (["specialist", "attach", leaf, "--layers", "1", "--name", "x", "--overwrite", "--out", at(leaf)], leaf),
            (["specialist", "attach", leaf, "--layers", "1", "--name", "x", "--overwrite", "--out", at(root)], root),
            (["export", leaf, "--overwrite", "--out", at(mid)], mid),
            (["init", "--tokenizer", tok_dir, "--depth", "1", "--overwrite", "--out", at(tok_dir)], tok_dir),
            (["tokenizer", "train", "--input", text, "--vocab-size", "300", "--overwrite", "--out", at(text)], text),
            ([*pretrain, "--init", leaf, "--data", text, "--out", at(mid)], mid),
            ([*pretrain, "--init", root, "--data", text, "--out", at(text)], text),
            ([*pretrain, "--tokenizer", tok_dir, "--depth", "1", "--data", text, "--out", at(tok_dir)], tok_dir),
            (["specialist", "train", leaf, "--data", data, "--out", at(root), *sft], root),
            (["specialist", "train", leaf, "--data", f"{data}:2", "--out", at(data), *sft], data),
            (["data", "tokenize", "--tokenizer", tok_dir, "--input", text, "--overwrite", "--out", at(text)], text),
            (["data", "tokenize", "--tokenizer", tok_dir, "--input", text, "--overwrite", "--out", at(tok_dir)],
             tok_dir),
        ]
        if relation == "is":  # a file cannot contain anything; the others need a directory input
            cases.append((["calibrate", root, "--data", root / "adaptive.json"], root / "adaptive.json"))
    cases.append((["calibrate", root, "--data", root], root))  # the data holds adaptive.json
    return cases


def test_no_command_writes_over_its_inputs(chain, tiny_tokenizer_dir, tmp_path, capsys):
    """Issue 9 #1 and Done-when 3: refused before anything is touched, for every writing command and
    each relation (is / contains / lies inside), with or without --overwrite; inputs byte-identical.
    Each input sits alone in its own folder, so "contains" names exactly that input."""
    work = tmp_path / "work"
    root = save_model_dir(models.open(chain["root"]).model(), work / "r" / "root", Tokenizer.load(chain["root"]))
    mid = save_specialist(attach(root, 1, seed=1)[0], root, work / "m" / "mid", "mid")
    leaf = save_specialist(attach(mid, 1, seed=2)[0], mid, work / "l" / "leaf", "leaf")
    (work / "d").mkdir()
    shutil.copy(chain["data"], work / "d" / "chat.jsonl")
    shutil.copytree(tiny_tokenizer_dir, work / "t" / "tok")
    (root / "adaptive.json").write_text(json.dumps({"bounds": [0.0, 1.0]}))
    moved = {"root": root, "mid": mid, "leaf": leaf, "data": work / "d" / "chat.jsonl"}
    (work / "c").mkdir()
    cases = overlap_cases(moved, work / "t" / "tok", work / "c")
    assert len(cases) >= 30
    before = snapshot(work)
    for argv, protected in cases:
        message = one_line_error(capsys, *argv)
        assert "never writes over its own inputs" in message and str(protected) in message, (argv, message)
        assert snapshot(work) == before, argv  # nothing written, nothing removed, anywhere


@pytest.mark.parametrize("relation", ["is", "contains", "lies inside"])
def test_convert_never_writes_over_its_checkpoint_or_tokenizer(tmp_path, tiny_tokenizer_dir, capsys, relation):
    import nanochat_ref as ref

    ckpt = tmp_path / "c" / "ckpt"
    ref.save_nanochat_checkpoint(ref.build_model(ref.GPTConfig(vocab_size=512, n_layer=2, n_head=2, n_kv_head=1,
                                                               n_embd=64, sequence_len=64), seed=1), ckpt, 10)
    tok = tmp_path / "t" / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    before = snapshot(tmp_path)
    for protected in (ckpt, tok):
        out = {"is": protected, "contains": protected.parent, "lies inside": protected / "out"}[relation]
        message = one_line_error(capsys, "convert", "nanochat", "--checkpoint", ckpt, "--tokenizer", tok,
                                 "--out", out, "--overwrite")
        assert "never writes over its own inputs" in message and str(protected) in message
        assert snapshot(tmp_path) == before
    assert main(["convert", "nanochat", "--checkpoint", str(ckpt), "--tokenizer", str(tok),
                 "--out", str(tmp_path / "converted")]) == 0  # elsewhere it converts
    assert (tmp_path / "converted" / "digests.json").is_file()


def test_the_audited_data_loss_is_refused(chain, tmp_path, capsys):
    """Issue 9 #1 as found: `stage attach BASE ... --out BASE --overwrite` used to leave BASE holding
    only delta.safetensors."""
    shutil.copytree(chain["root"], tmp_path / "base")
    before = snapshot(tmp_path / "base")
    message = one_line_error(capsys, "specialist", "attach", tmp_path / "base", "--layers", "1", "--name", "x",
                             "--out", tmp_path / "base", "--overwrite")
    assert "the output is the parent" in message
    assert snapshot(tmp_path / "base") == before
    with pytest.raises(PoelmError, match="never writes over its own inputs"):  # the library refuses it too
        save_specialist(attach(tmp_path / "base", 1)[0], tmp_path / "base", tmp_path / "base", "x", overwrite=True)
    assert snapshot(tmp_path / "base") == before


def test_symlinks_do_not_hide_an_overlap(chain, tmp_path, capsys):
    shutil.copytree(chain["root"], tmp_path / "base")
    (tmp_path / "alias").symlink_to(tmp_path / "base")
    message = one_line_error(capsys, "export", tmp_path / "base", "--out", tmp_path / "alias", "--overwrite")
    assert "the output is the model" in message


def test_the_demo_refuses_to_write_into_what_it_reads(capsys):
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    assert "standard library" in one_line_error(capsys, "demo", "--out", stdlib)


# ---- atomic replacement -----------------------------------------------------------------------------

def test_a_failure_mid_write_leaves_the_old_directory(tmp_path):
    from poelm.common.atomic import AtomicDir

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with AtomicDir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "old"


def test_a_failure_mid_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    """Where the atomic exchange is not available, the old directory is moved aside and the new one
    renamed in; if that rename fails, the old one is moved back."""
    import os

    from poelm.common import atomic as outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    real, calls = os.replace, []

    def failing(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder's rename into place
            raise OSError("injected")
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        with outputs.AtomicDir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_the_exchange_replaces_in_one_step(tmp_path):
    from poelm.common import atomic as outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with outputs.AtomicDir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if outputs._exchange(a, b):  # Linux: both names always exist
        assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_every_head_keeps_its_file_name(chain, tiny_tokenizer, tmp_path):
    """In memory the additive heads are `stage_heads`, `specialist_head` and `ancestors_head`; the files
    keep `lm_head_stages.*`, `lm_head_stage`, `lm_head_fold` (the format), through poelm and transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from poelm.models.specialist import export_merged

    base = PoEGPT(PoEConfig(vocab_size=512, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, sequence_len=64,
                            poe_stage_layers=[1, 1], poe_stage_heads=True))
    base.init_weights(0)
    perturb_(base, seed=3, scale=0.1)
    base_dir = save_model_dir(base, tmp_path / "heads", tiny_tokenizer)
    merged = export_merged(chain["leaf"], tmp_path / "merged")
    x = torch.tensor([[503, 7, 8, 9, 10, 11]])
    for directory, names in ((base_dir, {"lm_head_stages.0.weight", "lm_head_stages.1.weight"}),
                             (merged, {"lm_head_stage.weight", "lm_head_fold.weight"})):
        on_disk = set(load_file(str(directory / "model.safetensors")))
        assert names <= on_disk and not any(k.startswith(("stage_heads", "specialist_head", "ancestors_head"))
                                            for k in on_disk)
        poelm_model = models.open(directory).model()
        hf = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True)
        with torch.no_grad():
            want = poelm_model(x, output="logop").logits
            assert torch.equal(hf.poe(x, output="logop").logits, want)
        hf.save_pretrained(str(tmp_path / f"resaved-{directory.name}"))
        assert names <= set(load_file(str(tmp_path / f"resaved-{directory.name}" / "model.safetensors")))
    assert torch.equal(models.open(merged).model().specialist_head.weight,
                       models.open(chain["leaf"]).model().specialist_head.weight)
