"""The transformer pieces of the PoE GPT, nanochat's: RMSNorm, rotary embeddings, windowed causal
attention with the value residual, the MLP and the block (docs/model.md §1, steps 3-4).

Imports only torch (the config only for type checking): it ships beside model.py as remote code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # the layers read their config by attribute; the type is documentation only
    from .config import PoEConfig

VE_GATE_IN = 12  # channels of the attention input the value-embedding gate reads (config.VE_GATE_CHANNELS)


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without weights over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def _inverse_frequencies(head_dim: int, base: float, device) -> torch.Tensor:
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    return 1.0 / (base ** (channels / head_dim))


def rotary_tables(start: int, length: int, head_dim: int, base: float, device, dtype):
    """cos, sin for positions [start, start + length), shaped (1, T, 1, head_dim / 2)."""
    t = torch.arange(start, start + length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, _inverse_frequencies(head_dim, base, device))
    return freqs.cos().to(dtype)[None, :, None, :], freqs.sin().to(dtype)[None, :, None, :]


def rotary_at(positions: torch.Tensor, head_dim: int, base: float, dtype):
    """cos, sin for per-token positions (B, T) -> (B, T, 1, head_dim / 2): restarted per document."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * _inverse_frequencies(head_dim, base, positions.device)
    return freqs.cos().to(dtype).unsqueeze(2), freqs.sin().to(dtype).unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos (nanochat's sign)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)


class Linear(nn.Linear):
    """nn.Linear without bias that computes in the activation's dtype (fp32 master weights), always as
    one 2-D matrix product: a frozen trunk then rounds exactly as the base it must equal bit for bit
    (docs/model.md §6)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, x.size(-1)), self.weight.to(dtype=x.dtype))
        return y.view(*x.shape[:-1], y.size(-1))


class Embedding(nn.Embedding):
    """nn.Embedding that draws nothing when built: every table is written by `init_weights` or by a load.
    (Drawing nn.Embedding's default normal on the meta device, where loads build models, imports
    torch._dynamo: 1.6 s of every command's start.)"""

    def reset_parameters(self) -> None:
        pass


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
           doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over a window: query at absolute position i sees keys i - window .. i.

    q (B, H, Tq, D) holds the last Tq positions of the Tk keys in k, v (B, H_kv, Tk, D). With
    `doc_ids` (B, Tk), the document of every key position, a query also sees only keys of its own
    document (packed conversations; padding is document -1, which no real token belongs to).
    """
    Tq, Tk = q.size(2), k.size(2)
    offset = Tk - Tq
    if doc_ids is None and offset == 0 and window >= Tq - 1:  # plain causal: the window reaches position 0
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if Tq == 1:  # a decode step: the one query sees the last window + 1 keys (of its own document)
        if window < Tk - 1:
            k, v = k[:, :, -(window + 1):], v[:, :, -(window + 1):]
        if doc_ids is None:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        same = doc_ids[:, -k.size(2):] == doc_ids[:, -1:]  # (B, keys): the query's document
        return F.scaled_dot_product_attention(q, k, v, attn_mask=same[:, None, None, :], enable_gqa=True)
    i = torch.arange(offset, Tk, device=q.device)[:, None]
    j = torch.arange(Tk, device=q.device)[None, :]
    mask = (j <= i) & (j >= i - window)  # (Tq, Tk), True = attend
    if doc_ids is not None:
        mask = mask & (doc_ids[:, -Tq:, None] == doc_ids[:, None, :])  # (B, Tq, Tk)
        mask = mask.unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: "PoEConfig", layer_idx: int, has_ve: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.window = config.layer_windows[layer_idx]
        self.c_q = Linear(d, config.n_head * config.head_dim)
        self.c_k = Linear(d, kv)
        self.c_v = Linear(d, kv)
        self.c_proj = Linear(d, d)
        self.ve_gate = Linear(VE_GATE_IN, config.n_kv_head) if has_ve else None

    def forward(self, x, ve, cos, sin, cache, doc_ids=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual (ResFormer): one input-dependent gate per kv head, in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_IN]))  # (B, T, H_kv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * 1.2, norm(k) * 1.2  # QK norm, then sharpen (split between q and k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = attend(q, k, v, self.window, doc_ids)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = Linear(n_embd, 4 * n_embd)
        self.c_proj = Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: "PoEConfig", layer_idx: int, has_ve: bool):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, has_ve)
        self.mlp = MLP(config.n_embd)

    def forward(self, x, ve, cos, sin, cache, doc_ids=None):
        x = x + self.attn(norm(x), ve, cos, sin, cache, doc_ids)
        return x + self.mlp(norm(x))


def block_shapes(config: "PoEConfig", has_ve: bool = False) -> dict[str, tuple[int, ...]]:
    """One block's tensors (names within `transformer.h.{i}.`) and their shapes, as `Block` holds them."""
    d, q, kv = config.n_embd, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    shapes = {"attn.c_q.weight": (q, d), "attn.c_k.weight": (kv, d), "attn.c_v.weight": (kv, d),
              "attn.c_proj.weight": (d, d)}
    if has_ve:
        shapes["attn.ve_gate.weight"] = (config.n_kv_head, VE_GATE_IN)
    shapes.update({"mlp.c_fc.weight": (4 * d, d), "mlp.c_proj.weight": (d, 4 * d)})
    return shapes
