"""Storage dtype and memory (issue 27): bfloat16 wherever poelm writes a model, loads that keep the stored
dtype and map the files (the parameters are views of the mapping, no second copy), a bfloat16 stage bit
for bit on its bfloat16 base, digests and fingerprints that hold, `init` and `attach` written as they are
made, tensor files poelm parses itself (corrupted, short, misaligned), and the model card's shapes on the
meta device."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from poelm import models
from poelm.app.cli import main
from poelm.core.cascade import expected_delta, load_safetensors
from poelm.core.config import PoEConfig
from poelm.core.errors import PoelmError
from poelm.core.files import read_manifest
from poelm.core.model import PoEGPT, to_disk
from poelm.core.tensorfile import (TensorWriter, fingerprint_file, fingerprint_tensors, map_tensors, read_header,
                                   stream_tensors)
from poelm.models.directory import record_digests, save_model_dir
from poelm.models.specialist import (attach, attach_directory, check_preservation, describe_chain, save_specialist,
                                     specialist_config, specialist_parameter_names)

SHAPE = ["--depth", "3", "--n-embd", "64", "--n-head", "2", "--n-kv-head", "1", "--seq-len", "64",
         "--poe-stage-layers", "2,1"]


def init(tok_dir, out: Path, dtype: str, seed: int = 3) -> Path:
    assert main(["init", "--tokenizer", str(tok_dir), *SHAPE, "--seed", str(seed), "--dtype", dtype,
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def bases(tiny_tokenizer_dir, tmp_path_factory):
    """(float32, bfloat16) bases from `poelm init` with one seed, moved off their init (exported, so the
    bfloat16 one is a perturbed float32 model stored in bfloat16)."""
    from util import perturb_

    root = tmp_path_factory.mktemp("dtype")
    f32 = init(tiny_tokenizer_dir, root / "init32", "float32")
    chain = models.open(f32)
    model = perturb_(chain.model(), seed=4, scale=0.1)
    tok = chain.tokenizer()
    return (save_model_dir(model, root / "base32", tok), save_model_dir(model, root / "base16", tok, dtype="bfloat16"))


def header_dtypes(path: Path) -> set[str]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return {v["dtype"] for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}


def plain(n=2, length=24, seed=0):
    x = torch.randint(0, 503, (n, length), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = 503
    return x


# ---- bfloat16 as a storage format ------------------------------------------------------------------

def test_init_writes_init_weights_bit_for_bit_in_either_dtype(tiny_tokenizer_dir, tmp_path):
    """`init` makes one tensor at a time and writes it as it goes; the file holds exactly what
    `init_weights(seed)` gives (bfloat16: those values rounded), the fingerprint recorded is the tensors',
    and safetensors' own reader agrees."""
    f32, b16 = init(tiny_tokenizer_dir, tmp_path / "a", "float32"), init(tiny_tokenizer_dir, tmp_path / "b", "bfloat16")
    model = PoEGPT(models.open(f32).config)
    model.init_weights(3)
    want = to_disk(model.state_dict())
    for directory, dtype in ((f32, torch.float32), (b16, torch.bfloat16)):
        got = load_file(str(directory / "model.safetensors"))  # the library's own reader
        assert set(got) == set(want) and all(torch.equal(got[k], want[k].to(dtype)) for k in want)
        assert json.loads((directory / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
        assert read_manifest(directory)["fingerprint"] == fingerprint_tensors(got)
    assert header_dtypes(b16 / "model.safetensors") == {"BF16"}
    assert (b16 / "model.safetensors").stat().st_size < 0.55 * (f32 / "model.safetensors").stat().st_size


def test_a_bfloat16_directory_round_trips_bit_exactly(bases, tmp_path):
    base16 = bases[1]
    chain = models.open(base16)
    model = chain.model()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the stored dtype is kept
    assert main(["export", str(base16), "--out", str(tmp_path / "again")]) == 0  # default: the model's dtype
    again = tmp_path / "again" / "model.safetensors"
    assert again.read_bytes() == (base16 / "model.safetensors").read_bytes()
    assert read_manifest(tmp_path / "again")["fingerprint"] == chain.fingerprint == fingerprint_file(again)
    wider = models.open(base16).model(dtype=torch.float32)
    assert all(torch.equal(a.float(), b) for a, b in zip(model.parameters(), wider.parameters()))


def test_bfloat16_loads_through_transformers(bases, tmp_path):
    from transformers import AutoModelForCausalLM

    base16 = bases[1]
    hf = AutoModelForCausalLM.from_pretrained(str(base16), trust_remote_code=True)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    hf32 = AutoModelForCausalLM.from_pretrained(str(base16), trust_remote_code=True, dtype=torch.float32)
    assert {p.dtype for p in hf32.parameters()} == {torch.float32}
    x = plain()
    with torch.no_grad():
        assert torch.equal(hf(x).logits, models.open(base16).model()(x).logits)
        out = hf.generate(x[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=503)  # the cache in bf16
    assert out.shape == (1, 10)
    hf.save_pretrained(str(tmp_path / "saved"))  # what transformers writes back: bfloat16, poelm reads it
    again = models.open(tmp_path / "saved")
    assert again.dtype == torch.bfloat16 and again.fingerprint == models.open(base16).fingerprint


def test_a_bf16_stage_on_a_bf16_base_keeps_its_base_path_bit_for_bit(bases, tmp_path, capsys):
    """Attached in the parent's dtype by default; trained in float32 (master weights) and cut against the
    parent in the parent's dtype: the delta is bfloat16, the base path equals the base bit for bit."""
    base16 = bases[1]
    assert main(["specialist", "attach", str(base16), "--layers", "1", "--name", "s",
                 "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "config.json").read_text())["dtype"] == "bfloat16"
    assert header_dtypes(tmp_path / "s" / "delta.safetensors") == {"BF16", "I64"}
    model = models.open(tmp_path / "s").model(dtype=torch.float32)  # float32 master weights
    with torch.no_grad():
        for name in specialist_parameter_names(model):
            model.get_parameter(name).add_(0.05 * torch.randn(model.get_parameter(name).shape))
    out = save_specialist(model, base16, tmp_path / "trained", "t")
    assert header_dtypes(out / "delta.safetensors") == {"BF16", "I64"}
    for stage in (tmp_path / "s", out):
        assert check_preservation(base16, stage)["bit_identical"]
        assert main(["check-preservation", str(base16), str(stage)]) == 0
        x = plain()
        with torch.no_grad():
            got = models.open(stage).model()(x, exit_stage=1).logits
            assert torch.equal(got, models.open(base16).model()(x).logits)
    recorded = read_manifest(out)["fingerprint"]
    assert record_digests(out)["fingerprint"] == recorded  # `poelm digest` streams and agrees
    assert json.loads((out / "config.json").read_text())["parent_fingerprint"] == read_manifest(base16)["fingerprint"]


@pytest.mark.parametrize("which,dtype", [(0, None), (1, None), (0, "bfloat16")])
def test_attach_without_a_model_writes_what_attach_then_save_writes(bases, tmp_path, which, dtype):
    """`attach_directory` (the command) makes one block at a time and reads only the rows it warm-starts;
    its delta is byte for byte the in-memory `attach` + `save_specialist`'s."""
    parent = bases[which]
    a, info = attach_directory(parent, tmp_path / "a", 2, "x", seed=5, dtype=dtype)
    model, info2 = attach(parent, 2, seed=5)
    b = save_specialist(model, parent, tmp_path / "b", "x", dtype=dtype)
    assert (a / "delta.safetensors").read_bytes() == (b / "delta.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert read_manifest(a)["fingerprint"] == read_manifest(b)["fingerprint"]
    assert info == info2 and len(info["chat_rows"]) == 8


def test_mixed_chains_load_in_the_wider_dtype(bases, tmp_path):
    stage, _ = attach_directory(bases[1], tmp_path / "s32", 1, "s", dtype="float32")
    chain = models.open(stage)
    assert chain.dtype == torch.float32 and {p.dtype for p in chain.model().parameters()} == {torch.float32}
    assert check_preservation(bases[1], stage)["bit_identical"]  # compared in the base's dtype


def test_convert_stores_the_dtype_asked(tmp_path, tiny_tokenizer_dir):
    """`convert nanochat --dtype bfloat16`: the checkpoint's tensors (read through a mapping where the
    format allows) stored in bfloat16, equal to the float32 conversion rounded."""
    from test_convert import SHAPE as NANOCHAT, ref, write_checkpoint

    _, ckpt = write_checkpoint(tmp_path, ref.GPTConfig(**NANOCHAT))
    for dtype in ("float32", "bfloat16"):
        assert main(["convert", "nanochat", "--checkpoint", str(ckpt), "--tokenizer", str(tiny_tokenizer_dir),
                     "--dtype", dtype, "--out", str(tmp_path / dtype)]) == 0
    a, b = (load_file(str(tmp_path / dtype / "model.safetensors")) for dtype in ("float32", "bfloat16"))
    assert all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)
    assert json.loads((tmp_path / "bfloat16" / "config.json").read_text())["dtype"] == "bfloat16"


# ---- loads map the files ---------------------------------------------------------------------------

def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges of this process that map `path` (/proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and Path(parts[5]).resolve() == path.resolve():
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            out.append((lo, hi))
    return out


def inside(t: torch.Tensor, ranges) -> bool:
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return any(lo <= start and end <= hi for lo, hi in ranges)


@pytest.mark.parametrize("which", [0, 1])
def test_loaded_parameters_are_views_of_the_mapped_file(bases, tmp_path, which):
    """No second copy: every parameter of a loaded base lies in the file's one (private) mapping; for a
    stage, the base's tensors in the base's file, the stage's in its delta, and only the table with its
    changed rows (and nothing else) is a copy."""
    base = Path(shutil.copytree(bases[which], tmp_path / "base"))  # a file no other test has mapped
    model = models.open(base).model()
    ranges = mapped_ranges(base / "model.safetensors")
    assert len(ranges) == 1 and all(inside(p, ranges) for p in model.parameters())
    stage, _ = attach_directory(base, tmp_path / "stage", 1, "s")
    model = models.open(stage).model()
    own = {f"transformer.h.3.{k}" for k in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight",
                                             "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}
    own.add("specialist_head.weight")
    copies = {"transformer.wte.weight", "resid_lambdas", "x0_lambdas"}  # rows written in; lambdas concatenated
    base_ranges, delta_ranges = mapped_ranges(base / "model.safetensors"), mapped_ranges(stage / "delta.safetensors")
    for name, p in model.named_parameters():
        if name in copies:
            assert not inside(p, base_ranges + delta_ranges), name
        else:
            assert inside(p, delta_ranges if name in own else base_ranges), name
    assert len(base_ranges) == 1  # the base mapped once: the stage's chain did not map it again


def test_a_served_base_is_mapped_once_and_specialists_share_it(bases, tmp_path):
    from poelm.serve.models import load_served

    base = Path(shutil.copytree(bases[1], tmp_path / "base"))
    stages = [attach_directory(base, tmp_path / f"s{i}", 1, f"s{i}", seed=i)[0] for i in range(3)]
    served = load_served([base] + stages)
    ranges = mapped_ranges(base / "model.safetensors")
    assert len(ranges) == 1
    base_params = dict(served["base"].model.named_parameters())
    for i in range(3):
        for name, p in served[f"s{i}"].model.named_parameters():
            if name.startswith("transformer.h.0.") or name in ("lm_head.weight", "transformer.wte.weight"):
                assert p.data_ptr() == base_params[name].data_ptr() and inside(p, ranges), name


def test_a_bf16_base_and_specialist_serve(bases, tmp_path):
    from serving import client, greedy, running

    stage, _ = attach_directory(bases[1], tmp_path / "s", 1, "s", seed=2)
    with running([bases[1], stage], max_batch=4) as (url, _):
        for model in ("base16", "s"):
            r = client(url).completions.create(model=model, prompt="def f(x):", max_tokens=5, temperature=0)
            assert r.choices[0].text is not None and r.usage.completion_tokens >= 1
    assert 1 <= len(greedy(stage, [503, 5, 6], 3)) <= 3


def test_checking_a_chain_copies_nothing_and_inspect_reads_headers(bases, tmp_path, capsys):
    stage, _ = attach_directory(bases[1], tmp_path / "s", 1, "s")
    chain = models.open(stage)
    info = describe_chain(chain)
    assert chain._tensors is None  # neither the table with its rows nor a head fold was made
    assert info["links"][1]["changed_embedding_rows"] == 8 and info["links"][0]["dtype"] == "bfloat16"
    assert main(["inspect", str(stage)]) == 0 and "(bfloat16)" in capsys.readouterr().out


def test_load_dtype_flags(bases, capsys):
    assert main(["generate", str(bases[1]), "--prompt", "def", "--max-new-tokens", "3", "--dtype", "float32"]) == 0
    assert main(["generate", str(bases[1]), "--prompt", "def", "--max-new-tokens", "3"]) == 0


# ---- training on mapped, bfloat16 weights -----------------------------------------------------------

def test_specialist_train_on_a_bf16_chain_exports_bf16(bases, tmp_path):
    from poelm.train.sft import stage_train
    from test_sft import args

    lines = [{"messages": [{"role": "user", "content": f"add {i}"}, {"role": "assistant", "content": f"x + {i}"}]}
             for i in range(24)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(l) + "\n" for l in lines))
    stage, _ = attach_directory(bases[1], tmp_path / "s", 1, "s")
    stage_train(args(stage, data, tmp_path / "run", steps=3, eval_every=3))
    final = tmp_path / "run" / "final"
    assert header_dtypes(final / "delta.safetensors") == {"BF16", "I64"}
    assert check_preservation(bases[1], final)["bit_identical"]
    before, after = load_file(str(stage / "delta.safetensors")), load_file(str(final / "delta.safetensors"))
    assert not torch.equal(before["lm_head_stage.weight"], after["lm_head_stage.weight"])  # it trained


def test_pretrain_from_a_bf16_model_keeps_float32_masters_and_stores_bf16(bases, tmp_path, corpus_dir):
    from poelm.train.pretrain import PretrainArgs, pretrain

    pretrain(PretrainArgs(data=[str(corpus_dir)], out=str(tmp_path / "run"), init=str(bases[1]), steps=2,
                          device_batch_size=2, eval_every=2, eval_tokens=128, seq_len=32, sample_tokens=0,
                          val_fraction=0.1, device="cpu"))
    final = tmp_path / "run" / "final"
    assert header_dtypes(final / "model.safetensors") == {"BF16"}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert not torch.equal(load_file(str(final / "model.safetensors"))["lm_head.weight"],
                           load_file(str(bases[1] / "model.safetensors"))["lm_head.weight"])
    models.open(bases[1])  # training wrote private pages of the mapping, never the file: its digest holds


# ---- tensor files: written as a stream, parsed by poelm ---------------------------------------------

def test_what_poelm_writes_the_library_reads(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "a": torch.ones(3, dtype=torch.int64),
               "c": torch.zeros(0, 4), "d": torch.randn(5)}
    plan = [(k, v.dtype, tuple(v.shape)) for k, v in sorted(tensors.items())]
    entry, fp = stream_tensors(tmp_path / "t.safetensors", plan, tensors.__getitem__, {"who": "poelm"}, "parent")
    path = tmp_path / "t.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"who": "poelm"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    assert fp == fingerprint_tensors(tensors, "parent") == fingerprint_file(path, "parent")
    assert entry["bytes"] == path.stat().st_size
    mapped = load_safetensors(path, verify=False)
    assert all(torch.equal(mapped[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="name order"):
        stream_tensors(tmp_path / "u", [("z", torch.float32, (1,)), ("a", torch.float32, (1,))], tensors.get)
    with TensorWriter(tmp_path / "w", [("a", torch.float32, (2,))]) as w, pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(3))


def test_the_fingerprint_is_its_definition_in_any_order_and_the_old_one_is_read(tmp_path):
    """xxh3-128 of the parent's fingerprint, then by name each tensor's `name|dtype|shape|` and the xxh3-128
    digest of its bytes (docs/formats.md) — computed by hand here; the same for a file written in another
    order, and the one-pass digest of the file equal to its file digest. The blake2b-128 scheme an older
    poelm wrote is one blake2b over the same fields with the bytes themselves, in name order."""
    import hashlib

    import xxhash

    from poelm.core.files import file_digest
    from poelm.core.tensorfile import digest_and_fingerprint

    tensors = {"b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "a": torch.ones(3, dtype=torch.int64),
               "c": torch.zeros(0, 4), "d": torch.randn(5, generator=torch.Generator().manual_seed(0))}
    top, old = xxhash.xxh3_128(b"xxh3-128:p"), hashlib.blake2b(b"blake2b-128:p", digest_size=16)
    for name in sorted(tensors):
        t = tensors[name]
        fields, data = f"{name}|{t.dtype}|{list(t.shape)}|".encode(), t.contiguous().view(torch.uint8).numpy().tobytes()
        top.update(fields + xxhash.xxh3_128(data).digest())
        old.update(fields + data)
    assert fingerprint_tensors(tensors, "xxh3-128:p") == "xxh3-128:" + top.hexdigest()
    assert fingerprint_tensors(tensors, "blake2b-128:p", scheme="blake2b-128") == "blake2b-128:" + old.hexdigest()
    path = tmp_path / "reversed.safetensors"
    with TensorWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in sorted(tensors.items(), reverse=True)]) as w:
        for name in sorted(tensors, reverse=True):
            w.write(name, tensors[name])
    entry = w.close()
    assert list(read_header(path).tensors) == ["d", "c", "b", "a"]  # the file's own order
    assert digest_and_fingerprint(path, "xxh3-128:p") == (entry, fingerprint_tensors(tensors, "xxh3-128:p"))
    assert entry == file_digest(path)
    assert fingerprint_file(path, "blake2b-128:p", "blake2b-128") == "blake2b-128:" + old.hexdigest()
    assert fingerprint_tensors({**tensors, "d": tensors["d"] + 1}, "xxh3-128:p") != fingerprint_tensors(tensors,
                                                                                                          "xxh3-128:p")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_failed_write_is_raised_and_nothing_hangs(tmp_path):
    """The bytes go to disk in a background thread: a write that fails (here the disk is full: /dev/full)
    is raised by the next write or by close, and the writer's thread ends."""
    import threading

    plan = [(k, torch.float32, (1 << 16,)) for k in "abc"]
    with pytest.raises(OSError) as failed:
        with TensorWriter("/dev/full", plan) as w:
            for name, _, shape in plan:
                w.write(name, torch.zeros(shape))
            w.close()
    assert failed.value.errno == 28  # ENOSPC
    assert not any(t.name.startswith("poelm-write") for t in threading.enumerate())


def raw_file(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize("header,data,message", [
    (b"", b"", "not a JSON object"),
    (b"[1, 2]", b"", "not a JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
     b'"data_offsets": [4, 8]}}', b"\0" * 8, "appears twice"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, r"4 bytes for shape \[2\]"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "a gap or an overlap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "a gap or an overlap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 6, "truncated or extended"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated or extended"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "byte range"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "expected exactly dtype, shape and data_offsets"),
    ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "which poelm does not store"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
])
def test_damaged_headers_are_one_line_naming_the_file(tmp_path, header, data, message):
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(PoelmError, match=message) as e:
        load_safetensors(path, verify=False)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("raw,message", [(b"", "shorter than the 8-byte header length"),
                                         (b"\x05\0\0", "shorter than the 8-byte header length"),
                                         (struct.pack("<Q", 1 << 40) + b"{}", "a header of"),
                                         (struct.pack("<Q", 100) + b"{}", "a header of")])
def test_short_files_are_refused_by_their_size(tmp_path, raw, message):
    path = tmp_path / "short.safetensors"
    path.write_bytes(raw)
    with pytest.raises(PoelmError, match=message):
        read_header(path)


def test_a_misaligned_tensor_is_copied_with_its_value(tmp_path):
    """A header of odd length puts the data at an offset no float32 view can start at: that tensor is
    copied (its values right), an aligned one in the same file stays a view."""
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    text = json.dumps(header).encode()
    text += b" " * ((-len(text) - 8) % 8)  # the data section starts 8-aligned ...
    b = struct.pack("<2f", 1.5, -2.0)
    path = raw_file(tmp_path / "m.safetensors", text, b"\x07" + b)  # ... so b starts at an odd offset
    mapped = map_tensors(path, read_header(path))
    assert mapped["a"].tolist() == [7] and mapped["b"].tolist() == [1.5, -2.0]
    assert load_file(str(path))["b"].tolist() == [1.5, -2.0]
    ranges = mapped_ranges(path)
    assert inside(mapped["a"], ranges) and not inside(mapped["b"], ranges)


def test_a_truncated_tensor_file_is_named_by_every_reader(bases, tmp_path, capsys):
    base = Path(shutil.copytree(bases[1], tmp_path / "base"))
    path = base / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PoelmError, match="model.safetensors"):
        models.open(base)
    (base / "digests.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(PoelmError, match="truncated or extended"):
        models.open(base)


# ---- the model card's shapes ------------------------------------------------------------------------

def test_the_cards_shapes_give_the_cards_counts():
    """The released code stage (/work/shared/seed: base d24, width 1536, 12 heads, vocabulary 32768,
    stages 6,6,6,6; a 4-layer stage with its own head): its delta as the fork ships it — the new blocks,
    its head, the whole embedding table and the lambdas at full length — is 28 tensors, 213,909,560
    parameters; trained, 163,577,912 (the card counts the lambda vectors whole). The base's count follows
    from the same shapes, term by term."""
    base = PoEConfig(vocab_size=32768, n_layer=24, n_head=12, n_kv_head=12, n_embd=1536, sequence_len=2048,
                     poe_stage_layers=[6, 6, 6, 6])
    stage = specialist_config(base, 4)
    with torch.device("meta"):
        b, s = PoEGPT(base), PoEGPT(stage)
    V, d, L = 32768, 1536, 24
    ve = len(base.value_embed_layers)
    assert base.value_embed_layers == list(range(1, 24, 2))  # the card: 12 value embeds at layers 1, 3, ..., 23
    assert b.num_params() == 2 * V * d + L * 12 * d * d + ve * (V * d + 12 * 12) + 2 * L + 24 + 1 + 1
    assert b.num_params() == 1_384_122_122
    delta = expected_delta(base, stage)  # poelm's delta: blocks, its own lambdas, its head
    blocks = {k: v for k, v in delta.items() if k.startswith("transformer.h.")}
    fork = len(blocks) + 4, sum(math.prod(v) for v in blocks.values()) + V * d + V * d + 2 * 28
    assert fork == (28, 213_909_560)
    assert sum(math.prod(v) for v in blocks.values()) + V * d + 2 * 28 == 163_577_912
    assert s.num_params() - b.num_params() == sum(math.prod(v) for v in delta.values()) == 163_577_864
    # in bfloat16 the delta poelm ships for it (8 chat rows with their ids) is half its float32 bytes
    ours = sum(math.prod(v) for v in delta.values()) + 8 * d
    assert ours * 2 + 8 * 8 < 0.51 * (ours * 4 + 8 * 8)


def test_building_a_model_on_the_meta_device_imports_no_compiler():
    """Loads build the model on the meta device. Drawing nn.Embedding's default normal there (or any
    arithmetic on a meta tensor) imports torch._dynamo and sympy: 1.6 s of every command's start on this
    project's machine. Building every config variant's model there imports neither."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from poelm.core.config import PoEConfig\n"
            "from poelm.core.model import PoEGPT\n"
            "from poelm.models.specialist import specialist_config\n"
            "base = PoEConfig(vocab_size=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=32, sequence_len=16,\n"
            "                 poe_stage_layers=[2, 2], poe_stage_heads=True)\n"
            "assert base.smear and base.backout and base.value_embed_layers\n"
            "with torch.device('meta'):\n"
            "    PoEGPT(base); PoEGPT(specialist_config(specialist_config(base, 1), 1))\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_file_written_behind_reads_back_exactly(tmp_path, monkeypatch):
    """Past WRITE_BEHIND_AFTER (1 GiB; 0 here) tensors of 1 MiB or more are written behind
    (files.write_behind: writeback started, the range before waited for and dropped from the page cache):
    the file reads back bit for bit, with the digest and fingerprint the writer returned."""
    from poelm.core import tensorfile
    from poelm.core.files import file_digest
    from poelm.core.tensorfile import digest_and_fingerprint

    monkeypatch.setattr(tensorfile, "WRITE_BEHIND_AFTER", 0)
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(1 << 18, generator=g), "b": torch.randn(3, generator=g),
               "c": torch.randn(1 << 19, generator=g).to(torch.bfloat16), "d": torch.randn(1 << 18, generator=g)}
    path = tmp_path / "behind.safetensors"
    plan = [(k, v.dtype, tuple(v.shape)) for k, v in sorted(tensors.items())]
    entry, fp = stream_tensors(path, plan, tensors.__getitem__)
    assert entry == file_digest(path) and digest_and_fingerprint(path) == (entry, fp)
    got = load_safetensors(path, verify=False)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
