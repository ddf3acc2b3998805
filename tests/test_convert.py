"""nanochat conversion: a checkpoint written in nanochat's own format by the independent reference
(tests/nanochat_ref.py) converts into a poelm directory with the same logits; old checkpoints go
through named migrations; bad checkpoints fail with one line naming the file and tensor."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from poelm.models.convert_nanochat import convert_nanochat
from poelm.core.errors import PoelmError
from poelm import models

try:
    from tests import nanochat_ref as ref
except ImportError:
    import nanochat_ref as ref

VOCAB = 512  # the tiny tokenizer's vocabulary
SHAPE = dict(vocab_size=VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, sequence_len=512)
T = 200  # beyond the 128-token short window


def tokens(B=2, seed=5):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def write_checkpoint(tmp_path, config, step=1500, **kw):
    model = ref.build_model(config, seed=3, perturb=True)
    if kw.pop("bf16_embeddings", False):
        ref.round_embeddings_(model)
        kw["embedding_dtype"] = torch.bfloat16
    ckpt = tmp_path / "ckpt"
    ref.save_nanochat_checkpoint(model, ckpt, step, **kw)
    return model, ckpt


def test_full_featured_checkpoint_converts_with_equal_logits(tmp_path, tiny_tokenizer_dir):
    config = ref.GPTConfig(**SHAPE)  # smear, backout, value embeddings, GQA, sliding window: all on
    model, ckpt = write_checkpoint(tmp_path, config, compile_prefix=True)
    out, migrations = convert_nanochat(ckpt, tmp_path / "poe", tokenizer=str(tiny_tokenizer_dir))
    assert migrations == []
    poe = models.open(out).model()
    assert poe.config.layer_windows == [128, 128, 128, 512] and poe.config.value_embed_layers == [1, 3]
    x = tokens()
    with torch.no_grad():
        want, got = model(x), poe(x).logits
    assert (want - got).abs().max().item() < 1e-4
    recorded = json.loads((out / "config.json").read_text())["converted_from"]
    assert recorded["step"] == 1500 and recorded["format"] == "nanochat"


def test_bf16_embeddings_and_latest_step(tmp_path, tiny_tokenizer_dir):
    config = ref.GPTConfig(**SHAPE)
    _, ckpt = write_checkpoint(tmp_path, config, step=10)
    model, _ = write_checkpoint(tmp_path, config, step=20, bf16_embeddings=True)
    out, _ = convert_nanochat(ckpt, tmp_path / "poe", tokenizer=str(tiny_tokenizer_dir))  # latest: 20
    assert json.loads((out / "config.json").read_text())["converted_from"]["step"] == 20
    x = tokens()
    with torch.no_grad():
        assert (model(x) - models.open(out).model()(x).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("off, migration", [
    ("smear", "no_smear"), ("backout", "no_backout"), ("value_embeds", "no_value_embeds"),
    ("lambdas", "no_residual_lambdas"), ("sliding_window", "no_sliding_window"),
])
def test_old_checkpoints_migrate_by_name(tmp_path, tiny_tokenizer_dir, off, migration):
    config = ref.GPTConfig(**SHAPE, **{off: False})
    model, ckpt = write_checkpoint(tmp_path, config)
    out, migrations = convert_nanochat(ckpt, tmp_path / "poe", tokenizer=str(tiny_tokenizer_dir))
    assert [m.split(":")[0] for m in migrations] == [migration]
    x = tokens()
    with torch.no_grad():
        assert (model(x) - models.open(out).model()(x).logits).abs().max().item() < 1e-4


def test_cli_converts_and_reports(tmp_path, tiny_tokenizer_dir):
    config = ref.GPTConfig(**SHAPE, smear=False)
    _, ckpt = write_checkpoint(tmp_path, config)
    r = subprocess.run([sys.executable, "-m", "poelm", "convert", "nanochat", "--checkpoint", str(ckpt),
                        "--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "poe")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "migration no_smear" in r.stdout and (tmp_path / "poe" / "model.safetensors").is_file()


def corrupt(tmp_path, tiny_tokenizer_dir, edit):
    config = ref.GPTConfig(**SHAPE)
    _, ckpt = write_checkpoint(tmp_path, config)
    pt = ckpt / "model_001500.pt"
    meta = ckpt / "meta_001500.json"
    edit(pt, meta)
    return ckpt


@pytest.mark.parametrize("edit, message", [
    (lambda pt, meta: torch.save({**torch.load(pt), "extra.weight": torch.zeros(2)}, pt),
     r"model_001500.pt: unexpected tensor 'extra.weight'"),
    (lambda pt, meta: torch.save({k: v for k, v in torch.load(pt).items() if "h.2.mlp.c_fc" not in k}, pt),
     r"model_001500.pt: missing tensor 'transformer.h.2.mlp.c_fc.weight'"),
    (lambda pt, meta: torch.save({**torch.load(pt), "lm_head.weight": torch.zeros(512, 32)}, pt),
     r"tensor 'lm_head.weight' has shape \[512, 32\], expected \[512, 64\]"),
    (lambda pt, meta: pt.write_bytes(pt.read_bytes()[:1000]), r"model_001500.pt: unreadable checkpoint"),
    (lambda pt, meta: meta.unlink(), r"meta_001500.json: missing"),
    (lambda pt, meta: meta.write_text('{"model_config": {"n_layer": 4, "mystery": 1}}'),
     r"meta_001500.json: model_config field\(s\) poelm cannot reproduce: mystery"),
    (lambda pt, meta: meta.write_text('{"model_config": {"n_layer": 4,'), r"meta_001500.json: not valid JSON"),
])
def test_bad_checkpoints_name_file_and_tensor(tmp_path, tiny_tokenizer_dir, edit, message):
    ckpt = corrupt(tmp_path, tiny_tokenizer_dir, edit)
    with pytest.raises(PoelmError, match=message):
        convert_nanochat(ckpt, tmp_path / "poe", tokenizer=str(tiny_tokenizer_dir))
    assert not (tmp_path / "poe").exists()  # nothing half-written


def test_pickled_objects_are_refused(tmp_path, tiny_tokenizer_dir):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"w": Evil()}, ckpt / "model_000001.pt")
    (ckpt / "meta_000001.json").write_text(json.dumps({"model_config": ref.model_config_dict(ref.GPTConfig(**SHAPE))}))
    with pytest.raises(PoelmError, match=r"model_000001.pt: refused by torch.load\(weights_only=True\)"):
        convert_nanochat(ckpt, tmp_path / "poe", tokenizer=str(tiny_tokenizer_dir))
    assert (tmp_path / "victim").is_dir()


def test_missing_inputs(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(PoelmError, match="not a directory"):
        convert_nanochat(tmp_path / "nope", tmp_path / "poe")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoelmError, match="no model_NNNNNN.pt"):
        convert_nanochat(tmp_path / "empty", tmp_path / "poe")
    _, ckpt = write_checkpoint(tmp_path, ref.GPTConfig(**SHAPE))
    with pytest.raises(PoelmError, match=r"no checkpoint for step 7 \(present: 1500\)"):
        convert_nanochat(ckpt, tmp_path / "poe", step=7)
    with pytest.raises(PoelmError, match="pass --tokenizer"):
        convert_nanochat(ckpt, tmp_path / "poe")


def test_vocab_mismatch_is_refused(tmp_path, tiny_tokenizer_dir):
    _, ckpt = write_checkpoint(tmp_path, ref.GPTConfig(**{**SHAPE, "vocab_size": 300}))
    with pytest.raises(PoelmError, match="tokenizer has 512 tokens but .*vocab_size 300"):
        convert_nanochat(ckpt, tmp_path / "poe", tokenizer=str(tiny_tokenizer_dir))
