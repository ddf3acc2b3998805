"""Every decoder at the edges, each against a slower path that must agree with it.

Sliding windows shorter than the sequence (so they mask), prompts of every length up to the context
limit, both predictors (`poe_output` "last" and "logop"), K larger than the tokens left, a stop token
inside an accepted draft; adaptive depth's deferred keys and values against a full forward's cache;
the smear's previous embedding after a rollback; the speculative sampling chain with K > 1 against
the full model's exact joint law; composition against the siblings run one by one; and one request
check for every decoder. The audit findings these guard are named in each test (issue 9, #3-#6, #9).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from poelm.core.config import PoEConfig
from poelm.core.errors import PoelmError
from poelm.infer.adaptive import AdaptiveDecoder
from poelm.infer.engine import Engine
from poelm.infer.sampling import SamplingParams
from poelm.infer.speculative import SpeculativeDecoder
from poelm.core.model import KVCache, PoEGPT

from util import identity_deeper_model, perturb_, tiny_model

SEQ = 64
WINDOWS = [8, SEQ, 16, SEQ]  # layers 0 and 2 see 8 and 16 tokens back: every prompt past 16 is masked


def masking_model(output: str = "last", stages=(1, 1, 2), seed: int = 0) -> PoEGPT:
    return tiny_model(seed=seed, sequence_len=SEQ, layer_windows=WINDOWS, poe_stage_layers=list(stages),
                      poe_output=output).eval()


def prompt_of(length: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def uncached_greedy(model: PoEGPT, prompt: list[int], n: int, **kw) -> list[int]:
    """The slow reference: a full forward over the whole sequence for every new token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]), **kw).logits[0, -1].argmax()))
    return seq[len(prompt):]


def engine_greedy(model: PoEGPT, prompt: list[int], n: int, output: str | None = None, stop=()) -> list[int]:
    return Engine(model, stop_ids=set(stop), output=output).generate(prompt, SamplingParams(max_new_tokens=n))


def test_windows_mask_in_these_tests():
    """The windows really cut attention: a token 20 back changes layer 0's output only via deeper layers."""
    model = masking_model()
    assert min(model.config.layer_windows) < 20 < SEQ
    x = torch.tensor([prompt_of(40)])
    y = x.clone()
    y[0, 5] = (y[0, 5] + 1) % 300  # 34 positions before the last one: outside the 8- and 16-token windows
    with torch.no_grad():
        walk_x = model.run_layers(model.begin(x), 1)
        walk_y = model.run_layers(model.begin(y), 1)
    assert torch.equal(walk_x.x[0, -1], walk_y.x[0, -1])  # layer 0 (window 8) does not see it
    assert not torch.equal(model(x).logits[0, -1], model(y).logits[0, -1])  # the full model does


@pytest.mark.parametrize("output", ["last", "logop"])
def test_engine_equals_uncached_at_every_prompt_length(output):
    model = masking_model(output)
    for length in (1, 9, 17, 40, 62, SEQ - 1):
        prompt = prompt_of(length, seed=length)
        got = engine_greedy(model, prompt, 100)
        assert len(got) == SEQ - length  # stops where prompt + output reaches sequence_len
        assert got == uncached_greedy(model, prompt, SEQ - length), length


@pytest.mark.parametrize("output", ["last", "logop"])
@pytest.mark.parametrize("stages, draft", [((1, 1, 2), 0), ((1, 1, 2), 1), ((2, 2), 0)])
def test_speculative_equals_engine_up_to_the_context_limit(output, stages, draft):
    """Issue 9 #3 and #4: every prompt length up to sequence_len, K from 1 past the budget, both predictors."""
    model = masking_model(output, stages)
    for length in (1, 17, 50, 60, SEQ - 1):
        prompt = prompt_of(length, seed=length)
        want = engine_greedy(model, prompt, 100)
        for k in (1, 4, 14):
            dec = SpeculativeDecoder(model, draft, k)
            assert dec.generate(prompt, SamplingParams(max_new_tokens=100)) == want, (length, k)
            assert dec.stats.drafted >= dec.stats.accepted and dec.stats.emitted == len(want) - 1


