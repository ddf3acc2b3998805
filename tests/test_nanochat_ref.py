"""Self-checks of the nanochat reference (tests/nanochat_ref.py), before anything is compared to it.

Each test pins one clause of docs/model.md §1 with a property the clause implies (causality,
window reach, GQA = duplicated MHA, relative rotary, neutral values of old variants, closed form at
init) or checks the file format. Tiny configs, CPU, float32, seeded generators.
"""

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

try:  # tests/ is not a package today; keep working if it becomes one
    from tests import nanochat_ref as ref
except ImportError:
    import nanochat_ref as ref

# vocab 300 pads to 320; head_dim 16; GQA with 2 query heads per kv head.
TINY = dict(vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
CFG = ref.GPTConfig(sequence_len=256, **TINY)  # windows [128, 128, 128, 256]
WIN = ref.GPTConfig(sequence_len=512, **TINY)  # windows [128, 128, 128, 512]; run with T = 200 > 128
T_WIN = 200
FEATURES = ("smear", "backout", "value_embeds", "lambdas", "sliding_window")


def tokens(config, T, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (B, T), generator=g)


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)


def changed_rows(a, b, tol=1e-6):
    """Positions t (of batch row 0) where two (B, T, ...) outputs differ."""
    diff = (a - b).abs().flatten(2).amax(-1)[0]
    return set(torch.nonzero(diff > tol).flatten().tolist())


# ---------------------------------------------------------------- config, windows, layout


def test_short_window_expression():
    # -(-L // 4 // 128) * 128 == ceil(ceil(L / 4) / 128) * 128
    assert [ref.short_window(L) for L in (128, 256, 512, 1000, 1024, 2048, 4096)] == [128, 128, 128, 256, 256, 512, 1024]
    for L in range(1, 5000, 37):
        assert ref.short_window(L) == math.ceil(math.ceil(L / 4) / 128) * 128


def test_window_sizes():
    assert ref.compute_window_sizes(CFG) == [128, 128, 128, 256]
    assert ref.compute_window_sizes(WIN) == [128, 128, 128, 512]
    assert ref.compute_window_sizes(ref.GPTConfig()) == [512] * 3 + [2048] + [512] * 3 + [2048] + [512] * 3 + [2048]
    # the pattern is tiled and the last layer is forced to L
    assert ref.compute_window_sizes(ref.GPTConfig(sequence_len=512, n_layer=3, window_pattern="S", **{k: v for k, v in TINY.items() if k != "n_layer"})) == [128, 128, 512]
    assert ref.compute_window_sizes(ref.GPTConfig(sequence_len=512, n_layer=5, window_pattern="SL", **{k: v for k, v in TINY.items() if k != "n_layer"})) == [128, 512, 128, 512, 512]
    assert ref.compute_window_sizes(ref.GPTConfig(sequence_len=512, sliding_window=False, **TINY)) == [512] * 4


def test_ve_layers():
    assert [i for i in range(4) if ref.has_ve(i, 4)] == [1, 3]
    assert [i for i in range(3) if ref.has_ve(i, 3)] == [0, 2]
    model = ref.GPT(CFG)
    assert [b.attn.ve_gate is not None for b in model.transformer.h] == [False, True, False, True]
    assert sorted(model.value_embeds.keys()) == ["1", "3"]


def test_padded_vocab():
    assert [ref.padded_vocab_size(v) for v in (1, 64, 65, 300, 32768, 50257)] == [64, 64, 128, 320, 32768, 50304]


