"""Self-speculative greedy decoding == plain greedy decoding of the full model, for several K and S."""

import pytest
import torch

from poelm.core.errors import PoelmError
from poelm.infer import SamplingParams
from poelm.infer.speculative import SpeculativeDecoder

from util import identity_deeper_model, tiny_model


def plain_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("stages, draft_stage, k", [([1, 1, 2], 0, 1), ([1, 1, 2], 0, 3), ([1, 1, 2], 1, 4),
                                                    ([2, 2], 0, 2), ([3, 1], 0, 5)])
def test_speculative_greedy_equals_plain_greedy(stages, draft_stage, k):
    model = tiny_model(poe_stage_layers=stages, window_pattern="SL").eval()
    prompt = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    want = plain_greedy(model, prompt, 40)
    dec = SpeculativeDecoder(model, draft_stage, k)
    got = dec.generate(prompt, SamplingParams(max_new_tokens=40))
    assert got == want
    s = dec.stats  # every token after the first comes from a round; a round emits at most k of them
    assert s.emitted == len(got) - 1 and s.rounds >= -(-(len(got) - 1) // k)
    assert s.accepted <= s.drafted <= s.rounds * k and s.acceptance == s.accepted / s.drafted


def test_a_draft_equal_to_the_model_accepts_everything():
    model = identity_deeper_model()
    dec = SpeculativeDecoder(model, 0, 4)
    prompt = [1, 2, 3, 4, 5]
    assert dec.generate(prompt, SamplingParams(max_new_tokens=21)) == plain_greedy(model, prompt, 21)
    assert dec.stats.acceptance == 1.0 and dec.stats.tokens_per_verification == 4.0


def test_bad_settings():
    model = tiny_model(poe_stage_layers=[2, 2])
    with pytest.raises(PoelmError, match="--draft-stage 1"):
        SpeculativeDecoder(model, 1, 2)
    with pytest.raises(PoelmError, match="--speculative 0"):
        SpeculativeDecoder(model, 0, 0)


def test_cli_speculative_matches_plain_greedy(trained_like_model_dir, capsys):
    from poelm.app.cli import main

    argv = ["generate", str(trained_like_model_dir), "--prompt", "def f(x):", "--max-new-tokens", "24"]
    assert main(argv) == 0
    plain = capsys.readouterr().out.strip()
    assert main(argv + ["--speculative", "3", "--draft-stage", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == plain and "acceptance" in out.err
    assert main(argv + ["--speculative", "3"]) == 2
    assert "needs --draft-stage" in capsys.readouterr().err
    assert main(argv + ["--speculative", "3", "--draft-stage", "0", "--temperature", "0.7"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "acceptance" in out.err and "24 tokens in" in out.err
    assert main(argv + ["--speculative", "3", "--draft-stage", "0", "--top-k", "5"]) == 2
    assert main(["chat", str(trained_like_model_dir), "--speculative", "2"]) == 2  # no --draft-stage


def test_chat_streams_with_each_mode(trained_like_model_dir, tmp_path, capsys, monkeypatch):
    import io
    import shutil

    from poelm.app.cli import main

    model_dir = tmp_path / "m"
    shutil.copytree(trained_like_model_dir, model_dir)
    (tmp_path / "c.txt").write_text("def add(a, b):\n    return a + b\n" * 30)
    assert main(["calibrate", str(model_dir), "--data", str(tmp_path / "c.txt"), "--max-tokens", "256"]) == 0
    for mode in (["--speculative", "2", "--draft-stage", "0"], ["--adaptive"], ["--exit-stage", "0"], []):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you?\n"))
        assert main(["chat", str(model_dir), "--max-new-tokens", "6", *mode]) == 0, mode
        out = capsys.readouterr()
        assert out.err.count("tokens in") == 2, out.err  # two turns, each streamed with its stats line


def test_speculative_sampling_rule_gives_the_target_distribution():
    """Draft d ~ q, accept with min(1, p/q), else resample from max(p - q, 0): the result is ~ p."""
    from poelm.infer.speculative import accept_or_resample

    p = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.07, 0.03])
    q = torch.tensor([0.10, 0.10, 0.30, 0.30, 0.15, 0.05])  # a poor draft: the rule must correct it
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(6)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    accepted = 0
    for d in drafts:
        ok, token = accept_or_resample(p, q, d, g)
        counts[token] += 1
        accepted += ok
    tv = 0.5 * (counts / n - p).abs().sum().item()
    assert tv < 0.015, tv
    assert 0.5 * (q - p).abs().sum().item() > 0.3  # the test has power: sampling q alone would fail it
    expected_acceptance = torch.minimum(p, q).sum().item()  # P(accept) = sum_x min(p, q)
    assert abs(accepted / n - expected_acceptance) < 0.015


def test_speculative_sampling_end_to_end_is_seeded():
    model = tiny_model(poe_stage_layers=[1, 1, 2]).eval()
    prompt = [5, 6, 7, 8]
    runs = [SpeculativeDecoder(model, 0, 3).generate(prompt, SamplingParams(max_new_tokens=20, temperature=1.0, seed=s)) for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert len(runs[0]) == 20


def test_speculative_sampling_matches_the_full_models_distribution():
    """End to end on a tiny vocabulary: the joint law of two sampled tokens (the second drafted by a
    very different stage 0 and corrected by the rule) equals the full model's, computed exactly."""
    from poelm.core.config import PoEConfig
    from poelm.core.model import PoEGPT
    from util import perturb_

    m = PoEGPT(PoEConfig(vocab_size=8, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, sequence_len=64,
                         poe_stage_layers=[1, 1], pad_vocab_to=8))
    m.init_weights(0)
    perturb_(m, seed=4, scale=1.0).eval()
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = torch.softmax(m(torch.tensor([prompt])).logits[0, -1], -1)
        exact, draft_only = torch.zeros(8, 8), torch.zeros(8, 8)
        for t in range(8):
            x = torch.tensor([prompt + [t]])
            exact[t] = p1[t] * torch.softmax(m(x).logits[0, -1], -1)
            draft_only[t] = p1[t] * torch.softmax(m(x, exit_stage=0).logits[0, -1], -1)
    n = 2000
    counts = torch.zeros(8, 8)
    for seed in range(n):
        a, b = SpeculativeDecoder(m, 0, 1).generate(prompt, SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed))
        counts[a, b] += 1
    assert 0.5 * (draft_only - exact).abs().sum() > 0.5  # the draft alone is far from the target
    assert 0.5 * (counts / n - exact).abs().sum() < 0.05
