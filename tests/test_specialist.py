"""Specialist stages: attach, delta, cascade loader, chains, siblings, preservation, bad input."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from poelm.app.cli import main
from poelm.infer.compose import Composition
from poelm.core.config import PoEConfig
from poelm.core.errors import PoelmError
from poelm.core.model import PoEGPT
from poelm import models
from poelm.models.directory import save_model_dir
from poelm.models.specialist import attach, check_preservation, save_specialist, specialist_parameter_names

from util import perturb_

VOCAB = 512


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer):
    model = PoEGPT(PoEConfig(vocab_size=VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, sequence_len=256,
                             poe_stage_layers=[2, 2]))
    model.init_weights(0)
    return save_model_dir(perturb_(model, seed=2, scale=0.1), tmp_path_factory.mktemp("b") / "base", tiny_tokenizer)


def plain_ids(n=2, length=80, seed=0):
    """Inputs without chat tokens: ordinary BPE tokens after a BOS."""
    x = torch.randint(0, VOCAB - 9, (n, length), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = VOCAB - 9
    return x


@torch.no_grad()
def perturb_stage_(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    for name in specialist_parameter_names(model):
        p = model.get_parameter(name)
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    first = model.config.n_layer - model.config.poe_stage_layers[-1]
    model.resid_lambdas[first:] += 0.1
    model.x0_lambdas[first:] += 0.1
    return model


def stage_dir(base_dir, tmp_path, name="code", layers=2, perturb=True, parent=None):
    parent = parent or base_dir
    model, _ = attach(parent, layers, seed=1)
    if perturb:
        perturb_stage_(model)
    return save_specialist(model, parent, tmp_path / name, name), model


def test_attach_is_bitwise_the_parent_and_base_path_survives_training(base_dir):
    base = models.open(base_dir).model()
    model, info = attach(base_dir, 2, seed=1)
    c = model.config
    assert c.n_layer == 6 and c.poe_stage_layers == [2, 2, 2] and c.n_base_stages == 2
    assert c.layer_windows[:4] == base.config.layer_windows  # no base window recomputed
    assert c.value_embed_layers == base.config.value_embed_layers and c.backout_layer == base.config.backout_layer
    assert all(model.transformer.h[i].attn.ve_gate is None for i in (4, 5))
    assert info["chat_rows"] == list(range(VOCAB - 8, VOCAB))
    x = plain_ids()
    with torch.no_grad():
        want = base(x).logits
        assert torch.equal(model(x).logits, want)  # right after attaching: the parent, bit for bit
        perturb_stage_(model)
        assert not torch.equal(model(x).logits, want)
        assert torch.equal(model(x, exit_stage=1).logits, want)  # the base path, bit for bit


def test_delta_holds_exactly_what_changed(base_dir, tmp_path):
    out, model = stage_dir(base_dir, tmp_path)
    delta = load_file(str(out / "delta.safetensors"))
    names = set(delta)
    blocks = {n for n in names if n.startswith("transformer.h.")}
    assert {int(n.split(".")[2]) for n in blocks} == {4, 5} and len(blocks) == 12
    assert names - blocks == {"resid_lambdas", "x0_lambdas", "lm_head_stage.weight", "wte_rows.ids", "wte_rows.values"}
    trainable = sum(model.get_parameter(n).numel() for n in specialist_parameter_names(model)) + 2 * 2
    rows = delta["wte_rows.values"].numel()
    assert sum(t.numel() for t in delta.values()) == trainable + rows + len(delta["wte_rows.ids"])
    config = json.loads((out / "config.json").read_text())
    assert config["stage_layers"] == 2 and config["stage_name"] == "code" and config["n_layer"] == 6
    assert config["parent_fingerprint"].startswith("xxh3-128:")
    assert not (out / "model.safetensors").exists()
    x = plain_ids()
    with torch.no_grad():
        assert torch.equal(models.open(out).model()(x).logits, model(x).logits)


def build_chain(base_dir, tmp_path):
    """base -> a -> b -> c, each stage perturbed; returns c's directory and its in-memory model."""
    a_dir, a_mem = stage_dir(base_dir, tmp_path, "a")
    b_mem, _ = attach(a_dir, 1, seed=3)
    perturb_stage_(b_mem, seed=9)
    b_dir = save_specialist(b_mem, a_dir, tmp_path / "b", "b")
    c_mem, _ = attach(b_dir, 1, seed=4)
    perturb_stage_(c_mem, seed=11)
    c_dir = save_specialist(c_mem, b_dir, tmp_path / "c", "c")
    return c_dir, c_mem


