"""Rows of a base and of its specialists in one batch (poelm/infer/fleet.py): each row equals its model
decoding alone, the layers the models hold in common run once per step over all their rows, the cache
keeps one tensor per layer across models, and what cannot share a batch is refused."""

from __future__ import annotations

import random

import pytest
import torch

from poelm.core.errors import PoelmError
from poelm.infer.cache import BatchKVCache
from poelm.infer import Engine, SamplingParams
from poelm.infer.batch import Batch
from poelm.infer.fleet import Fleet, share_parameters
from poelm.models.specialist import grow, specialist_parameter_names

from util import tiny_model

CHANGED_ROWS = (5, 6)  # embedding rows the specialists change (as chat tokens' rows are)


@torch.no_grad()
def specialist(parent, n_layers: int, seed: int, rows=CHANGED_ROWS):
    """`parent` + a stage of `n_layers` blocks whose own weights, lambdas, head and a few embedding rows
    are moved off their init (what training a specialist leaves)."""
    model = grow(parent, n_layers, seed)
    g = torch.Generator().manual_seed(seed)
    for name in specialist_parameter_names(model):
        p = model.get_parameter(name)
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    first = model.config.n_layer - n_layers
    model.resid_lambdas[first:] += 0.1 * torch.rand(n_layers, generator=g)
    model.x0_lambdas[first:] += 0.1 * torch.rand(n_layers, generator=g)
    model.transformer.wte.weight[list(rows)] += torch.randn(len(rows), model.config.n_embd, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    """base (4 layers, stages 2+2), A and B on the base (1 and 2 blocks), C stacked on A; loaded one
    after another with their common tensors held once, as the server loads them."""
    base = tiny_model().eval()
    a = specialist(base, 1, seed=11)
    b = specialist(base, 2, seed=12, rows=(5,))
    c = specialist(a, 1, seed=13, rows=())
    held: dict = {}
    for m in (base, a, b, c):
        share_parameters(m, held)
    return {"base": base, "A": a, "B": b, "C": c}


def routes_of(fleet, models):
    """(model name, exit stage, output) of every route the test decodes."""
    return [("base", None, None), ("base", 0, None), ("base", None, "logop"), ("A", None, None),
            ("A", None, "logop"), ("A", 1, None), ("B", None, None), ("C", None, None), ("C", 2, "logop")]


def test_layers_are_shared_by_storage_and_paths_branch_where_models_part(models):
    fleet = Fleet(list(models.values()))
    base, a, b, c = (fleet.route(models[n]) for n in ("base", "A", "B", "C"))
    assert base.path == a.path[:4] == b.path[:4] == c.path[:4]  # the base's four layers: one identity
    assert a.path[4] == c.path[4] != b.path[4]  # C grew from A: A's block is its own too
    assert len({a.path[4], b.path[4], b.path[5], c.path[5]}) == 4  # every other block is its own
    assert fleet.route(models["A"]) is fleet.route(models["A"], None, "last")  # one object per route
    # equal tensors that are not one storage are not one layer: sharing is by construction, not by luck
    twin = specialist(models["base"], 1, seed=11)  # A's values, in tensors of its own
    fleet.join(twin)
    assert not set(fleet.route(twin).path) & set(a.path)


def decode_alone(model, prompt, params, exit_stage, output):
    return Engine(model, stop_ids=set(), exit_stage=exit_stage, output=output).generate(prompt, params)


def test_a_mixed_batch_with_rows_joining_at_random_steps_gives_each_row_what_its_model_gives_alone(models):
    """Rows of every route (base, two specialists, one stacked on another; exit stages; both predictors),
    greedy and seeded sampling, prompts with the specialists' changed embedding rows, one longer than the
    sliding window and one at the context limit, joining at random steps, each = its model alone."""
    fleet = Fleet(list(models.values()))
    batch = Batch(fleet)
    rng = random.Random(0)
    limit = models["base"].config.sequence_len
    requests = []
    for i, (name, stage, output) in enumerate(routes_of(fleet, models) * 2):
        n = [3, 17, 150, 1][i % 4] if i != 5 else limit - 2  # 150 > the 128-token window; one at the limit
        prompt = [rng.randrange(models[name].config.vocab_size) for _ in range(n)]
        prompt[n // 2] = CHANGED_ROWS[i % 2]
        params = SamplingParams(max_new_tokens=rng.randint(2, 7), temperature=0.0 if i % 3 else 0.9,
                                top_p=None if i % 3 else 0.9, seed=i)
        requests.append((rng.randint(0, 6), name, stage, output, prompt, params))
    rows, step = [], 0
    while len(rows) < len(requests) or len(batch):
        for when, name, stage, output, prompt, params in requests:
            if when == step:
                rows.append((batch.add(prompt, params, frozenset(), fleet.route(models[name], stage, output)),
                             name, stage, output, prompt, params))
        batch.step()
        step += 1
        assert [r.route.key for r in batch.rows] == sorted(r.route.key for r in batch.rows)
    for row, name, stage, output, prompt, params in rows:
        assert row.tokens == decode_alone(models[name], prompt, params, stage, output), (name, stage, output)
    assert {r.route.model for r, *_ in rows} == set(models.values())


@torch.no_grad()
def test_a_mixed_prefill_scores_equal_each_models_uncached_forward(models):
    """The slow path: one left-padded mixed prefill against each model's own forward, no cache, no batch."""
    fleet = Fleet(list(models.values()))
    g = torch.Generator().manual_seed(3)
    cases = [(name, stage, output, torch.randint(0, 300, (n,), generator=g).tolist())
             for (name, stage, output), n in zip(routes_of(fleet, models), [9, 3, 20, 1, 140, 7, 12, 5, 31])]
    routes = [fleet.route(models[n], s, o) for n, s, o, _ in cases]
    order = sorted(range(len(cases)), key=lambda i: routes[i].key)
    T = max(len(p) for *_, p in cases)
    ids = torch.zeros(len(cases), T, dtype=torch.long)
    mask = torch.zeros(len(cases), T, dtype=torch.bool)
    for row, i in enumerate(order):
        prompt = cases[i][3]
        ids[row, T - len(prompt):], mask[row, T - len(prompt):] = torch.tensor(prompt), True
    scores = fleet.forward(ids, BatchKVCache(), [routes[i] for i in order], attention_mask=mask)
    for row, i in enumerate(order):
        name, stage, output, prompt = cases[i]
        alone = models[name](torch.tensor([prompt]), exit_stage=stage, output=output).logits[0, -1]
        torch.testing.assert_close(scores[row], alone, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_common_layers_run_once_per_forward_over_every_row_that_shares_them(models):
    fleet = Fleet(list(models.values()))
    calls: dict[int, list[int]] = {}
    hooks = [block.register_forward_hook(lambda mod, args, out, i=i: calls.setdefault(i, []).append(out.size(0)))
             for m in models.values() for i, block in enumerate(m.transformer.h)]
    try:
        names = ["base", "A", "A", "B", "C", "C", "C"]
        routes = sorted((fleet.route(models[n]) for n in names), key=lambda r: r.key)
        fleet.forward(torch.randint(0, 300, (len(names), 4)), BatchKVCache(), routes)
    finally:
        for h in hooks:
            h.remove()
    assert {i: sorted(n) for i, n in calls.items()} == {
        0: [7], 1: [7], 2: [7], 3: [7],  # the base's layers: one call over all 7 rows
        4: [1, 5],  # B's first block (1 row), A's block for A and C (5 rows)
        5: [1, 3]}  # B's second block, C's own block


@torch.no_grad()
def test_the_cache_keeps_one_tensor_per_layer_and_drops_a_layer_no_row_runs(models):
    fleet = Fleet(list(models.values()))
    batch = Batch(fleet)
    batch.add([1, 2, 3, 4], SamplingParams(max_new_tokens=8), frozenset(), fleet.route(models["base"]))
    batch.step()
    assert sorted(batch.cache.keys) == [0, 1, 2, 3]
    b_row = batch.add([7, 5, 9], SamplingParams(max_new_tokens=8), frozenset(), fleet.route(models["B"]))
    batch.step()  # B's rows join: the base row gains zeros in B's layers, B's row its real keys
    assert sorted(batch.cache.keys) == [0, 1, 2, 3, 4, 5]
    k = batch.cache.keys[5]
    assert k.size(0) == 2 and torch.count_nonzero(k[0]) == 0 and torch.count_nonzero(k[1]) > 0
    batch.cancel(b_row)
    batch.step()
    assert sorted(batch.cache.keys) == [0, 1, 2, 3]  # no row runs layers 4, 5 any more


def test_what_cannot_share_a_batch_is_refused_with_the_reason(models):
    fleet = Fleet([models["base"]])
    other = tiny_model(seed=5).eval()  # another base: other smear weights
    with pytest.raises(PoelmError, match="smear"):
        fleet.join(other)
    with pytest.raises(PoelmError, match="sequence_len"):
        fleet.join(tiny_model(sequence_len=256).eval())
    with pytest.raises(PoelmError, match="not in this fleet"):
        fleet.route(models["A"])
    with pytest.raises(PoelmError, match="stages 0..1"):
        fleet.route(models["base"], 2)
    fleet.join(models["A"])
    unsorted = [fleet.route(models["A"]), fleet.route(models["base"])]
    with pytest.raises(ValueError, match="sorted"):
        fleet.forward(torch.zeros(2, 1, dtype=torch.long), BatchKVCache(), unsorted)
    with pytest.raises(ValueError, match="no default route"):
        Batch(fleet).add([1], SamplingParams(), frozenset())


@torch.no_grad()
def test_a_specialist_shares_the_base_embedding_table_keeping_only_its_changed_rows():
    base = tiny_model().eval()
    spec = specialist(base, 1, seed=21)
    ids = torch.tensor([[1, 5, 9, 6, 6, 200]])  # changed rows 5 and 6 among unchanged ones
    before, table = spec(ids).logits, spec.state_dict()["transformer.wte.weight"].clone()
    held = {name: p.data for name, p in base.named_parameters()}
    freed = share_parameters(spec, held)
    assert spec.transformer.wte.weight.data_ptr() == base.transformer.wte.weight.data_ptr()
    assert spec.own_row_ids.tolist() == list(CHANGED_ROWS) and spec.own_row_values.shape == (2, 64)
    assert freed >= (320 - 2) * 64 * 4  # the table less its own rows, plus every shared block
    assert torch.equal(spec(ids).logits, before)  # exactly what it computed with its own table
    assert torch.equal(spec.state_dict()["transformer.wte.weight"], table)  # and it still saves its own
    assert not torch.equal(base.state_dict()["transformer.wte.weight"], table)
    with pytest.raises(ValueError, match="already shares"):
        spec.share_embedding(base.transformer.wte.weight.data)
    with pytest.raises(ValueError, match="table"):
        tiny_model().share_embedding(torch.zeros(10, 64))
    stranger = tiny_model(seed=9)  # another base: every row differs, nothing is shared
    share_parameters(stranger, held)
    assert stranger.own_row_ids is None
    assert stranger.transformer.wte.weight.data_ptr() != base.transformer.wte.weight.data_ptr()
