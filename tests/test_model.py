"""The PoE GPT: init, stage predictors, prefix property, detach rules, losses, KV cache."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from poelm.core.model import KVCache, PoEGPT, logop

from util import cut_model, tiny_config, tiny_model

T = 200  # longer than the 128-token S window, so sliding windows matter


def ids(batch=2, length=T, seed=0, vocab=300):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_init_weights_follows_the_table():
    m = PoEGPT(tiny_config())
    m.init_weights(seed=3)
    d, n = 64, 4
    s = 3**0.5 * d**-0.5
    h0 = m.transformer.h[0]
    assert torch.all(h0.attn.c_proj.weight == 0) and torch.all(h0.mlp.c_proj.weight == 0)
    assert h0.attn.c_q.weight.abs().max() <= s and h0.mlp.c_fc.weight.abs().max() <= 0.4 * s
    assert abs(m.transformer.wte.weight.std().item() - 0.8) < 0.05
    assert abs(m.lm_head.weight.std().item() - 0.001) < 2e-4
    assert torch.allclose(m.resid_lambdas, torch.tensor([1.15 - 0.1 * i / (n - 1) for i in range(n)]))
    assert torch.allclose(m.x0_lambdas, torch.tensor([0.2 - 0.15 * i / (n - 1) for i in range(n)]))
    assert m.smear_lambda.item() == 0 and m.backout_lambda.item() == pytest.approx(0.2)
    assert set(m.value_embeds) == {"1", "3"} and m.transformer.h[0].attn.ve_gate is None
    assert 0 <= m.smear_gate.weight.min() and m.smear_gate.weight.max() <= 0.02
    again = PoEGPT(tiny_config())
    again.init_weights(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))


def test_logits_shape_float32_and_softcapped():
    """The logits are 15 tanh(raw / 15) of the uncapped ones: checked where raw logits exceed the cap."""
    m = tiny_model()
    with torch.no_grad():
        m.lm_head.weight.mul_(200.0)  # push raw logits well past 15, so the cap has work to do
    out = m(ids()).logits
    assert out.shape == (2, T, 300) and out.dtype == torch.float32  # padding rows 300..319 cropped
    uncapped = PoEGPT(dataclasses.replace(m.config, softcap=1e9))
    uncapped.load_state_dict(m.state_dict())
    raw = uncapped(ids()).logits
    assert raw.abs().max() > 30
    torch.testing.assert_close(out, 15 * torch.tanh(raw / 15), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stages", [[2, 2], [1, 3], [1, 1, 1, 1], [3, 1]])
def test_exit_stage_equals_model_cut_after_stage(stages):
    m = tiny_model(poe_stage_layers=stages).eval()
    x = ids()
    with torch.no_grad():
        full = m(x, return_stages=True).stage_logits
        for k in range(len(stages)):
            pruned = m(x, exit_stage=k).logits
            cut = cut_model(m, k)(x).logits
            assert torch.equal(pruned, cut), f"stage {k}"
            assert torch.equal(pruned, full[k])


def test_exit_stage_out_of_range():
    from poelm.core.errors import PoelmError

    with pytest.raises(PoelmError, match="exit stage 2 out of range: this model has stages 0..1"):
        tiny_model()(ids(), exit_stage=2)


def block_grads(model):
    return [any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters()) for b in model.transformer.h]


@pytest.mark.parametrize("mode", ["flat", "residual_logop"])
@pytest.mark.parametrize("stages", [[2, 2], [3, 1], [1, 1, 2]])
def test_local_losses_train_only_their_own_stage(mode, stages):
    # [3, 1]: the backout layer (2) sits in stage 0 while stage 1 reads it out: it must be detached.
    m = tiny_model(poe_stage_layers=stages, poe_mode=mode)
    x = ids(length=64)
    ends = m.config.stage_ends
    for k in range(len(stages)):
        m.zero_grad(set_to_none=True)
        m(x, targets=x.roll(-1, 1)).stage_losses[k].backward()
        grads = block_grads(m)
        start = m.config.stage_starts[k]
        assert not any(grads[:start]), f"stage {k}'s loss reached an earlier stage: {grads}"
        assert all(grads[start:ends[k] + 1]), f"stage {k}'s own blocks got no gradient"
        assert not any(grads[ends[k] + 1:])
        # Shared parts learn from every stage: the embedding and the head.
        assert m.transformer.wte.weight.grad.abs().sum() > 0 and m.lm_head.weight.grad.abs().sum() > 0


def test_none_mode_backpropagates_end_to_end():
    m = tiny_model(poe_mode="none", poe_stage_layers=[1, 1, 2])
    x = ids(length=64)
    out = m(x, targets=x.roll(-1, 1))
    out.loss.backward()
    assert all(block_grads(m)) and out.stage_losses.shape == (1,)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_stage_loss_aggregation(alpha):
    m = tiny_model(poe_stage_layers=[1, 1, 2], poe_alpha=alpha)
    x = ids(length=64)
    targets = x.roll(-1, 1)
    targets[:, :5] = -1  # ignored positions
    out = m(x, targets=targets)
    with torch.no_grad():
        stages = m(x, return_stages=True).stage_logits
    expected = [F.cross_entropy(l.reshape(-1, 300), targets.reshape(-1), ignore_index=-1) for l in stages]
    assert torch.allclose(out.stage_losses.detach(), torch.stack(expected), atol=1e-6)
    assert out.loss.item() == pytest.approx(sum(e.item() for e in expected) / 3 ** (1 - alpha), rel=1e-6)


def test_residual_logop_loss_uses_running_product():
    m = tiny_model(poe_stage_layers=[2, 2], poe_mode="residual_logop")
    x = ids(length=32)
    t = x.roll(-1, 1)
    out = m(x, targets=t)
    with torch.no_grad():
        l0, l1 = m(x, return_stages=True).stage_logits
    score1 = (F.log_softmax(l0, -1) + F.log_softmax(l1, -1)) / 2
    ce1 = F.cross_entropy(score1.reshape(-1, 300), t.reshape(-1))
    assert out.stage_losses[1].item() == pytest.approx(ce1.item(), rel=1e-6)


def test_logop_combination():
    m = tiny_model(poe_stage_layers=[1, 1, 2]).eval()
    x = ids(length=16)
    with torch.no_grad():
        out = m(x, output="logop", return_stages=True)
    manual = sum(F.log_softmax(l, -1) for l in out.stage_logits) / 3
    assert torch.allclose(out.logits, F.log_softmax(manual, -1), atol=1e-6)
    assert torch.allclose(out.logits.exp().sum(-1), torch.ones(1, 16), atol=1e-5)
    one = logop([out.stage_logits[0]], alpha=0.0)
    assert torch.allclose(one, F.log_softmax(out.stage_logits[0], -1), atol=1e-6)


def test_stage_heads_are_additive_and_zero_initialised():
    m = tiny_model(poe_stage_heads=True, perturb=False)
    assert all(torch.all(h.weight == 0) for h in m.stage_heads.values())
    plain = PoEGPT(tiny_config())
    plain.init_weights(0)
    x = ids(length=16)
    assert torch.equal(m(x).logits, plain(x).logits)


@pytest.mark.parametrize("exit_stage", [None, 0])
@pytest.mark.parametrize("chunks", [[T], [150, 1, 1, 48], [1] * 20 + [180], [64, 64, 72]])
def test_cached_equals_uncached(chunks, exit_stage):
    m = tiny_model().eval()
    x = ids()
    with torch.no_grad():
        full = m(x, exit_stage=exit_stage).logits
        cache, parts, start = KVCache(), [], 0
        for n in chunks:
            parts.append(m(x[:, start:start + n], cache=cache, exit_stage=exit_stage).logits)
            start += n
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    assert cache.get_seq_length() == T


def test_cache_crop_rolls_back():
    m = tiny_model().eval()
    x = ids(length=40)
    with torch.no_grad():
        cache = KVCache()
        m(x[:, :30], cache=cache)
        m(x[:, 30:35], cache=cache)
        cache.crop(30)
        cache.prev_embedding = None  # the smear's predecessor must be restored by the caller
        ref_cache = KVCache()
        m(x[:, :30], cache=ref_cache)
        assert torch.equal(cache.keys[0], ref_cache.keys[0])


def test_sliding_window_limits_attention():
    # Layer 0 has a 128-token window: a token 129 positions back must not affect a 1-layer model.
    m = tiny_model(n_layer=2, poe_stage_layers=[1, 1], window_pattern="S")
    x = ids(batch=1, length=200)
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 300
    with torch.no_grad():
        a, b = m(x, exit_stage=0).logits, m(y, exit_stage=0).logits
    # Positions 10..10+128 see token 10 (the smear reaches position 11 as well); later ones do not.
    assert not torch.allclose(a[0, 138], b[0, 138])
    assert torch.allclose(a[0, 140:], b[0, 140:])


def test_old_nanochat_switches():
    m = tiny_model(smear=False, backout=False, value_embed_layers=[], window_pattern="L")
    names = set(m.state_dict())
    assert not any(n.startswith(("smear", "backout", "value_embeds")) or "ve_gate" in n for n in names)
    assert m(ids(length=16)).logits.shape == (2, 16, 300)


def test_param_table_sums_to_total():
    m = tiny_model(poe_stage_heads=True)
    rows = dict(m.param_table())
    assert sum(v for k, v in rows.items() if k != "total") == rows["total"] == m.num_params()
    assert math.isfinite(m(ids(length=8)).logits.sum().item())


def test_model_module_imports_only_torch():
    """One model definition: model.py and the pieces it is split into (layers, head, kvcache, init_plan) ship as
    remote code, so they may import torch, the standard library and each other, and their config only
    for type checking."""
    import ast
    from pathlib import Path

    import poelm.core.model

    pieces = {"model", "layers", "head", "kvcache", "init_plan"}
    allowed = {"torch", "torch.nn", "torch.nn.functional", "dataclasses", "typing", "__future__", "math"}
    for piece in pieces:
        tree = ast.parse((Path(poelm.core.model.__file__).parent / f"{piece}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert {a.name for a in node.names} <= allowed, (piece, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: another piece, or the config only under TYPE_CHECKING
                    assert node.module in pieces or (node.module == "config" and
                                                     [a.name for a in node.names] == ["PoEConfig"]), piece
                else:
                    assert node.module in allowed, (piece, node.module)


@pytest.mark.parametrize("mode, heads, chunk", [("flat", False, 7), ("flat", True, 64), ("none", False, 5),
                                                ("none", True, 10_000)])
def test_fused_head_loss_equals_plain_path(mode, heads, chunk):
    """The chunked, fused head + cross-entropy (fast path) against materialised logits (slow path)."""
    m = tiny_model(poe_stage_layers=[1, 1, 2], poe_mode=mode, poe_stage_heads=heads)
    if heads:
        with torch.no_grad():
            for h in m.stage_heads.values():
                h.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(2))
    x = ids(length=48)
    y = x.roll(-1, 1)
    y[0, :9] = -1
    results = []
    for fused in (True, False):
        m.zero_grad(set_to_none=True)
        out = m(x, targets=y, fused_loss=fused, loss_chunk=chunk, loss_reduction="sum")
        out.loss.backward()
        results.append((out.loss.detach(), out.stage_losses.detach(),
                        {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (l1, s1, g1), (l2, s2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-5) and torch.allclose(s1, s2, rtol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6, rtol=1e-4), name
    mean = m(x, targets=y, loss_chunk=chunk).loss
    assert torch.allclose(mean, l1 / (y >= 0).sum(), rtol=1e-5)


def test_document_masking_computes_each_document_alone():
    """Packed documents with doc_ids and restarted positions == each document run on its own."""
    m = tiny_model().eval()
    a, b = ids(batch=1, length=37, seed=1), ids(batch=1, length=50, seed=2)
    row = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 37 + [1] * 50])
    pos = torch.tensor([list(range(37)) + list(range(50))])
    with torch.no_grad():
        packed = m(row, doc_ids=doc, positions=pos, return_stages=True).stage_logits
        alone_a = m(a, return_stages=True).stage_logits
        alone_b = m(b, return_stages=True).stage_logits
        for k in range(2):
            assert torch.allclose(packed[k][:, :37], alone_a[k], atol=1e-5)
            assert torch.allclose(packed[k][:, 37:], alone_b[k], atol=1e-5)
        unmasked = m(row).logits
        assert not torch.allclose(unmasked[:, 37:], alone_b[1], atol=1e-3)  # without masking b sees a


@pytest.mark.parametrize("smear, backout, heads", [(True, True, False), (False, False, True), (True, False, True)])
@pytest.mark.parametrize("ve, stages, specialist", [
    (None, [2, 2], {}), ([], [1, 1, 2], {}), ([0, 2], [2, 2], dict(n_base_stages=1, stage_head=True)),
    (None, [1, 1, 2], dict(n_base_stages=1, stage_head=True, head_fold=True)),
])
def test_state_shapes_are_the_modules_state_dict(smear, backout, heads, ve, stages, specialist):
    """What a file is checked against before a model is built (`state_shapes`) is exactly what the module
    holds, for every switch: smear, backout, per-stage heads, value-embedding layers, a specialist's heads."""
    from poelm.core.model import state_shapes

    config = tiny_config(smear=smear, backout=backout, poe_stage_heads=heads, value_embed_layers=ve,
                         poe_stage_layers=stages, poe_backout_stages=None if backout else [], **specialist)
    with torch.device("meta"):
        module = PoEGPT(config).state_dict()
    assert dict(state_shapes(config)) == {k: tuple(v.shape) for k, v in module.items()}
