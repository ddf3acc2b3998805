"""The read-out head's arithmetic: the softcap, and the fused head + cross-entropy of a training step
(docs/model.md §7).

Imports only torch: it ships beside model.py as remote code.
"""

from __future__ import annotations

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 when it is (a float64 model keeps its precision through the head)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    logits = at_least_float32(logits)
    return cap * torch.tanh(logits / cap)


class HeadCrossEntropy(torch.autograd.Function):
    """Summed softcapped cross-entropy of `h @ weight[:vocab].T`, in chunks of tokens, its gradient formed
    chunk by chunk in the forward: no (N, vocab) logits tensor outlives its chunk (docs/model.md §7).

    h (N, d) normed hidden in the compute dtype; weight (V_padded, d); targets (N,), -1 = ignore.
    The softmax and the accumulated gradients are float32 (float64 for a float64 model).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, cap: float, vocab: int, chunk: int):
        w = weight[:vocab].to(h.dtype)
        acc = torch.promote_types(h.dtype, torch.float32)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, h.size(0), chunk):
            hc, t = h[s:s + chunk], targets[s:s + chunk]
            th = torch.tanh((hc @ w.T).to(acc) / cap)  # (n, V)
            logits = cap * th
            valid = (t >= 0).unsqueeze(1)
            tt = t.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += ((lse - logits.gather(1, tt)) * valid).sum()
            if grad_h is None and grad_w is None:
                continue
            g = torch.softmax(logits, dim=-1)
            g.scatter_add_(1, tt, -torch.ones_like(tt, dtype=g.dtype))
            g = (g * valid * (1.0 - th * th)).to(h.dtype)  # d loss / d (h @ w.T)
            if grad_h is not None:
                grad_h[s:s + chunk] = g @ w
            if grad_w is not None:
                grad_w[:vocab] += (g.T @ hc).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None