def test_chain_folding_equals_step_by_step(base_dir, tmp_path):
    c_dir, c_mem = build_chain(base_dir, tmp_path)
    loaded = models.open(c_dir).model()
    assert loaded.config.n_layer == 8 and loaded.config.head_fold
    x = plain_ids()
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, c_mem(x).logits, atol=1e-6)
        assert torch.equal(loaded(x, exit_stage=1).logits, models.open(base_dir).model()(x).logits)
    assert json.loads((c_dir / "config.json").read_text())["chat_rows"] == []  # rows done once, by a


def test_frozen_trunk_equals_autograd_trunk(base_dir):
    model, _ = attach(base_dir, 2, seed=1)
    perturb_stage_(model)
    x = plain_ids(length=40)
    y = x.roll(-1, 1)
    grads = []
    for frozen in (0, 4):
        model.zero_grad(set_to_none=True)
        out = model(x, targets=y, frozen_layers=frozen)
        out.loss.backward()
        grads.append({n: model.get_parameter(n).grad.clone() for n in specialist_parameter_names(model)})
        if frozen:
            assert model.transformer.h[0].attn.c_q.weight.grad is None  # the trunk built no graph
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-7), n


def test_siblings_compose_over_one_trunk_pass(base_dir, tmp_path):
    a, a_mem = stage_dir(base_dir, tmp_path, "a")
    b, _ = stage_dir(base_dir, tmp_path, "b", layers=1)
    x = plain_ids(length=30)
    one = Composition([a]).log_probs(x)
    assert torch.allclose(one, torch.log_softmax(a_mem(x).logits, -1), atol=1e-5)
    both = Composition([a, b], weights=[1.0, 0.5]).log_probs(x)
    with torch.no_grad():
        la, lb = (torch.log_softmax(models.open(d).model()(x).logits, -1) for d in (a, b))
    assert torch.allclose(both, torch.log_softmax(la + 0.5 * lb, -1), atol=1e-5)
    c_dir = save_specialist(attach(a, 1)[0], a, tmp_path / "nephew", "n")
    with pytest.raises(PoelmError, match="not a sibling"):
        Composition([a, c_dir])


def test_check_preservation_cli(base_dir, tmp_path, capsys):
    out, _ = stage_dir(base_dir, tmp_path)
    assert main(["check-preservation", str(base_dir), str(out)]) == 0
    assert "max |Δlogit| = 0 (bit-identical)" in capsys.readouterr().out
    changed = tmp_path / "changed"
    shutil.copytree(base_dir, changed)
    w = load_file(str(changed / "model.safetensors"))
    w["transformer.h.1.mlp.c_fc.weight"][3, 5] += 0.01
    save_file(w, str(changed / "model.safetensors"), metadata={"format": "pt"})
    assert main(["check-preservation", str(changed), str(out)]) == 2  # the edit is caught by its digest
    assert "model.safetensors: content does not match digests.json" in capsys.readouterr().err
    assert main(["digest", str(changed)]) == 0  # a deliberate edit: record it, then compare
    capsys.readouterr()
    assert main(["check-preservation", str(changed), str(out)]) == 1
    assert "CHANGED" in capsys.readouterr().out
    assert check_preservation(base_dir, out)["bit_identical"]


