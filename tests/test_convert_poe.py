"""nanochat-poe (the paper's fork) conversion: tiny checkpoints in the fork's exact on-disk layout, written
by the independent reference (tests/nanochat_poe_ref.py; every tensor random, the ones the fork
zero-initialises too), convert into poelm directories whose logits equal the reference's forward —
bases without and with per-stage heads in every meta layout, a specialist on a base, and a specialist on
a specialist — load in `transformers` with the same logits, pass `poelm inspect`, declare the parent
entries the fork's stages override, and train further; whatever poelm cannot represent is refused."""

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from poelm.app.cli import main
from poelm.core.errors import PoelmError
from poelm.models.convert_nanochat_poe import convert_nanochat_poe, convert_nanochat_poe_stage, fork_stage_layers
from poelm import models

try:
    from tests import nanochat_poe_ref as fork
    from tests import nanochat_ref as ref
except ImportError:
    import nanochat_poe_ref as fork
    import nanochat_ref as ref

SHAPE = dict(vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, sequence_len=512)
T = 200  # beyond the 128-token short window
TOL = 1e-5


def tokens(B=2, seed=5):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def poelm_logits(directory, x):
    with torch.no_grad():
        return models.open(directory).model()(x).logits


def base_checkpoint(tmp_path, *, poe_every=2, per_stage_head=False, version="276c2ac", poe_alpha=0.0,
                    bf16=False, name="base", **shape):
    model = fork.build_fork_base(ref.GPTConfig(**{**SHAPE, **shape}), poe_every=poe_every,
                                 per_stage_head=per_stage_head, seed=3)
    if bf16:
        ref.round_embeddings_(model)  # the file holds bf16 wte / value embeds, as after a CUDA run
    fork.save_fork_base(model, tmp_path / name, 700, poe_mode="flat", poe_every=poe_every, poe_alpha=poe_alpha,
                        version=version, embedding_dtype=torch.bfloat16 if bf16 else torch.float32)
    return model, tmp_path / name


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer_dir):
    """A base (flat, poe_every 3: stages 3 + 1), a stage on it, and a stage on that stage, all converted."""
    tmp = tmp_path_factory.mktemp("fork")
    base, ckpt = base_checkpoint(tmp, poe_every=3, bf16=True)
    g = torch.Generator().manual_seed(11)
    a = fork.build_fork_stage(base, 2, g)
    fork.round_stage_embeddings_(a)
    fork.save_fork_stage(a, tmp / "stage-a", 40, base_tag="d4", embedding_dtype=torch.bfloat16)
    b = fork.build_fork_stage(a, 1, g)
    fork.save_fork_stage(b, tmp / "stage-b", 30, base_tag="d4", parent_stage_tag="stage-a", parent_stage_step=40)
    out_base, _ = convert_nanochat_poe(ckpt, tmp / "poe-base", tokenizer=str(tiny_tokenizer_dir))
    out_a, over_a = convert_nanochat_poe_stage(tmp / "stage-a", out_base, tmp / "poe-a")
    out_b, over_b = convert_nanochat_poe_stage(tmp / "stage-b", out_a, tmp / "poe-b")
    return dict(tmp=tmp, base=base, a=a, b=b, dirs=(out_base, out_a, out_b), overrides=(over_a, over_b))


# ---- bases --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version, poe_every, bf16", [("276c2ac", 2, False), ("40710e1d", 3, True),
                                                       ("8c76679a", 3, False)])