def test_speculative_near_the_limit_as_audited():
    """Issue 9 #3: sequence_len 64, a 50-token prompt, 100 new tokens: 14 tokens, as plain greedy."""
    model = masking_model()
    prompt = prompt_of(50, seed=3)
    want = uncached_greedy(model, prompt, 14)
    for k in (1, 4, 14):
        assert SpeculativeDecoder(model, 0, k).generate(prompt, SamplingParams(max_new_tokens=100)) == want


def test_speculative_budget_smaller_than_k():
    model = masking_model()
    prompt = prompt_of(12, seed=1)
    for n in (1, 2, 3, 5):
        assert SpeculativeDecoder(model, 0, 6).generate(prompt, SamplingParams(max_new_tokens=n)) == engine_greedy(model, prompt, n)


def test_speculative_logop_first_token_and_later_tokens_agree():
    """Issue 9 #4: with poe_output="logop" the verified tokens are the Log-OP's too, not the last stage's."""
    model = masking_model("logop")
    prompt = prompt_of(20, seed=7)
    assert SpeculativeDecoder(model, 0, 3).generate(prompt, SamplingParams(max_new_tokens=30)) == uncached_greedy(model, prompt, 30)


def test_every_decoder_decodes_the_predictor_it_is_asked_for():
    model = masking_model("logop")
    prompt = prompt_of(20, seed=7)
    logop = engine_greedy(model, prompt, 30)
    last = engine_greedy(model, prompt, 30, output="last")
    assert logop != last  # the two predictors really differ on this model
    assert last == uncached_greedy(model, prompt, 30, output="last")
    assert SpeculativeDecoder(model, 0, 3).generate(prompt, SamplingParams(max_new_tokens=30)) == logop
    assert SpeculativeDecoder(model, 0, 3, output="last").generate(prompt, SamplingParams(max_new_tokens=30)) == last
    assert AdaptiveDecoder(model, [math.inf] * 3).generate(prompt, SamplingParams(max_new_tokens=30)) == logop


def test_stop_token_inside_an_accepted_draft():
    model = identity_deeper_model(sequence_len=SEQ, layer_windows=WINDOWS)
    prompt = prompt_of(10, seed=2)
    free = engine_greedy(model, prompt, 20)
    stop = free[4]  # emitted inside the first round of 6 accepted drafts
    want = free[: free.index(stop) + 1]
    dec = SpeculativeDecoder(model, 0, 6, stop_ids={stop})
    assert dec.generate(prompt, SamplingParams(max_new_tokens=20)) == want == engine_greedy(model, prompt, 20, stop=[stop])
    assert dec.stats.acceptance == 1.0 and dec.stats.rounds == 1


@pytest.mark.parametrize("stages", [(1, 1, 2), (2, 2), (1, 3)])
def test_adaptive_infinite_bounds_is_engine_logop_at_every_length(stages):
    model = masking_model("last", stages)
    for length in (1, 17, 50, SEQ - 1):
        prompt = prompt_of(length, seed=length)
        want = engine_greedy(model, prompt, 100, output="logop")
        dec = AdaptiveDecoder(model, [math.inf] * len(stages))
        assert dec.generate(prompt, SamplingParams(max_new_tokens=100)) == want, length
        assert sum(dec.stats.exits[:-1]) == 0


def test_adaptive_refuses_the_last_stage_predictor():
    with pytest.raises(PoelmError, match="Log-OP"):
        AdaptiveDecoder(masking_model(), [0.0, 0.0, 0.0], output="last")


