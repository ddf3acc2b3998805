"""A greedy continuation with the KV cache: the text sample a training run logs at each evaluation.

(The inference engine with sampling and the PoE modes lives in infer/; this is the smallest correct
loop, used where a run wants to show what the model says.)
"""

from __future__ import annotations

import torch

from ..core.model import KVCache, PoEGPT


@torch.no_grad()
def greedy_continue(model: PoEGPT, prompt: list[int], max_new_tokens: int, stop: set[int],
                    device: torch.device | str = "cpu") -> list[int]:
    was_training = model.training
    model.eval()
    cache, out = KVCache(), []
    x = torch.tensor([prompt], device=device)
    for _ in range(max_new_tokens):
        token = int(model(x, cache=cache).logits[0, -1].argmax())
        out.append(token)
        if token in stop or cache.get_seq_length() >= model.config.sequence_len:
            break
        x = torch.tensor([[token]], device=device)
    model.train(was_training)
    return out