def test_base_without_stage_heads_has_the_forks_logits(tmp_path, tiny_tokenizer_dir, version, poe_every, bf16):
    model, ckpt = base_checkpoint(tmp_path, poe_every=poe_every, version=version, bf16=bf16)
    out, _ = convert_nanochat_poe(ckpt, tmp_path / "poe", tokenizer=str(tiny_tokenizer_dir))
    poe = models.open(out).model()
    c = poe.config
    assert c.poe_stage_layers == fork_stage_layers(4, poe_every) == fork.stage_sizes(4, poe_every)
    assert (c.poe_output, c.poe_backout_stages, c.poe_stage_heads) == ("last", [c.n_stages - 1], False)
    x = tokens()
    with torch.no_grad():
        want = fork.fork_base_logits(model, x)
    assert (poelm_logits(out, x) - want).abs().max().item() <= TOL
    recorded = json.loads((out / "config.json").read_text())["converted_from"]
    assert recorded["format"] == "nanochat-poe" and recorded["poe_every"] == poe_every  # from user_config


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_base_with_stage_heads_has_the_forks_logop(tmp_path, tiny_tokenizer_dir, alpha):
    """The fork's Log-OP is Σ_k log_softmax(head_k) / K^(1-α), not renormalised; poelm's is renormalised:
    equal after log_softmax, and apart by one constant per position."""
    model, ckpt = base_checkpoint(tmp_path, poe_every=2, per_stage_head=True, poe_alpha=alpha)
    out, _ = convert_nanochat_poe(ckpt, tmp_path / "poe", tokenizer=str(tiny_tokenizer_dir))
    c = models.open(out).config
    assert (c.poe_output, c.poe_backout_stages, c.poe_stage_heads, c.poe_alpha) == ("logop", [], True, alpha)
    x = tokens()
    with torch.no_grad():
        score = fork.fork_base_logits(model, x, alpha=alpha)
    got = poelm_logits(out, x)
    assert (got - F.log_softmax(score, dim=-1)).abs().max().item() <= TOL
    gap = score - got
    assert (gap - gap[..., :1]).abs().max().item() <= TOL and gap.abs().max().item() > 1e-3  # not renormalised


def test_hier_converts_as_flat_and_says_so(tmp_path, tiny_tokenizer_dir):
    model = fork.build_fork_base(ref.GPTConfig(**SHAPE), poe_every=2, seed=3)
    fork.save_fork_base(model, tmp_path / "h", 5, poe_mode="hier", poe_every=2)
    out, notes = convert_nanochat_poe(tmp_path / "h", tmp_path / "poe", tokenizer=str(tiny_tokenizer_dir))
    assert models.open(out).config.poe_mode == "flat" and notes and notes[0].startswith("hier")
    with torch.no_grad():
        assert (poelm_logits(out, tokens()) - fork.fork_base_logits(model, tokens())).abs().max().item() <= TOL


# ---- stages -------------------------------------------------------------------------------------


def test_a_stage_on_a_base_and_a_stage_on_a_stage_have_the_forks_logits(converted):
    x = tokens()
    with torch.no_grad():
        want_a, want_b = fork.fork_stage_logits(converted["a"], x), fork.fork_stage_logits(converted["b"], x)
    _, dir_a, dir_b = converted["dirs"]
    assert (poelm_logits(dir_a, x) - want_a).abs().max().item() <= TOL
    assert (poelm_logits(dir_b, x) - want_b).abs().max().item() <= TOL
    a = json.loads((dir_a / "config.json").read_text())
    assert a["stage_layers"] == 2 and a["chat_rows"] == fork.default_chat_token_ids(512)  # rows, not the table
    assert json.loads((dir_b / "config.json").read_text())["chat_rows"] == []  # a chained stage keeps them
    # the fork lets the base lambdas up to the backout layer (4 // 2 = 2) drift: declared, not dropped
    over_a, over_b = converted["overrides"]
    assert over_a == {"resid_lambdas": [0, 1, 2], "x0_lambdas": [0, 1, 2]} == a["parent_overrides"]
    assert over_b["resid_lambdas"] == [0, 1, 2]


def test_the_forks_window_rule_for_the_total_depth_is_reproduced(tmp_path, tiny_tokenizer_dir):
    """SSSL on 3 layers: S, S, L (the last forced L); with 2 more layers the fork recomputes S, S, S, L, L,
    turning the base's last layer S: converted as a declared window override, logits equal."""
    base, ckpt = base_checkpoint(tmp_path, poe_every=3, n_layer=3)
    stage = fork.build_fork_stage(base, 2, torch.Generator().manual_seed(2))
    fork.save_fork_stage(stage, tmp_path / "s", 9, base_tag="d3")
    out_base, _ = convert_nanochat_poe(ckpt, tmp_path / "poe-base", tokenizer=str(tiny_tokenizer_dir))
    out, overrides = convert_nanochat_poe_stage(tmp_path / "s", out_base, tmp_path / "poe-s")
    assert models.open(out_base).config.layer_windows == [128, 128, 512]
    assert models.open(out).config.layer_windows == [128, 128, 128, 512, 512] == stage.window_sizes
    assert overrides["layer_windows"] == [2]
    x = tokens()
    with torch.no_grad():
        assert (poelm_logits(out, x) - fork.fork_stage_logits(stage, x)).abs().max().item() <= TOL