def test_adaptive_deferred_keys_and_values_equal_a_full_forward():
    """Tokens exit at every stage; the pending ones are filled later in blocks. Every layer's keys AND
    values, over prompt and output, equal one full forward's, with windows that mask; a flush fills
    every layer with every position."""
    model = masking_model("logop", (1, 1, 2))
    prompt = prompt_of(24, seed=5)
    for bound in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0):
        dec = AdaptiveDecoder(model, [0.0, bound, bound])
        batch = dec.batch()
        row = batch.add(prompt, SamplingParams(max_new_tokens=SEQ), frozenset())
        for _ in range(SEQ - len(prompt) - 1):  # the prefill's token, then steps up to one short of the limit
            batch.step()
        if all(n > 0 for n in dec.stats.exits) and batch.pending:
            break
    else:
        pytest.fail(f"no bound gave exits at every stage and a pending position: {dec.stats.exits}")
    assert not row.done
    inputs, cache, pending = prompt + row.tokens[:-1], batch.cache, batch.pending  # the last token is not fed
    ref = KVCache()
    with torch.no_grad():
        model(torch.tensor([inputs]), cache=ref)
    for layer in range(model.config.n_layer):
        n = cache.get_seq_length(layer)
        assert n >= len(prompt) and (layer == 0 or n < len(inputs) or not pending)
        assert n == len(inputs) or layer > 0  # layer 0 always runs for every token
        torch.testing.assert_close(cache.keys[layer], ref.keys[layer][:, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.values[layer], ref.values[layer][:, :, :n], rtol=1e-5, atol=1e-5)
    # The tokens still pending are exactly the ones missing from the deepest layer's cache.
    assert cache.get_seq_length(model.config.n_layer - 1) + len(pending) == len(inputs)
    batch._flush()  # what happens before rows join or leave
    assert not batch.pending
    for layer in range(model.config.n_layer):
        torch.testing.assert_close(cache.keys[layer], ref.keys[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.values[layer], ref.values[layer], rtol=1e-5, atol=1e-5)


def test_rollback_restores_the_smears_previous_embedding():
    """After feeding A+B and rolling back to A, feeding C gives the logits of an uncached A+C."""
    model = masking_model()
    assert model.config.smear
    a, b, c = prompt_of(20, 1), prompt_of(5, 2), prompt_of(4, 3)
    assert b[-1] != a[-1]
    with torch.no_grad():
        want = model(torch.tensor([a + c])).logits[0, -len(c):]
        cache = KVCache()
        model(torch.tensor([a + b]), cache=cache)
        model.rollback(cache, len(a), a[-1])
        assert cache.get_seq_length(0) == len(a) and cache.get_seq_length(3) == len(a)
        got = model(torch.tensor([c]), cache=cache).logits[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        stale = KVCache()  # cropping alone leaves B's last embedding for the smear: wrong
        model(torch.tensor([a + b]), cache=stale)
        stale.crop(len(a))
        assert (model(torch.tensor([c]), cache=stale).logits[0, 0] - want[0]).abs().max() > 1e-3


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness of fit, cells expected below `min_expected` pooled into one."""
    n = counts.sum()
    expected, observed = probs.flatten() * n, counts.flatten()
    small = expected < min_expected
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


def test_speculative_sampling_chain_with_k_above_one_has_the_joint_law():
    """K = 2 drafts from a poor stage 0 (the rule and the residual resampling at both positions, and
    rounds ending early on a rejection): the joint law of three sampled tokens equals the full
    model's, computed exactly from its conditionals — chi-square goodness of fit over 3,000 runs
    (p > 0.001; drawing from the draft alone gives p ~ 0). The runs are the rows of one batch, seeds
    0..2999: each row's tokens and draws are its own, what `generate` gives it alone (test_batching)."""
    V = 3
    m = PoEGPT(PoEConfig(vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, sequence_len=16,
                         poe_stage_layers=[1, 1], pad_vocab_to=4))
    m.init_weights(0)
    perturb_(m, seed=4, scale=1.0).eval()
    prompt = [1, 2, 0]
    with torch.no_grad():
        def law(seq, **kw):
            return torch.softmax(m(torch.tensor([seq]), **kw).logits[0, -1].double(), -1)

        exact, draft = torch.zeros(V, V, V, dtype=torch.float64), torch.zeros(V, V, V, dtype=torch.float64)
        p1 = law(prompt)
        for a in range(V):
            p2, q2 = law(prompt + [a]), law(prompt + [a], exit_stage=0)
            for b in range(V):
                exact[a, b] = p1[a] * p2[b] * law(prompt + [a, b])
                draft[a, b] = p1[a] * q2[b] * law(prompt + [a, b], exit_stage=0)
    n = 3000
    counts = torch.zeros(V, V, V, dtype=torch.float64)
    dec = SpeculativeDecoder(m, 0, 2)  # its stats accumulate over the runs
    runs = dec.generate_batch([prompt] * n, [SamplingParams(max_new_tokens=3, temperature=1.0, seed=seed)
                                             for seed in range(n)])
    for a, b, c in runs:
        counts[a, b, c] += 1
    assert dec.stats.rounds > n * 1.1  # rounds do end early on a rejection (both branches are exercised)
    assert 0.5 * (draft - exact).abs().sum() > 0.2  # the draft alone is far from the target...
    assert chi_square_p_value(counts, draft) < 1e-9  # ...and the test would see it
    assert chi_square_p_value(counts, exact) > 1e-3
    assert 0.5 * (counts / n - exact).abs().sum() < 0.05


# ---- composition --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def siblings(tmp_path_factory, tiny_tokenizer):
    """A base and two siblings whose chat-token embedding rows differ (one trained them)."""
    from poelm.models.directory import save_model_dir
    from poelm.models.specialist import attach, save_specialist

    root = tmp_path_factory.mktemp("siblings")
    base = PoEGPT(PoEConfig(vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, sequence_len=128,
                            poe_stage_layers=[2, 2], layer_windows=[16, 128, 16, 128]))
    base.init_weights(0)
    base_dir = save_model_dir(perturb_(base, seed=2, scale=0.1), root / "base", tiny_tokenizer)
    dirs = []
    for i, name in enumerate(("code", "chat")):
        model, info = attach(base_dir, 1 + i, seed=i + 1)
        with torch.no_grad():
            perturb_(model, seed=10 + i, scale=0.02)  # move everything, then restore the parent's part
            parent = PoEGPT(base.config)
            parent.load_state_dict(base.state_dict())
            for pname, value in parent.state_dict().items():
                if pname not in ("resid_lambdas", "x0_lambdas", "transformer.wte.weight"):
                    model.state_dict()[pname].copy_(value)
            P = base.config.n_layer
            model.resid_lambdas[:P] = parent.resid_lambdas
            model.x0_lambdas[:P] = parent.x0_lambdas
            wte = model.transformer.wte.weight
            rows = torch.tensor(info["chat_rows"])
            keep = torch.ones(wte.size(0), dtype=torch.bool)
            keep[rows] = False
            wte[keep] = parent.transformer.wte.weight[keep]  # only the chat rows differ from the parent
        dirs.append(save_specialist(model, base_dir, root / name, name))
    return dirs, tiny_tokenizer


def composition_reference(models, weights, ids, output=None):
    with torch.no_grad():
        score = sum(w * F.log_softmax(m(ids, output=output).logits, -1) for w, m in zip(weights, models))
    return F.log_softmax(score, -1)


def test_composition_equals_the_siblings_run_one_by_one(siblings):
    """Issue 9 #5: each sibling sees its own chat-token rows; the composition is the weighted Log-OP
    of the siblings run alone, on inputs with and without chat tokens."""
    from poelm.infer.compose import Composition
    from poelm import models

    dirs, tok = siblings
    comp = Composition(dirs, [1.0, 0.5])
    a, b = (models.open(d).model() for d in dirs)
    chat_rows = torch.tensor(sorted(set(tok.special_ids.values()) - {tok.bos_id}))
    assert not torch.equal(a.transformer.wte.weight[chat_rows], b.transformer.wte.weight[chat_rows])
    chat = torch.tensor([tok.render_prompt([{"role": "user", "content": "def add(a, b): return a + b\n" * 4}])])
    plain = torch.tensor([[tok.bos_id] + tok.encode("the model of the stage " * 8)])
    assert min(chat.size(1), plain.size(1)) > 2 * 16  # the 16-token windows mask
    for ids in (chat, plain):
        torch.testing.assert_close(comp.log_probs(ids), composition_reference((a, b), [1.0, 0.5], ids),
                                   rtol=1e-5, atol=1e-5)


def test_composition_of_each_predictor_and_its_trunk_sharing(siblings):
    """With poe_output "logop" each sibling contributes its own Log-OP; siblings with other chat rows
    are two trunk groups, and an input without those ids runs one trunk for both."""
    from poelm.infer.compose import Composition
    from poelm import models

    dirs, tok = siblings
    comp = Composition(dirs, [0.7, 1.3], output="logop")
    loaded = [models.open(d).model() for d in dirs]
    assert len(comp.groups) == 2 and len(comp.differing) == 8  # the eight chat tokens' rows
    chat = torch.tensor([tok.render_prompt([{"role": "user", "content": "hello there, the model " * 6}])])
    plain = torch.tensor([[tok.bos_id] + tok.encode("the model of the stage " * 8)])
    for ids in (chat, plain):
        torch.testing.assert_close(comp.log_probs(ids), composition_reference(loaded, [0.7, 1.3], ids, "logop"),
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(comp.log_probs(chat), Composition(dirs, [0.7, 1.3]).log_probs(chat), atol=1e-4)


def test_composed_decoding_follows_the_composition(siblings):
    from poelm.infer.compose import ComposedDecoder, Composition

    dirs, tok = siblings
    comp = Composition(dirs, [1.0, 0.5])
    prompt = tok.render_prompt([{"role": "user", "content": "hello"}])
    got = ComposedDecoder(comp, stop_ids=set()).generate(prompt, SamplingParams(max_new_tokens=6))
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(comp.log_probs(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]


# ---- one request check for every decoder (issue 9 #6) -----------------------------------------------

@pytest.mark.parametrize("mode", ["engine", "speculative", "adaptive", "compose"])
def test_every_decoder_checks_its_request(mode, siblings):
    from poelm.infer.compose import ComposedDecoder, Composition
    from poelm import models

    dirs, _ = siblings
    model = models.open(dirs[0]).model()
    config = model.config
    if mode == "engine":
        run = lambda ids, n: Engine(model, stop_ids=set()).generate(ids, _Params(n))  # noqa: E731
    if mode == "speculative":
        run = lambda ids, n: SpeculativeDecoder(model, 0, 2).generate(ids, _Params(n))  # noqa: E731
    if mode == "adaptive":
        run = lambda ids, n: AdaptiveDecoder(model, [0.0] * config.n_stages).generate(ids, _Params(n))  # noqa: E731
    if mode == "compose":
        comp = Composition(dirs[:1])
        run = lambda ids, n: ComposedDecoder(comp, stop_ids=set()).generate(ids, _Params(n))  # noqa: E731
    ok = [5, 6, 7]
    for ids, n, message in (([5, config.vocab_size], 4, "not in \\[0, 512\\)"), ([5, -1], 4, "not in"),
                            ([], 4, "no tokens"), (list(range(config.sequence_len)), 4, "sequence_len"),
                            (ok, 0, "max_new_tokens")):
        with pytest.raises(PoelmError, match=message):
            run(ids, n)
    assert len(run(ok, 3)) == 3


class _Params:
    """Greedy SamplingParams without its own check, so the decoder's request check is what answers."""

    def __init__(self, n: int):
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = n, 0.0, None, None
        self.repetition_penalty, self.seed = 1.0, 0


# ---- bfloat16 (issue 9 #9) ------------------------------------------------------------------------

def test_bfloat16_speculative_parts_from_the_engine_only_at_near_ties():
    """The promise in bfloat16: every emitted token is the full model's argmax over a k-row block;
    where the output parts from the engine's one-row decoding, the engine's top two logits at that
    position are within bfloat16 rounding of each other (the two pick different sides of a near-tie).
    In float32 the same prompts decode identically."""
    from poelm.infer.speculative import compare_with_engine

    model = masking_model("last", (1, 1, 2), seed=3)
    prompts = [prompt_of(n, seed=n) for n in (3, 9, 20, 33)]
    exact = compare_with_engine(model, prompts, 24, draft_stage=0, k=4)
    assert exact.identical == len(prompts) and exact.divergences == []
    bf16 = compare_with_engine(model.to(torch.bfloat16), prompts, 24, draft_stage=0, k=4)
    assert bf16.prompts == len(prompts) and bf16.identical + len(bf16.divergences) == len(prompts)
    for d in bf16.divergences:
        assert d.engine_margin <= 0.25, d  # a few bfloat16 ulps of a logit near the softcap (2**-4 at 8..16)


# ---- one factory from a mode spec -------------------------------------------------------------------

@pytest.mark.parametrize("mode, message", [
    (dict(speculative=2, draft_stage=0, adaptive=True), "choose one of"),
    (dict(adaptive=True, compose=("x",)), "choose one of"),
    (dict(draft_stage=0), "--draft-stage goes with --speculative"),
    (dict(speculative=2), "needs --draft-stage"),
    (dict(exit_stage=0, adaptive=True), "--exit-stage decodes one stage"),
    (dict(adaptive=True, output="last"), "drop --poe-output last"),
    (dict(compose_weights=(1.0,)), "--compose-weights goes with --compose"),
    (dict(output="mean"), "output='mean'"),
])
def test_decode_mode_rules(mode, message):
    from poelm.infer import DecodeMode

    with pytest.raises(PoelmError, match=message):
        DecodeMode(**mode).check()


def test_decode_mode_sampling_rules_and_factory(tmp_path):
    """Which sampling settings each decoder takes is checked before a model exists; the factory
    builds the decoder the mode names, with the stage numbers checked against the model."""
    from poelm.infer import DecodeMode, make_decoder
    from poelm.infer.adaptive import save_calibration

    top_k = SamplingParams(temperature=0.7, top_k=5)
    DecodeMode().check(top_k)
    DecodeMode(exit_stage=0).check(top_k)
    DecodeMode(speculative=2, draft_stage=0).check(SamplingParams(temperature=0.7))
    with pytest.raises(PoelmError, match="takes --temperature only"):
        DecodeMode(speculative=2, draft_stage=0).check(top_k)
    with pytest.raises(PoelmError, match="greedily"):
        DecodeMode(adaptive=True).check(SamplingParams(temperature=0.7))
    model = masking_model()
    save_calibration(tmp_path, [0.0, 1.0, 1.0], 99.0, 10)
    built = {name: make_decoder(model, mode, stop_ids=set(), model_dir=tmp_path) for name, mode in {
        "Engine": DecodeMode(exit_stage=1), "SpeculativeDecoder": DecodeMode(speculative=3, draft_stage=1),
        "AdaptiveDecoder": DecodeMode(adaptive=True)}.items()}
    assert {name: type(d).__name__ for name, d in built.items()} == {n: n for n in built}
    assert built["Engine"].exit_stage == 1 and built["SpeculativeDecoder"].k == 3
    prompt = prompt_of(9)
    assert built["Engine"].generate(prompt, SamplingParams(max_new_tokens=5)) == \
        uncached_greedy(model, prompt, 5, exit_stage=1)
    with pytest.raises(PoelmError, match="exit stage 3 out of range"):
        make_decoder(model, DecodeMode(exit_stage=3))
    with pytest.raises(PoelmError, match="--draft-stage 2"):
        make_decoder(model, DecodeMode(speculative=2, draft_stage=2))
