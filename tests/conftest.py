"""Shared pytest fixtures and settings. Keep each one small, deterministic, CPU-only and documented here.

- `tiny_tokenizer` (session): a poelm Tokenizer, vocab 512 (503 BPE tokens + 9 specials, so
  <|bos|> = 503), trained on a fixed generated corpus; identical on every run.
- `tiny_tokenizer_dir` (session): a tokenizer directory written by `save_tokenizer_dir` for it
  (AutoTokenizer-loadable with trust_remote_code=True; no model files).
"""

from __future__ import annotations

import os
import random

# Tiny models run fastest on one thread: with two OpenMP threads on a 2-core machine each small matmul
# can wait ~15 ms for a descheduled partner thread. One thread is the default, set before torch is
# imported so the processes the tests start inherit it; a value you set is kept (the suite passes with
# any: `OMP_NUM_THREADS=2 make test` runs every bit-identity test multi-threaded).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import pytest

TINY_VOCAB_SIZE = 512

_WORDS = (
    "the of and to in is that for it as with was on be by at this from or have an are not but "
    "model token tokens train training data value return def class self import print list dict "
    "string number numbers layer layers head heads expert experts stage stages product loss mask "
    "python function variable sum length index error file line field expected special chat user "
    "assistant system message decode encode byte bytes merge merges vocabulary pattern split"
).split()
_EXTRA = ["café", "naïve", "größe", "日本語", "данные", "😀", "3.14159", "2024", "0x1F", "x_1", "{}", "()"]


def tiny_corpus_text() -> str:
    """~60 KB of fixed pseudo-text: prose-like lines, code-like lines, numbers and some non-ASCII."""
    rng = random.Random(20240611)
    lines = []
    for i in range(1500):
        words = rng.choices(_WORDS, k=rng.randint(4, 12))
        if i % 7 == 0:
            words.append(rng.choice(_EXTRA))
        if i % 5 == 0:
            lines.append(f"def {words[0]}_{words[1]}(x, y={rng.randint(0, 999)}):\n    return x + {rng.random():.4f}")
        else:
            lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from poelm.data.tokenizer_train import train_tokenizer

    path = tmp_path_factory.mktemp("tiny_corpus") / "corpus.txt"
    path.write_text(tiny_corpus_text(), encoding="utf-8")
    return train_tokenizer([str(path)], TINY_VOCAB_SIZE, progress=False)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_tokenizer, tmp_path_factory):
    from poelm.models.directory import save_tokenizer_dir

    return save_tokenizer_dir(tiny_tokenizer, tmp_path_factory.mktemp("tiny_tokenizer_dir"), overwrite=True)


# --------------------------------------------------------------------------------------------------
# Model fixtures (added by the model/HF tests).
#
# - `seed_vocab_tokenizer` (session): the tiny tokenizer padded with unreachable filler tokens to the
#   seed's 32768 vocabulary, so <|bos|> = 32759 ... <|assistant_start|> = 32762 and the seed's quick
#   start runs verbatim. Fillers are byte strings starting with 0xFF, which never occurs in UTF-8
#   text, so encoding is unchanged.
# - `seed_model_dir` (session): `poelm init`'s output for that tokenizer (2 layers, 2 stages, GQA),
#   and `trained_like_model_dir`: the same model with every weight moved off its init.
SEED_VOCAB_SIZE = 32768


@pytest.fixture(scope="session")
def seed_vocab_tokenizer(tiny_tokenizer):
    from poelm.core.tokenizer import Tokenizer

    ranks = dict(tiny_tokenizer.mergeable_ranks)
    n = len(ranks)
    for i in range(SEED_VOCAB_SIZE - 9 - n):
        ranks[b"\xff" + (n + i).to_bytes(3, "big")] = n + i
    return Tokenizer(ranks)


@pytest.fixture(scope="session")
def seed_model_dir(seed_vocab_tokenizer, tmp_path_factory):
    """`poelm init` itself (the command's code path), on the seed-vocabulary tokenizer."""
    from poelm.app.cli import main
    from poelm.models.directory import save_tokenizer_dir

    tok_dir = save_tokenizer_dir(seed_vocab_tokenizer, tmp_path_factory.mktemp("seed_tokenizer"), overwrite=True)
    out = tmp_path_factory.mktemp("models") / "init"
    code = main(["init", "--tokenizer", str(tok_dir), "--depth", "2", "--n-embd", "64", "--n-head", "2",
                 "--n-kv-head", "1", "--seq-len", "256", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def trained_like_model_dir(seed_model_dir, seed_vocab_tokenizer, tmp_path_factory):
    from poelm import models
    from poelm.models.directory import save_model_dir
    from util import perturb_

    model = perturb_(models.open(seed_model_dir).model(), seed=7, scale=0.3)
    return save_model_dir(model, tmp_path_factory.mktemp("models") / "perturbed", seed_vocab_tokenizer)


# --------------------------------------------------------------------------------------------------
# Training fixtures shared by the pretraining, checkpoint, tracker and SFT tests.


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """12 text documents of the tiny corpus, so a held-out split has something to hold."""
    d = tmp_path_factory.mktemp("corpus")
    lines = tiny_corpus_text().splitlines(keepends=True)
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text("".join(lines[i * 120:(i + 1) * 120]), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tiny_stage(tmp_path_factory, tiny_tokenizer):
    """(base directory, stage directory): a 3-layer base moved off its init and a 1-block stage on it."""
    from poelm.core.config import PoEConfig
    from poelm.core.model import PoEGPT
    from poelm.models.directory import save_model_dir
    from poelm.models.specialist import attach, save_specialist
    from util import perturb_

    root = tmp_path_factory.mktemp("stage")
    model = PoEGPT(PoEConfig(vocab_size=512, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, sequence_len=128,
                             poe_stage_layers=[2, 1]))
    model.init_weights(0)
    base = save_model_dir(perturb_(model, seed=3, scale=0.1), root / "base", tiny_tokenizer)
    m, _ = attach(base, 1, seed=0)
    return base, save_specialist(m, base, root / "code", "code")


@pytest.fixture(scope="session")
def serve_dirs(trained_like_model_dir, tmp_path_factory):
    """(base, stage "alpha", stage "beta"): the seed-vocabulary base moved off its init and two one-block
    stages on it whose new weights are perturbed differently, so the three answer differently."""
    from serving import make_stage

    root = tmp_path_factory.mktemp("serve")
    a = make_stage(trained_like_model_dir, root / "a", "alpha", seed=1)
    b = make_stage(trained_like_model_dir, root / "b", "beta", seed=2)
    return trained_like_model_dir, a, b