def test_converted_directories_load_in_transformers_with_the_same_logits(converted, tmp_path, tiny_tokenizer_dir):
    x = tokens(B=1)
    torch.save({"x": x}, tmp_path / "x.pt")
    _, heads = base_checkpoint(tmp_path, per_stage_head=True, poe_alpha=0.5, name="heads")
    heads_dir, _ = convert_nanochat_poe(heads, tmp_path / "poe-heads", tokenizer=str(tiny_tokenizer_dir))
    dirs = [str(d) for d in converted["dirs"]] + [str(heads_dir)]
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        x = torch.load("{tmp_path / 'x.pt'}")["x"]
        out = {{}}
        for d in {dirs!r}:
            m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
            with torch.no_grad():
                out[d] = m(x).logits
        torch.save(out, "{tmp_path / 'hf.pt'}")
    """)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    hf = torch.load(tmp_path / "hf.pt")
    for d in dirs:
        assert (hf[d] - poelm_logits(d, x)).abs().max().item() <= TOL, d


def test_inspect_and_check_preservation_report_the_overrides(converted, capsys):
    base, dir_a, dir_b = converted["dirs"]
    assert main(["inspect", str(dir_b)]) == 0
    out = capsys.readouterr().out
    assert out.count("DOES NOT PRESERVE ITS PARENT: overrides resid_lambdas of layers [0, 1, 2]") == 2
    assert "nanochat-poe-stage" in out
    assert main(["check-preservation", str(base), str(dir_a)]) == 1
    out = capsys.readouterr().out
    assert "(CHANGED)" in out and "declares that it does not preserve its parent" in out


def test_a_converted_stage_trains_further(converted, tmp_path):
    from poelm.train.sft import StageTrainArgs, stage_train

    lines = [{"messages": [{"role": "user", "content": f"add {i} and {i + 1}"},
                           {"role": "assistant", "content": f"{2 * i + 1}"}]} for i in range(24)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    _, dir_a, _ = converted["dirs"]
    summary = stage_train(StageTrainArgs(stage=str(dir_a), data=[str(tmp_path / "chat.jsonl")], out=str(tmp_path / "run"),
                                         steps=2, val_conversations=4, seq_len=64, device_batch_size=4, eval_every=2,
                                         seed=0, device="cpu"))
    assert summary["preservation_max_abs_diff"] == 0.0  # its own base path did not move while it trained
    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["parent_overrides"] == converted["overrides"][0]  # still declared, still carried
    before, after = models.open(dir_a).model(), models.open(final).model()
    assert not torch.equal(before.specialist_head.weight, after.specialist_head.weight)
    assert torch.equal(before.resid_lambdas[:4], after.resid_lambdas[:4])


# ---- refusals -----------------------------------------------------------------------------------


def _edit_meta(directory, step, edit):
    path = directory / f"meta_{step:06d}.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _drop_tensor(directory, step, name):
    path = directory / f"model_{step:06d}.pt"
    state = torch.load(path, weights_only=True)
    del state[name]
    torch.save(state, path)


@pytest.mark.parametrize("edit, message", [
    (lambda d: _edit_meta(d, 700, lambda m: m["model_config"].update(intermediate_size=128)),
     r"meta_000700.json: model_config intermediate_size 128: poelm's MLP is 4 x n_embd = 256"),
    (lambda d: _edit_meta(d, 700, lambda m: m["model_config"].update(moe_experts=4)),
     r"meta_000700.json: model_config field 'moe_experts' is not one poelm can reproduce"),
    (lambda d: _drop_tensor(d, 700, "transformer.h.1.mlp.c_fc.weight"),
     r"model_000700.pt: missing tensor 'transformer.h.1.mlp.c_fc.weight'"),
    (lambda d: _edit_meta(d, 700, lambda m: m["user_config"].update(poe_mode="tree")),
     r"user_config poe_mode 'tree'; expected one of"),
])
def test_bases_poelm_cannot_represent_are_refused(tmp_path, tiny_tokenizer_dir, capsys, edit, message):
    _, ckpt = base_checkpoint(tmp_path)
    edit(ckpt)
    code = main(["convert", "nanochat-poe", "--checkpoint", str(ckpt), "--tokenizer", str(tiny_tokenizer_dir),
                 "--out", str(tmp_path / "poe")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("poelm: ")]
    assert code == 2 and len(err) == 1
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "poe").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda d: _drop_tensor(d, 40, "lm_head_stage.weight"), r"model_000040.pt: missing tensor 'lm_head_stage.weight'"),
    (lambda d: _edit_meta(d, 40, lambda m: m["model_config"].update(intermediate_size=96)),
     r"intermediate_size 96: poelm's MLP is 4 x n_embd"),
    (lambda d: _edit_meta(d, 40, lambda m: (m["model_config"].update(frozen_layers=3), m.update(frozen_layers=3))),
     r"frozen_layers 3, but the parent .* has 4 layers"),
    (lambda d: _edit_meta(d, 40, lambda m: (m.update(dual_head=False), m["model_config"].update(dual_head=False))),
     r"dual_head is false"),
    (lambda d: _edit_meta(d, 40, lambda m: m["model_config"].update(rope_scaling=2)),
     r"model_config field 'rope_scaling' is not one poelm can reproduce"),
])
def test_stages_poelm_cannot_represent_are_refused(converted, tmp_path, capsys, edit, message):
    stage = tmp_path / "stage-a"
    shutil.copytree(converted["tmp"] / "stage-a", stage)
    edit(stage)
    code = main(["convert", "nanochat-poe-stage", "--checkpoint", str(stage), "--parent", str(converted["dirs"][0]),
                 "--out", str(tmp_path / "poe")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("poelm: ")]
    assert code == 2 and len(err) == 1
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "poe").exists()


def test_declared_overrides_must_be_exactly_what_differs(converted, tmp_path):
    """The cascade loader holds `parent_overrides` to the delta: a list that names other layers, an
    override tensor without a declaration, or a declaration without its tensor is refused."""
    from safetensors.torch import load_file, save_file

    _, dir_a, _ = converted["dirs"]

    def variant(name, edit_config=None, edit_delta=None):
        d = tmp_path / name
        shutil.copytree(dir_a, d)
        config = json.loads((d / "config.json").read_text())
        config["base_model_name_or_path"] = str(converted["dirs"][0])
        if edit_config:
            edit_config(config)
        (d / "config.json").write_text(json.dumps(config))
        if edit_delta:
            delta = load_file(str(d / "delta.safetensors"))
            edit_delta(delta)
            save_file(delta, str(d / "delta.safetensors"))
        assert main(["digest", str(d)]) == 0  # recorded as a deliberate edit: only the cascade's rules remain
        return d

    ok = variant("ok")
    assert torch.equal(models.open(ok).model().resid_lambdas, models.open(dir_a).model().resid_lambdas)
    cases = [
        (variant("fewer", lambda c: c["parent_overrides"].update(resid_lambdas=[0, 1])),
         r"parent_overrides.resid_lambdas differs from the parent at layers \[0, 1, 2\], .* declares \[0, 1\]"),
        (variant("undeclared", lambda c: c["parent_overrides"].pop("x0_lambdas")),
         r"parent_overrides.x0_lambdas present, but .* does not list x0_lambdas"),
        (variant("no-tensor", edit_delta=lambda t: t.pop("parent_overrides.resid_lambdas")),
         r"parent_overrides.resid_lambdas missing, but .* lists resid_lambdas"),
        (variant("windows", lambda c: c["parent_overrides"].update(layer_windows=[1])),
         r"layer_windows differ from the parent's at layers \[\]"),
        (variant("garbage", lambda c: c.update(parent_overrides={"wte": [0]})),
         r"'parent_overrides' must map some of"),
    ]
    for d, message in cases:
        with pytest.raises(PoelmError, match=message):
            models.open(d).model()


@pytest.mark.parametrize("relation", ["is", "contains", "lies inside"])
def test_convert_never_writes_over_its_checkpoint_or_parent(converted, tmp_path, capsys, relation):
    """--out may not be, contain or lie inside the fork's checkpoint or any directory of --parent's chain."""
    work = tmp_path / "w"
    shutil.copytree(converted["tmp"] / "stage-b", work / "c" / "ckpt")
    base, dir_a, _ = converted["dirs"]
    for protected in (work / "c" / "ckpt", dir_a, base):
        out = {"is": protected, "contains": protected.parent, "lies inside": protected / "out"}[relation]
        before = {p: p.stat().st_mtime_ns for p in protected.rglob("*")}
        code = main(["convert", "nanochat-poe-stage", "--checkpoint", str(work / "c" / "ckpt"), "--parent", str(dir_a),
                     "--out", str(out), "--overwrite"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("poelm: ")]
        assert code == 2 and len(err) == 1 and "never writes over its own inputs" in err[0]
        named = str(protected) if relation != "contains" else str(protected.parent)  # a folder holding inputs
        assert named in err[0], err[0]
        assert {p: p.stat().st_mtime_ns for p in protected.rglob("*")} == before
