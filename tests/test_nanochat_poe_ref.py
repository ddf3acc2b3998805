"""Self-checks of the nanochat-poe reference (tests/nanochat_poe_ref.py) against itself and POE_FORMATS.md.

There is no fork to compare with, so each test pins one clause of the spec with a property it
implies: the plain fork base IS the upstream forward, the per-stage-head Log-OP reduces to one
log_softmax for K=1/α=1 and is not normalised, the files hold exactly the listed keys/dtypes/meta,
a neutral stage reproduces its parent, the total-depth window rule can change a base window, and a
chain folds the parent's head. Tiny configs, CPU, float32, seeded generators.
"""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

try:  # tests/ is not a package today; keep working if it becomes one
    from tests import nanochat_poe_ref as poe
    from tests import nanochat_ref as ref
except ImportError:
    import nanochat_poe_ref as poe
    import nanochat_ref as ref

# vocab 512 (no padding), head_dim 16, GQA 2:1; sequence_len 512 -> S = 128, so T = 200 masks.
CFG = ref.GPTConfig(sequence_len=512, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
T = 200
CHAT_IDS = poe.default_chat_token_ids(CFG.vocab_size)  # 504..511


def tokens(T=T, B=2, seed=1, vocab=CFG.vocab_size):
    """Random ids with every chat token present (so changed chat rows of wte matter)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    idx[:, 5 : 5 + len(CHAT_IDS)] = torch.tensor(CHAT_IDS)
    return idx


def base(poe_every=2, per_stage_head=False, seed=0, config=CFG):
    return poe.build_fork_base(config, poe_every=poe_every, per_stage_head=per_stage_head, seed=seed)


def stage_on(parent, new_layers, seed=7, **kw):
    return poe.build_fork_stage(parent, new_layers, torch.Generator().manual_seed(seed), **kw)


def block_outputs(model, idx):
    """Each block's output as the upstream GPT.forward computes it (forward hooks; independent of poe's loop)."""
    outs = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i, b in enumerate(model.transformer.h)]
    try:
        with torch.no_grad():
            ref.GPT.forward(model, idx)
    finally:
        for h in hooks:
            h.remove()
    return outs


def per_stage_logop_by_hand(model, idx, alpha):
    outs = block_outputs(model, idx)
    terms = []
    with torch.no_grad():
        for k, end in enumerate(model.stage_ends):
            n = F.rms_norm(outs[end], (CFG.n_embd,))
            z = (n @ model.lm_head.weight.T + n @ model.lm_head_stages[k].weight.T)[..., : CFG.vocab_size]
            terms.append(torch.log_softmax(15 * torch.tanh(z / 15), dim=-1))
    return sum(terms) / len(terms) ** (1 - alpha)


# ---------------------------------------------------------------- stages and the plain base


def test_stage_ends_rule():
    assert poe.stage_ends(24, 6) == [5, 11, 17, 23]
    assert poe.stage_sizes(24, 6) == [6, 6, 6, 6]
    assert poe.stage_ends(20, 6) == [5, 11, 17, 19] and poe.stage_sizes(20, 6) == [6, 6, 6, 2]
    assert poe.stage_ends(4, 1) == [0, 1, 2, 3] and poe.stage_ends(4, 4) == [3] and poe.stage_ends(4, 9) == [3]
    assert poe.stage_sizes(4, 3) == [3, 1]
    with pytest.raises(ValueError):
        poe.stage_ends(4, 0)


def test_plain_fork_base_is_the_upstream_forward():
    model = base(poe_every=2)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == ref.expected_shapes(CFG)
    upstream = ref.GPT(CFG)
    upstream.load_state_dict(sd, strict=True)
    idx = tokens()
    with torch.no_grad():
        expected = upstream.eval()(idx)
    got = poe.fork_base_logits(model, idx)
    assert got.shape == (2, T, CFG.vocab_size) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert torch.equal(poe.fork_base_logits(model, idx, alpha=0.7), expected)  # alpha unused without heads


def test_per_stage_heads_layout_and_perturbation():
    model = base(poe_every=3, per_stage_head=True)  # L=4: stages end at 2, 3 -> K=2
    assert model.stage_ends == [2, 3] and model.n_stages == 2
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {**ref.expected_shapes(CFG), "lm_head_stages.0.weight": (512, 64), "lm_head_stages.1.weight": (512, 64)}
    init = poe.build_fork_base(CFG, poe_every=3, per_stage_head=True, perturb=False)
    assert all(torch.count_nonzero(h.weight) == 0 for h in init.lm_head_stages)  # the fork zero-inits them
    for name, p in model.named_parameters():
        assert (p - init.get_parameter(name)).abs().min() > 0, f"{name} kept some init value"
    assert (model.resid_lambdas - 1).abs().min() > 0 and model.x0_lambdas.abs().min() > 0
    assert model.backout_lambda.abs().item() > 0.1 and model.smear_lambda.abs().item() > 0.1
    with pytest.raises(ValueError):
        poe.ForkGPT(dataclasses.replace(CFG, smear=False))


# ---------------------------------------------------------------- per-stage-head Log-OP (§3)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_logop_with_one_stage_is_that_heads_log_softmax(alpha):
    """K=1 (poe_every >= L): K ** (1-α) = 1, so the result is log_softmax of the one head's logits:
    the upstream forward with backout_lambda 0 and lm_head = lm_head + lm_head_stages[0]."""
    model = base(poe_every=4, per_stage_head=True)
    assert model.n_stages == 1
    idx = tokens()
    got = poe.fork_base_logits(model, idx, alpha=alpha)
    merged = ref.GPT(CFG)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head_stages.")}
    sd["lm_head.weight"] = sd["lm_head.weight"] + model.lm_head_stages[0].weight.detach()
    sd["backout_lambda"] = torch.zeros(1)  # no backout in a stage read-out
    merged.load_state_dict(sd, strict=True)
    with torch.no_grad():
        expected = torch.log_softmax(merged.eval()(idx), dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.logsumexp(got, -1), torch.zeros(2, T), rtol=0, atol=1e-5)


@pytest.mark.parametrize("poe_every", [1, 2, 3])
def test_logop_sums_every_stage_and_is_not_normalised(poe_every):
    model = base(poe_every=poe_every, per_stage_head=True)
    K = model.n_stages
    idx = tokens()
    got = {a: poe.fork_base_logits(model, idx, alpha=a) for a in (0.0, 0.5, 1.0)}
    for a, v in got.items():
        torch.testing.assert_close(v, per_stage_logop_by_hand(model, idx, a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0.0] * K, got[1.0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0.5] * K**0.5, got[1.0], rtol=1e-5, atol=1e-5)
    # not renormalised: a geometric mean of K > 1 distributions has total mass < 1
    lse = torch.logsumexp(got[0.0], -1)
    assert (lse < 1e-6).all() and lse.abs().mean() > 1e-2


def test_backout_is_unused_with_per_stage_heads_and_used_without():
    model = base(poe_every=2, per_stage_head=True)
    idx = tokens()
    logop, last = poe.fork_base_logits(model, idx), model(idx).detach()  # model(idx): @40710e1d read-out
    with torch.no_grad():
        model.backout_lambda.add_(0.3)
    assert torch.equal(poe.fork_base_logits(model, idx), logop)
    assert not torch.allclose(model(idx).detach(), last)


def moved_by_each_parameter(module, logits) -> dict[str, float]:
    """How far `logits(m)` moves when each parameter of `module` alone is nudged."""
    idx = tokens(T=64)
    before = logits(module, idx)
    out = {}
    for name, p in module.named_parameters():
        changed = copy.deepcopy(module)
        with torch.no_grad():
            changed.get_parameter(name).add_(0.5 * (p.abs().mean() + 0.1))
        out[name] = (logits(changed, idx) - before).abs().max().item()
    return out


@pytest.mark.parametrize("per_stage_head", [False, True])
def test_every_base_tensor_matters(per_stage_head):
    moved = moved_by_each_parameter(base(poe_every=2, per_stage_head=per_stage_head), poe.fork_base_logits)
    for name, m in moved.items():
        if per_stage_head and name == "backout_lambda":
            assert m == 0.0
        else:
            assert m > 1e-4, name


# ---------------------------------------------------------------- base_train files (§1)


BASE_META_KEYS = {"step", "val_bpb", "model_config", "user_config", "device_batch_size", "max_seq_len",
                  "total_batch_size", "dataloader_state_dict", "loop_state"}
UPSTREAM_MC = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern"}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def check_base_files(tmp_path, model, step, embedding_dtype, **save_kw):
    mp, jp = poe.save_fork_base(model, tmp_path, step, embedding_dtype=embedding_dtype, **save_kw)
    assert mp.name == f"model_{step:06d}.pt" and jp.name == f"meta_{step:06d}.json"
    assert (tmp_path / f"optim_{step:06d}_rank0.pt").exists()
    sd = load(mp)
    expected_keys = set(ref.expected_shapes(CFG)) | {f"lm_head_stages.{k}.weight" for k in range(model.n_stages if model.per_stage_head else 0)}
    assert set(sd) == expected_keys
    for k, v in sd.items():
        emb = k == "transformer.wte.weight" or k.startswith("value_embeds.")
        assert v.dtype == (embedding_dtype if emb else torch.float32), k
        assert torch.equal(v, model.state_dict()[k].to(v.dtype)), k
    meta = json.loads(jp.read_text())
    assert set(meta) == BASE_META_KEYS
    assert meta["step"] == step and meta["max_seq_len"] == CFG.sequence_len
    assert set(meta["loop_state"]) == {"min_val_bpb", "smooth_train_loss", "total_training_time"}
    return sd, meta


def test_base_files_8c76679a(tmp_path):
    model = base(poe_every=2)
    _, meta = check_base_files(tmp_path, model, 1200, torch.bfloat16, poe_mode="flat", poe_every=2, version="8c76679a")
    mc, uc = meta["model_config"], meta["user_config"]
    assert mc == {k: getattr(CFG, k) for k in UPSTREAM_MC}
    assert uc["poe_mode"] == "flat" and uc["poe_every"] == 2
    assert "poe_alpha" not in uc and "per_stage_head" not in uc
    assert {"depth", "model_tag", "device_batch_size"} <= set(uc)
    with pytest.raises(ValueError):  # that layout cannot hold per-stage heads or alpha
        poe.save_fork_base(base(per_stage_head=True), tmp_path / "x", 1, version="8c76679a")
    with pytest.raises(ValueError):
        poe.save_fork_base(model, tmp_path / "y", 1, poe_alpha=0.5, version="8c76679a")


@pytest.mark.parametrize("per_stage_head", [False, True])
def test_base_files_40710e1d(tmp_path, per_stage_head):
    model = base(poe_every=2, per_stage_head=per_stage_head)
    _, meta = check_base_files(tmp_path, model, 5, torch.float32, poe_mode="hier", poe_every=2, poe_alpha=0.25,
                               version="40710e1d")
    mc, uc = meta["model_config"], meta["user_config"]
    assert set(mc) == UPSTREAM_MC | {"dual_head", "frozen_layers", "per_stage_head", "poe_every"}
    assert mc["dual_head"] is False and mc["frozen_layers"] == 0 and mc["per_stage_head"] is per_stage_head
    assert mc["poe_every"] == 1 and uc["poe_every"] == 2  # the trap: the real value is in user_config
    assert uc["poe_mode"] == "hier" and uc["poe_alpha"] == 0.25 and uc["per_stage_head"] is per_stage_head


@pytest.mark.parametrize("per_stage_head", [False, True])
def test_base_files_276c2ac(tmp_path, per_stage_head):
    model = base(poe_every=2, per_stage_head=per_stage_head)
    sd, meta = check_base_files(tmp_path, model, 7, torch.bfloat16, poe_mode="flat", poe_alpha=0.5, version="276c2ac")
    mc, uc = meta["model_config"], meta["user_config"]
    assert set(mc) == UPSTREAM_MC | {"dual_head", "frozen_layers", "per_stage_head", "poe_every", "intermediate_size"}
    assert mc["intermediate_size"] == 0 and mc["per_stage_head"] is per_stage_head and mc["poe_every"] == 2
    assert uc["poe_every"] == 2 and uc["poe_alpha"] == 0.5 and uc["poe_mode"] == "flat"
    # a bf16 file computes what the in-memory model computes after rounding its embeddings
    loaded = poe.ForkGPT(CFG, poe_every=2, per_stage_head=per_stage_head)
    loaded.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    rounded = ref.round_embeddings_(copy.deepcopy(model))
    idx = tokens()
    assert torch.equal(poe.fork_base_logits(loaded.eval(), idx, 0.5), poe.fork_base_logits(rounded, idx, 0.5))


def test_base_meta_rejects_bad_arguments(tmp_path):
    model = base(poe_every=2, per_stage_head=True)
    with pytest.raises(ValueError):
        poe.save_fork_base(model, tmp_path, 1, poe_mode="tree")
    with pytest.raises(ValueError):
        poe.save_fork_base(model, tmp_path, 1, version="abc")
    with pytest.raises(ValueError):  # heads follow poe_every=2
        poe.save_fork_base(model, tmp_path, 1, poe_every=3)


# ---------------------------------------------------------------- specialist stage (§2, §3)


def test_stage_structure_and_what_changes_vs_the_base():
    b = base()
    s = stage_on(b, 4)
    assert (s.frozen_layers, s.n_layer, s.backout_layer) == (4, 8, 2)
    assert [blk.attn.ve_gate is None for blk in s.new_blocks] == [True] * 4
    assert s.window_sizes == ref.compute_window_sizes(dataclasses.replace(CFG, n_layer=8))
    assert len(list(s.parameters())) == 6 * 4 + 4  # the stage owns exactly its delta
    # wte: only the 8 chat rows changed
    diff_rows = (s.wte.weight - b.transformer.wte.weight).abs().amax(-1).nonzero().flatten().tolist()
    assert diff_rows == CHAT_IDS
    # lambdas: 0..backout_layer drift, backout_layer+1..frozen-1 stay, new ones are not neutral
    for mine, theirs in ((s.resid_lambdas, b.resid_lambdas), (s.x0_lambdas, b.x0_lambdas)):
        assert (mine[:3] - theirs[:3]).abs().min() > 0
        assert torch.equal(mine[3:4], theirs[3:4])
    assert (s.resid_lambdas[4:] - 1).abs().min() > 0 and s.x0_lambdas[4:].abs().min() > 0
    assert s.lm_head_stage.weight.abs().mean() > 0.01
    assert all(blk.attn.c_proj.weight.abs().mean() > 0.01 and blk.mlp.c_proj.weight.abs().mean() > 0.01 for blk in s.new_blocks)


def test_every_stage_delta_tensor_matters():
    moved = moved_by_each_parameter(stage_on(base(), 2), poe.fork_stage_logits)
    assert all(m > 1e-4 for m in moved.values()), moved


def test_stage_uses_the_base_value_embeds_smear_and_backout():
    b = base()
    s = stage_on(b, 2)
    idx = tokens(T=64)
    before = poe.fork_stage_logits(s, idx)
    for name in ("value_embeds.1.weight", "value_embeds.3.weight", "smear_lambda", "backout_lambda", "lm_head.weight"):
        p = b.get_parameter(name)
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(0.3)
            moved = (poe.fork_stage_logits(s, idx) - before).abs().max()
            p.copy_(saved)
        assert moved > 1e-4, name
    # the stage's wte replaces the base's: changing the base's table changes nothing
    with torch.no_grad():
        b.transformer.wte.weight.add_(1.0)
    assert torch.equal(poe.fork_stage_logits(s, idx), before)


def test_neutral_stage_gives_its_parent_base_logits():
    b = base()
    s = stage_on(b, 4, neutral=True)
    assert s.window_sizes[:4] == b.window_sizes == [128, 128, 128, 512]  # SSSL over 8 layers keeps layer 3 L
    assert torch.equal(s.wte.weight, b.transformer.wte.weight)
    idx = tokens()
    assert torch.equal(poe.fork_stage_logits(s, idx), poe.fork_base_logits(b, idx))


def test_total_depth_windows_can_change_a_base_window():
    cfg3 = dataclasses.replace(CFG, n_layer=3)
    b = base(config=cfg3)
    s = stage_on(b, 2, neutral=True)
    S, L = 128, 512
    assert b.window_sizes == [S, S, L]
    assert s.window_sizes == [S, S, S, L, L]  # base layer 2: L -> S
    idx = tokens()
    base_logits, stage_logits = poe.fork_base_logits(b, idx), poe.fork_stage_logits(s, idx)
    assert (stage_logits - base_logits)[:, S + 1 :].abs().max() > 1e-3  # positions that lose keys differ
    assert torch.equal(stage_logits[:, : S + 1], base_logits[:, : S + 1])  # a 128 window still sees every key there
    s.window_sizes[:3] = b.window_sizes  # that window is the whole difference
    assert torch.equal(poe.fork_stage_logits(s, idx), base_logits)


def test_stage_delta_files(tmp_path):
    b = base()
    s = stage_on(b, 4)
    mp, jp = poe.save_fork_stage(s, tmp_path, 300, base_tag="d4", embedding_dtype=torch.bfloat16)
    assert (mp.name, jp.name) == ("model_000300.pt", "meta_000300.json")
    sd = load(mp)
    assert len(sd) == 28
    expected = {f"transformer.h.{i}.{n}.weight" for i in range(4, 8) for n in poe.BLOCK_WEIGHTS}
    expected |= {"lm_head_stage.weight", "transformer.wte.weight", "resid_lambdas", "x0_lambdas"}
    assert set(sd) == expected
    assert sd["transformer.wte.weight"].dtype == torch.bfloat16 and sd["transformer.wte.weight"].shape == (512, 64)
    assert all(v.dtype == torch.float32 for k, v in sd.items() if k != "transformer.wte.weight")
    assert sd["resid_lambdas"].shape == (8,) and sd["lm_head_stage.weight"].shape == (512, 64)
    assert torch.equal(sd["transformer.h.5.mlp.c_proj.weight"], s.new_blocks[1].mlp.c_proj.weight)
    meta = json.loads(jp.read_text())
    assert set(meta) == {"step", "smooth_loss", "model_config", "user_config", "base_model_dir", "dual_head", "frozen_layers"}
    assert meta["model_config"] == {**{k: getattr(CFG, k) for k in UPSTREAM_MC}, "n_layer": 8, "dual_head": True, "frozen_layers": 4}
    assert (meta["base_model_dir"], meta["dual_head"], meta["frozen_layers"], meta["step"]) == ("d4", True, 4, 300)
    uc = meta["user_config"]
    assert uc["model_tag"] == "d4" and uc["model_step"] is None and uc["new_layers"] == 4
    assert uc["parent_stage_tag"] is None and uc["parent_stage_step"] is None
    # a bf16 delta computes what the stage computes after rounding its wte
    loaded = copy.deepcopy(s)
    with torch.no_grad():
        loaded.wte.weight.copy_(sd["transformer.wte.weight"].float())
    idx = tokens()
    assert torch.equal(poe.fork_stage_logits(loaded, idx), poe.fork_stage_logits(poe.round_stage_embeddings_(s), idx))
    # two new blocks: 16 tensors (stage-chat)
    mp2, _ = poe.save_fork_stage(stage_on(b, 2), tmp_path / "chat", 1, base_tag="d4")
    assert len(load(mp2)) == 16


# ---------------------------------------------------------------- chain (§3 "Chain")


def test_chain_folds_the_parent_head():
    b = base()
    a = stage_on(b, 2, seed=1)
    c = stage_on(a, 2, seed=2)  # base -> A -> C
    assert (c.frozen_layers, c.n_layer, c.backout_layer) == (6, 8, 2)
    assert torch.equal(c.wte.weight, a.wte.weight)  # a chained stage skips the chat-row copy
    for mine, theirs in ((c.resid_lambdas, a.resid_lambdas), (c.x0_lambdas, a.x0_lambdas)):
        assert (mine[:3] - theirs[:3]).abs().min() > 0 and torch.equal(mine[3:6], theirs[3:6])
    # windows for the total depth: A's last layer (5) turns from L to S
    assert a.window_sizes[5] == 512 and c.window_sizes[5] == 128
    # the fold: lm_head_eff = base lm_head + A's lm_head_stage (A's own head is not folded for A)
    assert torch.equal(poe.fork_stage_lm_head_weight(a), b.lm_head.weight)
    assert torch.equal(poe.fork_stage_lm_head_weight(c), b.lm_head.weight + a.lm_head_stage.weight)
    idx = tokens()
    got = poe.fork_stage_logits(c, idx)
    with torch.no_grad():
        h = poe.fork_stage_hidden(c, idx)
        z = b.lm_head(h) + a.lm_head_stage(h) + c.lm_head_stage(h)
        expected = 15 * torch.tanh(z[..., : CFG.vocab_size] / 15)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        a.lm_head_stage.weight.mul_(0.0)
    assert (poe.fork_stage_logits(c, idx) - got).abs().max() > 1e-2
    with pytest.raises(ValueError):  # the fork rebuilds only base + 1 parent
        stage_on(c, 1)


def test_neutral_chained_stage_gives_its_parent_stage_logits():
    b = base()
    a = stage_on(b, 4, seed=1)
    c = stage_on(a, 4, seed=2, neutral=True)  # 8 -> 12 layers with SSSL keeps every window
    assert c.window_sizes[:8] == a.window_sizes
    idx = tokens()
    # equal up to rounding: C adds A's head as a weight fold, A adds it as logits
    torch.testing.assert_close(poe.fork_stage_logits(c, idx), poe.fork_stage_logits(a, idx), rtol=1e-5, atol=1e-5)


def test_chained_stage_files(tmp_path):
    b = base()
    a = stage_on(b, 2, seed=1)
    c = stage_on(a, 2, seed=2)
    mp, jp = poe.save_fork_stage(c, tmp_path, 40, base_tag="d4", parent_stage_tag="sft_new_stage_d4", parent_stage_step=300)
    sd = load(mp)
    assert len(sd) == 16
    assert {k.split(".")[2] for k in sd if k.startswith("transformer.h.")} == {"6", "7"}
    assert torch.equal(sd["lm_head_stage.weight"], c.lm_head_stage.weight)  # no folded head in the child delta
    meta = json.loads(jp.read_text())
    assert meta["frozen_layers"] == 6 and meta["model_config"]["n_layer"] == 8 and meta["model_config"]["frozen_layers"] == 6
    assert meta["user_config"]["parent_stage_tag"] == "sft_new_stage_d4" and meta["user_config"]["parent_stage_step"] == 300
    assert meta["base_model_dir"] == "d4"
    with pytest.raises(ValueError):  # a chained stage must name its parent, a stage on a base must not
        poe.save_fork_stage(c, tmp_path / "x", 1, base_tag="d4")
    with pytest.raises(ValueError):
        poe.save_fork_stage(a, tmp_path / "y", 1, base_tag="d4", parent_stage_tag="p")