def test_inspect_and_export(base_dir, tmp_path, capsys):
    out, model = stage_dir(base_dir, tmp_path)
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    stage = info["links"][1]
    assert [l["kind"] for l in info["links"]] == ["base", "stage"]
    assert stage["files_verified"] == len(json.loads((out / "digests.json").read_text())["files"]) > 5
    assert stage["tensor_params"] == stage["delta_params_expected"]
    assert main(["export", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = models.open(tmp_path / "merged").model()
    x = plain_ids()
    with torch.no_grad():
        assert torch.equal(merged(x).logits, model(x).logits)


def run(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_chain_and_quick_start_through_transformers(base_dir, trained_like_model_dir, seed_vocab_tokenizer, tmp_path):
    """Through plain transformers, in one fresh process (the two parts each in a namespace of their own,
    sharing nothing but the interpreter):
    - a three-link chain base -> a -> b -> c loads and gives the in-memory chain's logits;
    - done-when: base -> stage (perturbed), the card's quick start verbatim == a plain greedy loop (bf16,
      cached); and in float32 the cached loop equals the uncached greedy choice at every step."""
    from test_hf import QUICK_START, plain_greedy, uncached_greedy_along

    c_dir, c_mem = build_chain(base_dir, tmp_path)
    x = plain_ids()
    torch.save({"x": x}, tmp_path / "x.pt")
    chain = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained("{c_dir}", trust_remote_code=True)
        with torch.no_grad():
            torch.save(m(torch.load("{tmp_path / 'x.pt'}")["x"]).logits, "{tmp_path / 'hf.pt'}")
    """)
    model, _ = attach(trained_like_model_dir, 2, seed=1)
    perturb_stage_(model)
    out = save_specialist(model, trained_like_model_dir, tmp_path / "code", "code")
    quick = QUICK_START.format(model_id=out) + "import json\nprint('IDS', json.dumps(out[0, len(ids):].tolist()))\n"
    stdout = run("exec(%r, {})\nexec(%r, {})\n" % (chain, quick))

    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "hf.pt"), c_mem(x).logits, atol=1e-5)

    hf_ids = json.loads([l for l in stdout.splitlines() if l.startswith("IDS ")][-1][4:])
    tok = seed_vocab_tokenizer
    prompt = [32759, 32760] + tok.encode("Write a Python function that returns the sum of a list.") + [32761, 32762]
    eos = {tok.token_id("<|assistant_end|>"), tok.bos_id}
    bf16 = models.open(out).model(dtype=torch.bfloat16)
    assert hf_ids == plain_greedy(bf16, prompt, 160, 1.15, eos, cached=True)
    fp32 = models.open(out).model()
    cached = plain_greedy(fp32, prompt, 40, 1.15, eos, cached=True)
    assert uncached_greedy_along(fp32, prompt, cached, 40, 1.15, eos) == cached


# ------------------------------------------------------------------------------------ bad input
def one_line_error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("poelm: error: "), err
    return err[0]


def test_bad_stage_directories(base_dir, tmp_path, capsys):
    """Each damaged file is named in one line: first by its digest; then, with the edit's digest
    re-recorded (a deliberate edit), by the check that reads its content."""
    from poelm.core.files import update_manifest

    out, _ = stage_dir(base_dir, tmp_path)
    delta = out / "delta.safetensors"
    good = delta.read_bytes()

    def edited(name):  # the digest of a deliberate edit, recorded as `poelm digest` would
        update_manifest(out, [name])

    delta.write_bytes(good[: len(good) // 3])  # truncated
    assert "delta.safetensors: content does not match digests.json" in one_line_error(capsys, "inspect", str(out))
    edited("delta.safetensors")
    assert "delta.safetensors: unreadable safetensors" in one_line_error(capsys, "inspect", str(out))
    delta.write_bytes(good)

    tensors = load_file(str(delta))
    bad = dict(tensors, **{"lm_head_stage.weight": torch.zeros(VOCAB, 7)})
    save_file(bad, str(delta))
    edited("delta.safetensors")
    assert "'lm_head_stage.weight' has shape [512, 7], expected [512, 64]" in one_line_error(capsys, "inspect", str(out))
    bad = dict(tensors, **{"transformer.h.9.mlp.c_fc.weight": torch.zeros(2)})
    save_file(bad, str(delta))
    edited("delta.safetensors")
    assert "unexpected tensor 'transformer.h.9.mlp.c_fc.weight'" in one_line_error(capsys, "inspect", str(out))
    bad = dict(tensors, **{"lm_head_stage.weight": tensors["lm_head_stage.weight"].double()})
    save_file(bad, str(delta))
    edited("delta.safetensors")
    assert "'lm_head_stage.weight' has dtype float64, expected float32" in one_line_error(capsys, "inspect", str(out))
    delta.write_bytes(good)
    edited("delta.safetensors")

    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    assert "config.json: content does not match digests.json" in one_line_error(capsys, "inspect", str(out))
    edited("config.json")
    message = one_line_error(capsys, "inspect", str(out))
    assert "parent" in message and "is missing (looked for a directory at " + str(tmp_path / "gone") in message
    assert "poelm specialist relink" in message

    other = tmp_path / "other-base"  # a swapped parent: same shape, other weights
    m = perturb_(models.open(base_dir).model(), seed=99, scale=0.01)
    from poelm.core.tokenizer import Tokenizer
    save_model_dir(m, other, Tokenizer.load(base_dir))
    (out / "config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    edited("config.json")
    assert "fingerprint" in one_line_error(capsys, "inspect", str(out))

    (out / "config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(out)}))
    edited("config.json")
    assert "cycle" in one_line_error(capsys, "inspect", str(out))

    (out / "config.json").write_text(json.dumps(config))
    edited("config.json")
    tok = json.loads((out / "poelm_tokenizer.json").read_text())
    tok["mergeable_ranks"][300], tok["mergeable_ranks"][301] = tok["mergeable_ranks"][301], tok["mergeable_ranks"][300]
    tok["mergeable_ranks"][300][1], tok["mergeable_ranks"][301][1] = 300, 301
    (out / "poelm_tokenizer.json").write_text(json.dumps(tok))
    assert "poelm_tokenizer.json: content does not match" in one_line_error(capsys, "inspect", str(out))
    edited("poelm_tokenizer.json")
    assert "tokenizer differs from its parent's" in one_line_error(capsys, "inspect", str(out))

    (out / "config.json").unlink()
    assert "config.json: missing" in one_line_error(capsys, "inspect", str(out))

    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hi")
    assert "config.json: missing" in one_line_error(capsys, "specialist", "attach", str(tmp_path / "not-a-model"),
                                                    "--layers", "2", "--name", "x", "--out", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("train_rows", [False, True])
def test_training_a_frozen_stage_keeps_the_base_path(base_dir, train_rows):
    from poelm.train.optim import build_optimizer
    from poelm.models.specialist import freeze_for_specialist

    base = models.open(base_dir).model()
    model, info = attach(base_dir, 2, seed=1)
    partial = freeze_for_specialist(model, info["chat_rows"] if train_rows else None)
    optimizer = build_optimizer(model, no_decay=set(partial))
    assert all(g["weight_decay"] == 0 for g in optimizer.param_groups if set(g["param_names"]) & set(partial))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        x = plain_ids(length=40, seed=step)
        x[:, 5] = VOCAB - 8  # a chat token, so its row gets a gradient
        # Chat rows sit under the trunk: training them needs the backward through it (frozen weights).
        model(x, targets=x.roll(-1, 1), frozen_layers=0 if train_rows else 4).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed >= set(specialist_parameter_names(model))
    assert ("transformer.wte.weight" in changed) == train_rows
    assert torch.equal(model.resid_lambdas[:4], before["resid_lambdas"][:4])
    wte = model.transformer.wte.weight
    assert torch.equal(wte[: VOCAB - 8], before["transformer.wte.weight"][: VOCAB - 8])
    with torch.no_grad():
        x = plain_ids()
        assert torch.equal(model(x, exit_stage=1).logits, base(x).logits)
