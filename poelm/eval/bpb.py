"""Bits per byte of every stage predictor and of their Log-OP combination.

Design choices (docs/model.md §2, §4):
- bpb = sum of target-token NLL (nats) / (ln 2 * sum of the target tokens' UTF-8 bytes). Special
  tokens count zero bytes and are left out of both sums, as are ignored targets (-1); the measure
  is therefore comparable across tokenizers.
- One forward per batch yields every stage's logits; the Log-OP score is renormalised with
  logsumexp before its NLL is taken, so it is a proper distribution.
- Sums, not means, are reduced across ranks, so the result does not depend on the world size.
- One owner of the sums: the stage-parallel pipeline (train/pipeline.py) scores its stages with the
  same pieces (`target_bytes`, `scored_nats`, `bpb_names`).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.model import PoEGPT, logop


def bpb_names(n_stages: int) -> list[str]:
    """The predictors bpb is reported for, in the order of their sums: stage0.. and logop."""
    return [f"stage{k}" for k in range(n_stages)] + ["logop"]


def target_bytes(y: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """The UTF-8 bytes of every target (B, T): 0 for ignored targets (-1) and special tokens."""
    return torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)


def scored_nats(score: torch.Tensor, y: torch.Tensor, nbytes: torch.Tensor) -> float:
    """The summed NLL (nats) of `score` (B, T, V) at the targets that have bytes (`target_bytes`)."""
    nll = F.cross_entropy(score.reshape(-1, score.size(-1)).float(), y.clamp(min=0).reshape(-1), reduction="none")
    return float((nll * (nbytes > 0).reshape(-1)).sum())


@contextmanager
def evaluating(model: torch.nn.Module):
    """`model` in eval mode, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def bpb_sums(model: PoEGPT, batches: Iterable[tuple[torch.Tensor, ...]], token_bytes: torch.Tensor,
             device: torch.device) -> tuple[list[str], list[float]]:
    """Per predictor: summed NLL in nats, then one shared byte count; names are stage0.. and logop.

    A batch is (inputs, targets) or, for packed conversations, (inputs, targets, doc_ids, positions).
    """
    K = model.config.n_stages
    nats = [0.0] * (K + 1)
    n_bytes = 0.0
    token_bytes = token_bytes.to(device)
    with evaluating(model):
        for batch in batches:
            x, y, *extra = (t.to(device) for t in batch)
            kwargs = {"doc_ids": extra[0], "positions": extra[1]} if extra else {}  # packed conversations
            nbytes = target_bytes(y, token_bytes)  # specials (0 bytes) and ignored targets are left out
            stage_logits = model(x, return_stages=True, **kwargs).stage_logits
            for i, s in enumerate([*stage_logits, logop(stage_logits, model.config.poe_alpha)]):
                nats[i] += scored_nats(s, y, nbytes)
            n_bytes += float(nbytes.sum())
    return bpb_names(K), nats + [n_bytes]


def bpb_from_sums(names: list[str], sums: list[float]) -> dict[str, float]:
    n_bytes = sums[-1]
    if n_bytes <= 0:
        raise ValueError("no target bytes to evaluate (empty evaluation set)")
    return {name: nats / (math.log(2) * n_bytes) for name, nats in zip(names, sums[:-1])}


def text_bpb(model: PoEGPT, tok: Any, paths: Sequence[str | os.PathLike], *, seq_len: int | None = None,
             batch_size: int = 8, max_tokens: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Bits per byte of every stage and of the Log-OP on the documents of `paths` (pretraining's reader,
    `read_documents`), each document after `<|bos|>`, in rows of `seq_len`
    tokens (default: the model's context) scored `batch_size` rows per forward. All of them are scored
    (give held-out text), or the first `max_tokens`. Returns {"bpb": {name: value}, "tokens", "bytes"}."""
    from ..data.documents import read_documents
    from ..data.loader import eval_batches, n_rows
    from ..common.progress import Progress

    seq_len = seq_len or model.config.sequence_len
    tokens: list[int] = []
    for doc in read_documents(paths):
        tokens += [tok.bos_id] + tok.encode(doc.text)
        if max_tokens is not None and len(tokens) >= max_tokens:
            del tokens[max_tokens:]
            break
    rows = n_rows(len(tokens), seq_len)
    bar = Progress(-(-rows // batch_size), desc="bpb", enabled=progress)

    def batches():
        for i, batch in enumerate(eval_batches(np.array(tokens, dtype=np.int64), batch_size, seq_len,
                                               pad_id=tok.bos_id)):
            yield batch
            bar.update(i + 1)

    device = next(model.parameters()).device
    names, sums = bpb_sums(model, batches(), torch.tensor(tok.token_bytes, dtype=torch.int64), device)
    bar.close()
    return {"bpb": bpb_from_sums(names, sums), "tokens": len(tokens), "bytes": int(sums[-1])}