def test_state_dict_keys_and_shapes():
    model = ref.GPT(CFG)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == ref.expected_shapes(CFG)
    expected_keys = {
        "transformer.wte.weight", "lm_head.weight",
        "resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda",
        "value_embeds.1.weight", "value_embeds.3.weight",
        "transformer.h.1.attn.ve_gate.weight", "transformer.h.3.attn.ve_gate.weight",
    } | {
        f"transformer.h.{i}.{n}.weight"
        for i in range(4)
        for n in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert set(sd) == expected_keys
    assert sd["transformer.wte.weight"].shape == (320, 64)
    assert sd["transformer.h.0.attn.c_k.weight"].shape == (32, 64)  # n_kv_head * head_dim
    assert sd["value_embeds.1.weight"].shape == (320, 32)
    assert sd["transformer.h.1.attn.ve_gate.weight"].shape == (2, 12)
    assert "cos" not in sd and "sin" not in sd  # rotary tables are non-persistent
    assert not any(k.endswith("bias") for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())


@pytest.mark.parametrize("feature", FEATURES)
def test_switching_a_feature_off_removes_exactly_its_tensors(feature):
    full = set(ref.GPT(CFG).state_dict())
    off = set(ref.GPT(ref.GPTConfig(sequence_len=256, **TINY, **{feature: False})).state_dict())
    removed = {
        "smear": {"smear_gate.weight", "smear_lambda"},
        "backout": {"backout_lambda"},
        "value_embeds": {"value_embeds.1.weight", "value_embeds.3.weight",
                         "transformer.h.1.attn.ve_gate.weight", "transformer.h.3.attn.ve_gate.weight"},
        "lambdas": {"resid_lambdas", "x0_lambdas"},
        "sliding_window": set(),  # windows live only in meta["model_config"]["window_pattern"]
    }[feature]
    assert full - off == removed and off <= full


def test_all_features_off_is_the_old_key_set():
    old = ref.GPTConfig(sequence_len=256, **TINY, **{f: False for f in FEATURES})
    keys = set(ref.GPT(old).state_dict())
    expected = {"transformer.wte.weight", "lm_head.weight"} | {
        f"transformer.h.{i}.{n}.weight"
        for i in range(4)
        for n in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert keys == expected
    assert ref.model_config_dict(old) == dict(sequence_len=256, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)


# ---------------------------------------------------------------- init and perturbation


def test_init_weights_follow_the_table():
    cfg = ref.GPTConfig(sequence_len=256, vocab_size=4000, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
    model = ref.build_model(cfg, seed=0, perturb=False)
    s = math.sqrt(3) / math.sqrt(64)
    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.0001
    for block in model.transformer.h:
        for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight):
            assert w.abs().max() <= s and w.abs().max() > 0.95 * s
        c_fc = block.mlp.c_fc.weight
        assert c_fc.abs().max() <= 0.4 * s and c_fc.abs().max() > 0.95 * 0.4 * s
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0
        if block.attn.ve_gate is not None:
            assert 0 <= block.attn.ve_gate.weight.min() and block.attn.ve_gate.weight.max() <= 0.02
    for ve in model.value_embeds.values():
        assert ve.weight.abs().max() <= s and ve.weight.abs().max() > 0.95 * s
    torch.testing.assert_close(model.resid_lambdas.data, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    torch.testing.assert_close(model.x0_lambdas.data, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert 0 <= model.smear_gate.weight.min() and model.smear_gate.weight.max() <= 0.02
    assert model.smear_lambda.item() == 0.0
    assert model.backout_lambda.item() == pytest.approx(0.2)
    # a one-layer model uses max(n_layer - 1, 1) as the denominator
    one = ref.build_model(ref.GPTConfig(sequence_len=256, vocab_size=300, n_layer=1, n_head=4, n_kv_head=2, n_embd=64), perturb=False)
    assert one.resid_lambdas.tolist() == pytest.approx([1.15]) and one.x0_lambdas.tolist() == pytest.approx([0.20])


def test_init_and_perturb_are_deterministic():
    a, b = ref.build_model(CFG, seed=3), ref.build_model(CFG, seed=3)
    c = ref.build_model(CFG, seed=4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_perturb_moves_every_parameter():
    init = ref.build_model(CFG, seed=0, perturb=False)
    pert = ref.perturb_(copy.deepcopy(init), torch.Generator().manual_seed(0))
    for name, p in pert.named_parameters():
        assert (p - init.get_parameter(name)).abs().min() > 0, f"{name} kept some init value"
    assert pert.smear_lambda.item() > 0.2
    assert abs(pert.backout_lambda.item() - 0.2) > 0.05
    for block in pert.transformer.h:
        assert block.attn.c_proj.weight.abs().mean() > 0.01 and block.mlp.c_proj.weight.abs().mean() > 0.01
    idx = tokens(CFG, 32)
    # logits are large enough to exercise the softcap's curved region
    assert logits_of(pert, idx).abs().max() > 7.5


# ---------------------------------------------------------------- forward: closed forms and pieces


def test_forward_at_init_matches_closed_form():
    """At init every c_proj is zero (blocks are the identity) and smear_lambda is 0, so the
    logits reduce to steps 1, 3 and 8 alone: a check of the lambdas, backout, norm and softcap."""
    model = ref.build_model(CFG, seed=0, perturb=False)
    idx = tokens(CFG, 16)
    x0 = F.rms_norm(model.transformer.wte.weight[idx], (64,))
    x = x0
    for i in range(4):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        if i == 4 // 2:
            x_backout = x
    x = F.rms_norm(x - 0.2 * x_backout, (64,))
    expected = 15 * torch.tanh((x @ model.lm_head.weight.T)[..., :300] / 15)
    got = logits_of(model, idx)
    assert got.shape == (2, 16, 300) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


def test_trunk_wiring_with_hooks():
    """Steps 3 and 8 on a perturbed model: block i's input is resid[i] * (previous block output)
    + x0[i] * x0, and the logits come from the last output minus backout * output of block n_layer // 2."""
    model = ref.build_model(CFG, seed=0)
    ins, outs = [], []
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda m, args: ins.append(args[0]))
        block.register_forward_hook(lambda m, args, out: outs.append(out))
    idx = tokens(CFG, 24)
    got = logits_of(model, idx)
    with torch.no_grad():
        x0 = model.embed(idx)
        prev = x0
        for i in range(4):
            torch.testing.assert_close(ins[i], model.resid_lambdas[i] * prev + model.x0_lambdas[i] * x0)
            prev = outs[i]
        x = F.rms_norm(outs[3] - model.backout_lambda * outs[2], (64,))  # n_layer // 2 == 2
        expected = 15 * torch.tanh((x @ model.lm_head.weight.T)[..., :300] / 15)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_smear_matches_a_per_position_loop():
    model = ref.build_model(CFG, seed=0)
    idx = tokens(CFG, 12)
    e = F.rms_norm(model.transformer.wte.weight[idx], (64,)).detach()
    expected = e.clone()
    lam, w = model.smear_lambda.item(), model.smear_gate.weight.detach()[0]
    for b in range(2):
        for t in range(1, 12):
            gate = torch.sigmoid(e[b, t, :24] @ w)  # current position's pre-smear channels
            expected[b, t] = e[b, t] + lam * gate * e[b, t - 1]  # previous position, pre-smear
    with torch.no_grad():
        torch.testing.assert_close(model.embed(idx), expected, rtol=1e-6, atol=1e-6)
        # a single token has nothing to smear
        torch.testing.assert_close(model.embed(idx[:, :1]), e[:, :1])


def test_logits_are_cropped_and_softcapped():
    model = ref.build_model(CFG, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # push raw logits far past the cap
    out = logits_of(model, tokens(CFG, 8))
    assert out.shape == (2, 8, 300)
    assert out.abs().max() <= 15.0 and out.abs().max() > 14.9  # float32 tanh saturates to exactly 1


def test_rotary_tables_and_direction():
    cos, sin = ref.precompute_rotary(10, 16)
    assert cos.shape == sin.shape == (1, 10, 1, 8)
    t, c = 7, 3
    theta = t * 100000 ** (-2 * c / 16)
    assert cos[0, t, 0, c].item() == pytest.approx(math.cos(theta), abs=1e-6)
    assert sin[0, t, 0, c].item() == pytest.approx(math.sin(theta), abs=1e-6)
    # (x1, x2) = (1, 0) goes to (cos, -sin): y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos
    x = torch.zeros(1, 10, 1, 16)
    x[..., c] = 1.0
    y = ref.apply_rotary_emb(x, cos, sin)
    assert y[0, t, 0, c].item() == pytest.approx(math.cos(theta), abs=1e-6)
    assert y[0, t, 0, c + 8].item() == pytest.approx(-math.sin(theta), abs=1e-6)
    # position 0 is the identity; dot products depend only on the offset between positions
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    cos, sin = ref.precompute_rotary(64, 16)

    def rot(v, pos):
        return ref.apply_rotary_emb(v, cos[:, pos : pos + 1], sin[:, pos : pos + 1])

    torch.testing.assert_close(rot(q, 0), q)
    dots = [(rot(q, a + 9) * rot(k, a)).sum().item() for a in (0, 5, 40)]
    assert dots == pytest.approx([dots[0]] * 3, abs=1e-4)


def test_attention_core_matches_sdpa():
    """The explicit mask + repeat_interleave attention equals torch's SDPA with enable_gqa."""
    model = ref.build_model(WIN, seed=0)
    attn = model.transformer.h[1].attn  # a VE layer
    g = torch.Generator().manual_seed(5)
    x = F.rms_norm(torch.randn(2, T_WIN, 64, generator=g), (64,))
    ve = torch.randn(2, T_WIN, 32, generator=g)
    cos_sin = model.cos[:, :T_WIN], model.sin[:, :T_WIN]
    with torch.no_grad():
        for window in (128, 512):
            got = attn(x, ve, cos_sin, window)
            B, T = 2, T_WIN
            q = attn.c_q(x).view(B, T, 4, 16)
            k = attn.c_k(x).view(B, T, 2, 16)
            v = attn.c_v(x).view(B, T, 2, 16) + (3 * torch.sigmoid(attn.ve_gate(x[..., :12]))).unsqueeze(-1) * ve.view(B, T, 2, 16)
            q = 1.2 * F.rms_norm(ref.apply_rotary_emb(q, *cos_sin), (16,))
            k = 1.2 * F.rms_norm(ref.apply_rotary_emb(k, *cos_sin), (16,))
            i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=(j <= i) & (i - j <= window), enable_gqa=True,
            )
            expected = attn.c_proj(y.transpose(1, 2).reshape(B, T, 64))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- structural properties


def test_causal():
    model = ref.build_model(WIN, seed=0)
    idx = tokens(WIN, T_WIN)
    idx2 = idx.clone()
    idx2[:, 150:] = (idx2[:, 150:] + 7) % WIN.vocab_size
    a, b = logits_of(model, idx), logits_of(model, idx2)
    torch.testing.assert_close(a[:, :150], b[:, :150], rtol=0, atol=1e-6)
    assert changed_rows(a, b) == set(range(150, T_WIN))


def test_window_mask():
    m = ref.window_mask(6, 2)
    assert m.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]  # W + 1 keys: i - W <= j <= i


def test_window_reach_at_the_attention_module():
    """On an S layer (W = 128), perturbing the input at position p changes exactly rows p..p+W."""
    model = ref.build_model(WIN, seed=0)
    attn, W = model.transformer.h[0].attn, model.window_sizes[0]
    assert W == 128
    g = torch.Generator().manual_seed(2)
    x = F.rms_norm(torch.randn(1, T_WIN, 64, generator=g), (64,))
    cos_sin = model.cos[:, :T_WIN], model.sin[:, :T_WIN]
    for p in (0, 30):
        x2 = x.clone()
        x2[0, p] += torch.randn(64, generator=g)
        with torch.no_grad():
            a, b = attn(x, None, cos_sin, W), attn(x2, None, cos_sin, W)
        assert changed_rows(a, b) == set(range(p, min(p + W, T_WIN - 1) + 1))


@pytest.mark.parametrize("smear", [False, True])
def test_window_reach_in_the_model(smear):
    """n_layer=2, pattern "SL": layer 0 has W = 128 and layer 1 (the last) is always L.
    Changing token p reaches layer 0's attention output at rows p..p+W, one row further with smear
    (token p also enters position p+1's embedding); the logits change at every row from p on."""
    cfg = ref.GPTConfig(sequence_len=512, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL", smear=smear)
    model = ref.build_model(cfg, seed=0)
    assert model.window_sizes == [128, 512]
    outs = []
    hook = model.transformer.h[0].attn.register_forward_hook(lambda m, i, o: outs.append(o))
    idx = tokens(cfg, T_WIN)
    p = 20
    idx2 = idx.clone()
    idx2[:, p] = (idx2[:, p] + 1) % cfg.vocab_size
    a, b = logits_of(model, idx), logits_of(model, idx2)
    hook.remove()
    reach = p + 128 + (1 if smear else 0)
    assert changed_rows(outs[0], outs[1]) == set(range(p, reach + 1))
    assert changed_rows(a, b) == set(range(p, T_WIN))


def test_sliding_windows_only_matter_beyond_w():
    """Same weights, pattern SSSL vs L: positions t <= W see every earlier key either way."""
    model = ref.build_model(WIN, seed=0)
    full = ref.GPT(ref.GPTConfig(sequence_len=512, window_pattern="L", **TINY))
    full.load_state_dict(model.state_dict())
    idx = tokens(WIN, T_WIN)
    a, b = logits_of(model, idx), logits_of(full, idx)
    torch.testing.assert_close(a[:, :129], b[:, :129], rtol=0, atol=1e-6)
    assert changed_rows(a, b) == set(range(129, T_WIN))


def test_gqa_equals_mha_with_duplicated_kv_heads():
    gqa = ref.build_model(WIN, seed=0)  # n_head 4, n_kv_head 2
    mha = ref.GPT(ref.GPTConfig(sequence_len=512, vocab_size=300, n_layer=4, n_head=4, n_kv_head=4, n_embd=64))
    group, D = 2, 16
    sd = {}
    for k, v in gqa.state_dict().items():
        if k.endswith(("attn.c_k.weight", "attn.c_v.weight")):  # (Hkv*D, d) -> (H*D, d)
            v = v.view(2, D, 64).repeat_interleave(group, dim=0).reshape(4 * D, 64)
        elif k.endswith("attn.ve_gate.weight"):  # (Hkv, 12) -> (H, 12)
            v = v.repeat_interleave(group, dim=0)
        elif k.startswith("value_embeds."):  # (Vp, Hkv*D) -> (Vp, H*D)
            v = v.view(320, 2, D).repeat_interleave(group, dim=1).reshape(320, 4 * D)
        sd[k] = v
    mha.load_state_dict(sd, strict=True)
    idx = tokens(WIN, T_WIN)
    torch.testing.assert_close(logits_of(mha, idx), logits_of(gqa, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature", FEATURES)
def test_old_variant_equals_new_model_with_neutral_values(feature):
    """What conversion does for an old checkpoint: the missing part set to its neutral value
    (resid 1, x0 0, smear 0, backout 0, value embeds 0, window L) changes nothing."""
    new = ref.build_model(WIN, seed=0)
    old = ref.GPT(ref.GPTConfig(sequence_len=512, **TINY, **{feature: False}))
    old.load_state_dict({k: v for k, v in new.state_dict().items() if k in old.state_dict()}, strict=True)
    with torch.no_grad():
        if feature == "smear":
            new.smear_lambda.zero_()
        elif feature == "backout":
            new.backout_lambda.zero_()
        elif feature == "value_embeds":
            for ve in new.value_embeds.values():
                ve.weight.zero_()
        elif feature == "lambdas":
            new.resid_lambdas.fill_(1.0)
            new.x0_lambdas.zero_()
        elif feature == "sliding_window":
            new.window_sizes = ref.compute_window_sizes(ref.GPTConfig(sequence_len=512, window_pattern="L", **TINY))
    idx = tokens(WIN, T_WIN)
    a, b = logits_of(old, idx), logits_of(new, idx)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the feature matters when it is not neutral
    assert not torch.allclose(a, logits_of(ref.build_model(WIN, seed=0), idx), atol=1e-3)


# ---------------------------------------------------------------- checkpoint files


@pytest.mark.parametrize("compile_prefix", [False, True])
def test_save_format_round_trip(tmp_path, compile_prefix):
    model = ref.build_model(CFG, seed=0)
    model_path, meta_path = ref.save_nanochat_checkpoint(model, tmp_path, 1500, compile_prefix=compile_prefix)
    assert model_path.name == "model_001500.pt" and meta_path.name == "meta_001500.json"
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    prefix = "_orig_mod." if compile_prefix else ""
    assert {k: tuple(v.shape) for k, v in state.items()} == {prefix + k: s for k, s in ref.expected_shapes(CFG).items()}
    assert all(v.dtype == torch.float32 for v in state.values())
    meta = json.loads(meta_path.read_text())
    assert meta == {
        "step": 1500,
        "model_config": dict(sequence_len=256, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSSL"),
        "val_bpb": 1.0,
    }
    loaded, meta2 = ref.load_nanochat_checkpoint(tmp_path)
    assert meta2 == meta and loaded.config == model.config
    idx = tokens(CFG, 40)
    assert torch.equal(logits_of(loaded, idx), logits_of(model, idx))


def test_save_old_variant_and_extra_meta(tmp_path):
    old_cfg = ref.GPTConfig(sequence_len=256, **TINY, **{f: False for f in FEATURES})
    model = ref.build_model(old_cfg, seed=0)
    _, meta_path = ref.save_nanochat_checkpoint(model, tmp_path, 7, extra_meta={"user_config": {"depth": 4}})
    meta = json.loads(meta_path.read_text())
    assert "window_pattern" not in meta["model_config"] and meta["user_config"] == {"depth": 4}
    state = torch.load(tmp_path / "model_000007.pt", weights_only=True)
    assert set(state) == set(ref.expected_shapes(old_cfg))
    loaded, _ = ref.load_nanochat_checkpoint(tmp_path, 7)
    # every switch inferred back from the files; without sliding windows the pattern is moot ("L")
    assert dataclasses.replace(loaded.config, window_pattern="SSSL") == old_cfg
    assert loaded.window_sizes == [256] * 4
    idx = tokens(old_cfg, 40)
    assert torch.equal(logits_of(loaded, idx), logits_of(model, idx))


def test_save_with_bf16_embeddings(tmp_path):
    """nanochat keeps wte and value_embeds in bf16 on GPU; such a file loads to the rounded model."""
    model = ref.build_model(CFG, seed=0)
    ref.save_nanochat_checkpoint(model, tmp_path, 1, embedding_dtype=torch.bfloat16)
    state = torch.load(tmp_path / "model_000001.pt", weights_only=True)
    bf16 = {k for k, v in state.items() if v.dtype == torch.bfloat16}
    assert bf16 == {"transformer.wte.weight", "value_embeds.1.weight", "value_embeds.3.weight"}
    loaded, _ = ref.load_nanochat_checkpoint(tmp_path)
    rounded = ref.round_embeddings_(copy.deepcopy(model))
    idx = tokens(CFG, 40)
    assert torch.equal(logits_of(loaded, idx), logits_of(rounded, idx))
    assert not torch.equal(logits_of(loaded, idx), logits_of(model, idx))
