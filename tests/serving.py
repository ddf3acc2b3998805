"""Helpers of the server tests: a live server, a client, and what a model answers alone.

The directories these tests serve are made once per session (conftest.serve_dirs) and never written
afterwards, so what is read from them (a model, a 32768-token tokenizer: ~0.1 s each) is read once per
process and shared: `model_of`, `tokenizer_of`, and `greedy`/`text_of` through them.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from poelm.infer import Engine, SamplingParams
from poelm import models
from poelm.core.tokenizer import Tokenizer


@contextlib.contextmanager
def running(dirs, **kw):
    """A live server for `dirs` (poelm.serve.app.background: a free port, stopped on exit)."""
    from poelm.serve.app import background

    with background([str(d) for d in dirs], **kw) as (url, app):
        yield url, app


def make_stage(parent, out, name: str, seed: int):
    """A stage of one block whose new weights are perturbed (so two stages answer differently)."""
    from poelm.models.specialist import attach, save_specialist, specialist_parameter_names

    model, _ = attach(parent, 1, seed=seed)
    trained = set(specialist_parameter_names(model))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname in trained and p.dim() >= 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return save_specialist(model, parent, out, name)


def client(url: str, key: str = "none"):
    """The official `openai` client for a live server (no retries: a test sees every failure)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


@functools.lru_cache(maxsize=None)
def _model(directory: Path):
    return models.open(directory).model()


@functools.lru_cache(maxsize=None)
def _tokenizer(directory: Path) -> Tokenizer:
    return Tokenizer.load(directory)


def model_of(directory):
    """The model of `directory` (read once; nothing may change it: it answers `greedy` too)."""
    return _model(Path(directory).resolve())


def tokenizer_of(directory) -> Tokenizer:
    """The tokenizer of `directory` (read once)."""
    return _tokenizer(Path(directory).resolve())


def greedy(directory, ids: list[int], n: int) -> list[int]:
    """The engine's greedy tokens for `ids` on the model of `directory`, alone."""
    return Engine(model_of(directory), tokenizer_of(directory)).generate(ids, SamplingParams(max_new_tokens=n))


def text_of(directory, tokens: list[int]) -> str:
    """The text of `tokens` without the stop tokens."""
    tok = tokenizer_of(directory)
    stops = {tok.token_id("assistant_end"), tok.bos_id}
    return tok.decode([t for t in tokens if t not in stops])
