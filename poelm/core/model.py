"""The PoE GPT: nanochat's trunk cut into stages, every stage boundary a next-token predictor.

Design choices (docs/model.md §1-2):
- One definition. This file imports only torch (and the standard library); it ships unchanged as
  Hugging Face remote code beside `modeling_poelm.py`, so training, poelm's own inference and
  `transformers` all run this code. Parameter names are nanochat's, so a nanochat state dict loads
  without renaming.
- Structure comes from the config as recorded (`layer_windows`, `value_embed_layers`,
  `backout_layer`, `poe_backout_stages`); nothing is recomputed from `n_layer` here.
- Stage k's predictor reads the residual after its last layer through the one shared head:
  `logits_k = softcap(lm_head(norm(h_k)) [+ stage_heads[k](norm(h_k))])`, with the backout
  subtracted first at the boundaries listed in `poe_backout_stages` (by default the last one).
- Training losses per `poe_mode`: `none` backpropagates the last boundary's loss end to end; `flat`
  detaches the residual stream where every stage k > 0 begins and sums the stage losses divided by
  K**(1 - poe_alpha); `residual_logop` trains stage k on the Log-OP score of stages 0..k with the
  earlier stages' log-probabilities detached. `x0` is never detached: the embedding keeps a direct
  path to every stage and, like the shared head, learns from all of them.
- Rotary tables are computed per forward from the positions in use (no buffers): a model built on
  the meta device by `from_pretrained` has nothing left uninitialised, and the values equal
  nanochat's precomputed table row for row.
- One layer walk. `begin` (embedding, smear, rotary positions) makes a `Walk`, `run_layers` carries it
  through a range of layers (cache, backout and the training detach rules included) and `readout`
  reads one stage's predictor from it; `predictor` turns stage logits into what is decoded (the
  last stage, or the Log-OP under `poe_output="logop"`). The forward and every decoder (engine,
  speculative, adaptive, composition) are built from these four, so they cannot drift apart.
- Decoding uses any cache with `update(k, v, layer_idx) -> (k_all, v_all)` in (B, H_kv, T, D),
  `get_seq_length()`, and a `prev_embedding` attribute holding the last token's normed embedding for
  the smear: `KVCache` below, or the `DynamicCache` subclass of the Hugging Face wrapper.
- Logits are float32 (float64 in a float64 model); the softcap is applied in float32 as nanochat does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # the model reads its config by attribute; the type is documentation only
    from .config import PoEConfig


# The three additive heads are named in memory for what they are; on disk they keep the names the
# format has always used (docs/formats.md), translated where tensors meet files (`to_disk`/`from_disk`).
DISK_NAMES = {"stage_heads": "lm_head_stages", "specialist_head": "lm_head_stage", "ancestors_head": "lm_head_fold"}
_MEMORY_NAMES = {disk: memory for memory, disk in DISK_NAMES.items()}
SMEAR_IN = 24  # channels of the normed embedding the smear gate reads (config.SMEAR_CHANNELS)
VE_GATE_IN = 12  # channels of the attention input the value-embedding gate reads (config.VE_GATE_CHANNELS)


def _renamed(key: str, names: dict) -> str:
    head, dot, rest = key.partition(".")
    return names.get(head, head) + dot + rest


def _rename(tensors: dict, names: dict) -> dict:
    return {_renamed(key, names): value for key, value in tensors.items()}


def disk_name(key: str) -> str:
    """A state-dict key under the name the files use."""
    return _renamed(key, DISK_NAMES)


def to_disk(tensors: dict) -> dict:
    """A state dict under the names the files use (`specialist_head.weight` -> `lm_head_stage.weight`)."""
    return _rename(tensors, DISK_NAMES)


def from_disk(tensors: dict) -> dict:
    """Tensors read from a file, under the model's own names."""
    return _rename(tensors, _MEMORY_NAMES)


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without weights over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(start: int, length: int, head_dim: int, base: float, device, dtype):
    """cos, sin for positions [start, start + length), shaped (1, T, 1, head_dim / 2)."""
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (base ** (channels / head_dim))
    t = torch.arange(start, start + length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().to(dtype)[None, :, None, :], freqs.sin().to(dtype)[None, :, None, :]


def rotary_at(positions: torch.Tensor, head_dim: int, base: float, dtype):
    """cos, sin for per-token positions (B, T) -> (B, T, 1, head_dim / 2): restarted per document."""
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / (base ** (channels / head_dim))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return freqs.cos().to(dtype).unsqueeze(2), freqs.sin().to(dtype).unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos (nanochat's sign)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 when it is (a float64 model keeps its precision through the head)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    logits = at_least_float32(logits)
    return cap * torch.tanh(logits / cap)


def logop(stage_logits: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Log-OP (product of experts) of stage predictors, renormalised to log-probabilities.

    score(y) = sum_k log_softmax(logits_k)(y) / K**(1 - alpha); alpha = 0 is the geometric mean.
    """
    k = len(stage_logits)
    score = sum(F.log_softmax(at_least_float32(l), dim=-1) for l in stage_logits) / k ** (1.0 - alpha)
    return F.log_softmax(score, dim=-1)


class HeadCrossEntropy(torch.autograd.Function):
    """Summed softcapped cross-entropy of `h @ weight[:vocab].T`, in chunks of tokens.

    The gradient is formed in the forward pass, chunk by chunk (softmax - onehot, times the softcap's
    derivative 1 - tanh^2), so no (N, vocab) logits tensor outlives its chunk: a `flat` step with K
    stage losses holds K small gradient buffers instead of K full logit tensors. Same FLOPs as the
    unfused path (one forward and two backward matmuls per chunk).
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


class Linear(nn.Linear):
    """nn.Linear without bias that computes in the activation's dtype (fp32 master weights).

    The input is flattened to 2-D first, so every call is one plain matrix product: a 3-D
    `F.linear` goes through `matmul`, whose kernel choice depends on which tensors require grad,
    and a frozen specialist trunk would then round differently from the base it must equal bit for
    bit.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, x.size(-1)), self.weight.to(dtype=x.dtype))
        return y.view(*x.shape[:-1], y.size(-1))


class KVCache:
    """Keys and values per layer, grown by concatenation, plus the smear's previous embedding and (for
    padded batches) which cached positions are real tokens.

    Shapes: keys and values (B, H_kv, T, D); attention_mask (B, T) bool or None (all real).
    `crop(n)` rolls every layer back to n positions.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.prev_embedding: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # preallocated room to grow into

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        """Append (B, H_kv, T, D) keys and values; returns all of them. The tensors are views of a buffer
        with room to grow (doubled when full), so a decode step writes in place instead of copying."""
        old = self.keys.get(layer_idx)
        n, T = (old.size(2) if old is not None else 0), k.size(2)
        buf = self._buffers.get(layer_idx)
        if buf is None or buf[0].size(2) < n + T or old is None or buf[0].data_ptr() != old.data_ptr():
            room = max(2 * (n + T), 64)
            bk = k.new_empty(k.size(0), k.size(1), room, k.size(3))
            bv = v.new_empty(v.size(0), v.size(1), room, v.size(3))
            if old is not None:
                bk[:, :, :n], bv[:, :, :n] = old, self.values[layer_idx]
            buf = self._buffers[layer_idx] = (bk, bv)
        buf[0][:, :, n:n + T], buf[1][:, :, n:n + T] = k, v
        self.keys[layer_idx], self.values[layer_idx] = buf[0][:, :, :n + T], buf[1][:, :, :n + T]
        return self.keys[layer_idx], self.values[layer_idx]

    def update_rows(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, rows: slice, batch: int, start: int):
        """Write the keys and values (b, H_kv, T, D) of `rows` (a slice of the `batch` rows) at positions
        start .. start + T of layer `layer_idx`; returns those rows' keys and values (views). The first
        group of rows to write a layer in a forward grows it for every row, with zeros in the rows that
        do not run the layer (nothing ever reads them): rows of different models in one batch
        (infer/fleet.py) keep one tensor per layer, so selecting, padding and trimming stay uniform."""
        T = k.size(2)
        n = self.get_seq_length(layer_idx)
        if n == start:
            zeros = k.new_zeros(batch, k.size(1), T, k.size(3))
            self.update(zeros, zeros, layer_idx)
        elif n != start + T:
            raise ValueError(f"KVCache layer {layer_idx}: {n} positions cached; a forward of {T} positions "
                             f"from position {start} expects {start} or {start + T}")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[rows, :, start:], values[rows, :, start:] = k, v
        return keys[rows], values[rows]

    def forget(self, layer_idx: int) -> None:
        """Drop one layer's keys and values (no row of the batch runs it any more)."""
        for held in (self.keys, self.values, self._buffers):
            held.pop(layer_idx, None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].size(2) if layer_idx in self.keys else 0

    def crop(self, length: int) -> None:
        for i in self.keys:
            self.keys[i] = self.keys[i][:, :, :length]
            self.values[i] = self.values[i][:, :, :length]
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[:, :length]

    # ---- rows, for a batch that gains and loses sequences between steps (left-aligned padding)
    def mask(self) -> torch.Tensor:
        """(B, T) bool: which cached positions are real tokens."""
        if self.attention_mask is not None:
            return self.attention_mask
        k = self.keys[0]
        return torch.ones(k.size(0), k.size(2), dtype=torch.bool, device=k.device)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (B',) of the batch, in that order."""
        for i in self.keys:
            self.keys[i], self.values[i] = self.keys[i][rows], self.values[i][rows]
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding[rows]
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[rows]
        self._trim()

    def pad_left(self, n: int) -> None:
        """Grow every row by `n` hidden positions on the left (the keys and values there are never seen)."""
        if n <= 0:
            return
        mask = self.mask()
        for i in self.keys:
            k, v = self.keys[i], self.values[i]
            self.keys[i] = torch.cat([k.new_zeros(k.size(0), k.size(1), n, k.size(3)), k], dim=2)
            self.values[i] = torch.cat([v.new_zeros(v.size(0), v.size(1), n, v.size(3)), v], dim=2)
        self.attention_mask = torch.cat([mask.new_zeros(mask.size(0), n), mask], dim=1)

    def extend(self, other: "KVCache") -> None:
        """Append `other`'s rows to this batch (the shorter side padded on the left)."""
        if not self.keys:
            self.keys, self.values = dict(other.keys), dict(other.values)
            self.prev_embedding, self.attention_mask = other.prev_embedding, other.attention_mask
            return
        length, other_length = self.get_seq_length(), other.get_seq_length()
        self.pad_left(other_length - length)
        other.pad_left(length - other_length)
        mine, theirs = self.mask(), other.mask()  # before the keys grow: mask() may read their rows
        for i in sorted(set(self.keys) | set(other.keys)):  # a layer only one side's rows run: zeros for the other
            like = self.keys[i] if i in self.keys else other.keys[i]
            for held, extra in ((self.keys, other.keys), (self.values, other.values)):
                parts = [h[i] if i in h else like.new_zeros(m.size(0), *like.shape[1:])
                         for h, m in ((held, mine), (extra, theirs))]
                held[i] = torch.cat(parts)
        mask = torch.cat([mine, theirs])
        if self.prev_embedding is not None:
            self.prev_embedding = torch.cat([self.prev_embedding, other.prev_embedding])
        self.attention_mask = mask

    def realign(self, lengths: list[int]) -> None:
        """Keep the first `lengths[b]` positions of each row b, every row right-aligned to the longest
        (the others gain hidden positions on the left): a batch whose rows accepted different numbers
        of tokens stays one left-padded batch. Written in place into the preallocated room."""
        L = max(lengths)
        if min(lengths) == L:
            return self.crop(L)
        device = self.keys[0].device
        shift = torch.tensor([L - n for n in lengths], device=device)
        source = torch.arange(L, device=device)[None, :] - shift[:, None]  # (B, L): the old slot of each new one
        real = self.mask()[:, :L].gather(1, source.clamp(min=0)) & (source >= 0)
        for i in self.keys:
            k = self.keys[i]
            index = source.clamp(min=0)[:, None, :, None].expand(k.size(0), k.size(1), L, k.size(3))
            self.keys[i], self.values[i] = k[:, :, :L], self.values[i][:, :, :L]
            self.keys[i].copy_(k[:, :, :L].gather(2, index))  # gather first: the copy overwrites its source
            self.values[i].copy_(self.values[i].gather(2, index))
        self.attention_mask = real
        self._trim()

    def _trim(self) -> None:
        """Drop leading positions that are padding in every row (nothing ever attends to them)."""
        if self.attention_mask is None or not self.keys:
            return
        real = self.attention_mask.any(dim=0)
        first = int(real.int().argmax()) if bool(real.any()) else 0
        if first:
            for i in self.keys:
                self.keys[i], self.values[i] = self.keys[i][:, :, first:], self.values[i][:, :, first:]
            self.attention_mask = self.attention_mask[:, first:]


class CacheRows:
    """Rows [start, stop) of a `KVCache` during one forward of a `batch`-row batch from position `start`:
    the cache a group of rows running a layer of their own writes into (`KVCache.update_rows`)."""

    def __init__(self, cache: KVCache, rows: slice, batch: int, start: int):
        self.cache, self.rows, self.batch, self.start = cache, rows, batch, start

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        return self.cache.update_rows(k, v, layer_idx, self.rows, self.batch, self.start)


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


@dataclass
class Walk:
    """The residual stream of some positions between two layers: what the next layer continues from.

    idx (B, T) token ids (value embeddings read them); x (B, T, d) the residual after `layer` layers;
    x0 (B, T, d) the normed embedding every layer mixes back in; x_backout the residual after
    `backout_layer` once it has run (else None); cos, sin the rotary tables of these positions
    (B or 1, T, 1, D/2); doc_ids (B, Tk) the document of every key position up to the walk's last
    (cached ones included: packed documents, or a padded batch's real 0 / padding -1), or None.
    Positions travel with the walk, so walks of consecutive positions concatenate (`cat`) and split
    (`part`) freely.
    """

    idx: torch.Tensor
    x: torch.Tensor
    x0: torch.Tensor
    x_backout: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    doc_ids: torch.Tensor | None = None
    layer: int = 0

    @staticmethod
    def cat(walks: list["Walk"]) -> "Walk":
        """Walks of consecutive positions at the same layer, as one (along T)."""
        if len({w.layer for w in walks}) != 1:
            raise ValueError(f"cat: walks at different layers {[w.layer for w in walks]}")
        if len(walks) == 1:
            return walks[0]

        def join(name: str):
            parts = [getattr(w, name) for w in walks]
            return None if parts[0] is None else torch.cat(parts, dim=1)

        fields = {f.name: join(f.name) for f in dataclasses.fields(Walk) if f.name not in ("layer", "doc_ids")}
        return Walk(**fields, doc_ids=walks[-1].doc_ids, layer=walks[0].layer)  # the last covers every key

    def rows(self, start: int, stop: int) -> "Walk":
        """Rows [start, stop) of this walk (a view: rotary tables shared by every row stay shared)."""
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        table = lambda t: t if t.size(0) == 1 else t[start:stop]  # noqa: E731
        return Walk(idx=cut(self.idx), x=cut(self.x), x0=cut(self.x0), x_backout=cut(self.x_backout),
                    cos=table(self.cos), sin=table(self.sin), doc_ids=cut(self.doc_ids), layer=self.layer)

    def part(self, start: int, stop: int) -> "Walk":
        """Positions [start, stop) of this walk (its doc_ids: the keys up to position stop - 1)."""
        cut = lambda t: None if t is None else t[:, start:stop]  # noqa: E731
        docs = None if self.doc_ids is None else self.doc_ids[:, : self.doc_ids.size(1) - (self.idx.size(1) - stop)]
        return Walk(idx=cut(self.idx), x=cut(self.x), x0=cut(self.x0), x_backout=cut(self.x_backout),
                    cos=cut(self.cos), sin=cut(self.sin), doc_ids=docs, layer=self.layer)


@dataclass
class PoEOutput:
    """What a forward returns.

    logits: (B, T, V) float32 of the requested predictor (inference), else None.
    loss: the training loss of `poe_mode` (targets given), else None.
    stage_losses: (K',) cross-entropy of each stage trained (targets given), still in the graph so a
        test can backpropagate one stage's loss alone; detach before logging.
    stage_logits: every computed stage's logits when `return_stages=True`.
    """

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    stage_losses: torch.Tensor | None = None
    stage_logits: list[torch.Tensor] | None = None


def block_shapes(config: "PoEConfig", has_ve: bool = False) -> dict[str, tuple[int, ...]]:
    """One block's tensors (names within `transformer.h.{i}.`) and their shapes, as `Block` holds them."""
    d, q, kv = config.n_embd, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    shapes = {"attn.c_q.weight": (q, d), "attn.c_k.weight": (kv, d), "attn.c_v.weight": (kv, d),
              "attn.c_proj.weight": (d, d)}
    if has_ve:
        shapes["attn.ve_gate.weight"] = (config.n_kv_head, VE_GATE_IN)
    shapes.update({"mlp.c_fc.weight": (4 * d, d), "mlp.c_proj.weight": (d, 4 * d)})
    return shapes


def state_shapes(config: "PoEConfig") -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of `PoEGPT(config).state_dict()` with its shape, one at a time and without building
    anything: what a file is checked against before a model is made from it (a stream, so a config that
    claims 1000 layers costs no more than the header it is compared with; tested equal to the module's
    state dict for every config variant)."""
    V, d, kv = config.padded_vocab_size, config.n_embd, config.n_kv_head * config.head_dim
    ve_layers = set(config.value_embed_layers)
    yield "transformer.wte.weight", (V, d)
    for i in range(config.n_layer):
        for name, shape in block_shapes(config, i in ve_layers).items():
            yield f"transformer.h.{i}.{name}", shape
    yield "lm_head.weight", (V, d)
    if config.poe_stage_heads:
        for k in range(config.n_stages):
            yield f"stage_heads.{k}.weight", (V, d)
    if config.head_fold:
        yield "ancestors_head.weight", (V, d)
    if config.stage_head:
        yield "specialist_head.weight", (V, d)
    yield "resid_lambdas", (config.n_layer,)
    yield "x0_lambdas", (config.n_layer,)
    if config.smear:
        yield "smear_gate.weight", (1, SMEAR_IN)
        yield "smear_lambda", (1,)
    if config.backout:
        yield "backout_lambda", (1,)
    for i in sorted(ve_layers):
        yield f"value_embeds.{i}.weight", (V, kv)


def _own_table_in_state_dict(model: "PoEGPT", state: dict, prefix: str, local_metadata) -> None:
    """A model sharing its embedding table saves its own: the shared table with its own rows written in."""
    if model.own_row_ids is not None:
        table = state[prefix + "transformer.wte.weight"].clone()
        table[model.own_row_ids] = model.own_row_values
        state[prefix + "transformer.wte.weight"] = table


class PoEGPT(nn.Module):
    """nanochat's GPT with a next-token predictor at every stage boundary (docs/model.md §1-2)."""

    def __init__(self, config: "PoEConfig"):
        super().__init__()
        self.config = config
        V, d = config.padded_vocab_size, config.n_embd
        ve_layers = set(config.value_embed_layers)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, d),
            "h": nn.ModuleList(Block(config, i, i in ve_layers) for i in range(config.n_layer)),
        })
        self.lm_head = Linear(d, V)
        if config.poe_stage_heads:  # optional per-stage additive heads, zero-initialised
            self.stage_heads = nn.ModuleDict({str(k): Linear(d, V) for k in range(config.n_stages)})
        if config.head_fold:  # the ancestors' specialist heads, folded into one (docs/model.md §3, chaining)
            self.ancestors_head = Linear(d, V)
        if config.stage_head:  # the leaf specialist's additive head, zero-initialised
            self.specialist_head = Linear(d, V)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = Linear(SMEAR_IN, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(0.2 * torch.ones(1))
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in sorted(ve_layers)})
        # Rows kept apart from a table shared with another model (`share_embedding`); None: none.
        self.register_buffer("own_row_ids", None, persistent=False)
        self.register_buffer("own_row_values", None, persistent=False)

    # ------------------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every tensor here, in one place, from one explicit generator (docs/model.md §1 table)."""
        g = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        c = self.config
        s = 3**0.5 * c.n_embd**-0.5  # uniform bound with the std of N(0, 1/d)
        nn.init.normal_(self.transformer.wte.weight, 0.0, 0.8, generator=g)
        nn.init.normal_(self.lm_head.weight, 0.0, 0.001, generator=g)
        for block in self.transformer.h:
            for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight):
                nn.init.uniform_(w, -s, s, generator=g)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s, generator=g)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02, generator=g)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s, generator=g)
        n = max(c.n_layer - 1, 1)
        for i in range(c.n_layer):
            self.resid_lambdas[i] = 1.15 - 0.10 * i / n
            self.x0_lambdas[i] = 0.20 - 0.15 * i / n
        if c.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02, generator=g)
            nn.init.zeros_(self.smear_lambda)
        if c.backout:
            nn.init.constant_(self.backout_lambda, 0.2)
        if c.poe_stage_heads:
            for head in self.stage_heads.values():
                nn.init.zeros_(head.weight)
        if c.head_fold:
            nn.init.zeros_(self.ancestors_head.weight)
        if c.stage_head:
            nn.init.zeros_(self.specialist_head.weight)

    # ---------------------------------------------------------------------------- pieces
    def token_embedding(self, idx: torch.Tensor) -> torch.Tensor:
        """The embedding-table rows of `idx` (B, T) -> (B, T, d), before the norm; the rows this model
        keeps apart from a shared table (`share_embedding`) replace the table's."""
        x = self.transformer.wte(idx)
        if self.own_row_ids is None:
            return x
        hit = idx.unsqueeze(-1) == self.own_row_ids  # (B, T, n): which own row each token is, if any
        own = self.own_row_values[hit.int().argmax(dim=-1)].to(x.dtype)
        return torch.where(hit.any(dim=-1, keepdim=True), own, x)

    @torch.no_grad()
    def share_embedding(self, table: torch.Tensor) -> int:
        """Read the token embedding from `table` (another model's table, same shape and dtype), keeping
        apart only the rows where this model's own table differs (a specialist's chat-token rows): the
        model computes exactly what it computed, holding n rows instead of a table. The state dict
        still gives this model's own table (rebuilt when saved). Returns the bytes no longer held."""
        own = self.transformer.wte.weight
        if own.shape != table.shape or own.dtype != table.dtype:
            raise ValueError(f"share_embedding: table {tuple(table.shape)} {table.dtype}, this model's "
                             f"{tuple(own.shape)} {own.dtype}")
        changed = (own.data != table).any(dim=1).nonzero().flatten()
        if self.own_row_ids is not None:
            raise ValueError("share_embedding: this model already shares its embedding table")
        self.own_row_ids, self.own_row_values = changed, own.data[changed].clone()
        own.data = table
        self.register_state_dict_post_hook(_own_table_in_state_dict)
        return (table.size(0) - len(changed)) * table.size(1) * table.element_size()

    def embed(self, idx: torch.Tensor, cache=None, doc_ids: torch.Tensor | None = None,
              tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Normed token embedding plus the smear of the previous token's embedding: (B, T, d).
        `doc_ids` (B, Tk) covers the cached positions and these. `tokens` (B, T, d): the table rows
        of `idx` when the caller looked them up (rows of a batch read from different models' tables,
        infer/fleet.py); else this model's `token_embedding(idx)`."""
        x = norm(self.token_embedding(idx) if tokens is None else tokens)
        if not self.config.smear:
            return x
        prev = x[:, :-1]
        if cache is not None:
            cached = cache.prev_embedding
            cache.prev_embedding = x[:, -1:]
            if cached is not None:  # continuing a cached sequence: position 0 has a predecessor
                prev = torch.cat([cached.to(x.dtype), prev], dim=1)
        if prev.size(1) == 0:
            return x
        start = x.size(1) - prev.size(1)  # 1 for a fresh sequence, 0 when the cache holds the predecessor
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, start:, :SMEAR_IN]))
        if doc_ids is not None:  # a document's first token has no predecessor to smear in (nor padding)
            first = doc_ids.size(1) - x.size(1) + start  # doc_ids covers the cache's positions too
            same = doc_ids[:, first:] == doc_ids[:, first - 1:-1]
            gate = gate * same.unsqueeze(-1).to(gate.dtype)
        return torch.cat([x[:, :start], x[:, start:] + gate * prev], dim=1)

    def stage_hidden(self, h: torch.Tensor, stage: int, x_backout: torch.Tensor | None) -> torch.Tensor:
        """The normed residual stage `stage` reads out from (backout subtracted where configured)."""
        if stage in self.config.poe_backout_stages:
            h = h - self.backout_lambda.to(h.dtype) * x_backout
        return norm(h)

    def heads(self, stage: int) -> list[Linear]:
        """The heads stage `stage` reads out through, summed: the shared head, then its additive heads.

        Base stages: `lm_head` (+ `stage_heads[k]`). Specialist stages also add `ancestors_head`
        (the ancestors' specialist heads, folded); the last stage of a specialist adds `specialist_head`.
        """
        c = self.config
        heads = [self.lm_head]
        if c.poe_stage_heads:
            heads.append(self.stage_heads[str(stage)])
        if c.head_fold and stage >= c.n_base_stages:
            heads.append(self.ancestors_head)
        if c.stage_head and stage == c.n_stages - 1:
            heads.append(self.specialist_head)
        return heads

    def head_weight(self, stage: int) -> torch.Tensor:
        """The stage's effective head weight (the sum of `heads(stage)`), for the fused loss."""
        heads = self.heads(stage)
        w = heads[0].weight
        for head in heads[1:]:
            w = w + head.weight
        return w

    def stage_logits(self, h: torch.Tensor, stage: int, x_backout: torch.Tensor | None) -> torch.Tensor:
        """Stage `stage`'s predictor from the residual after its last layer: (B, T, vocab) float32.

        The heads are applied one by one and their logits added (not their weights), so a stage
        whose extra heads are zero gives exactly the logits of the model without them.
        """
        h = self.stage_hidden(h, stage, x_backout)
        heads = self.heads(stage)
        logits = heads[0](h)
        for head in heads[1:]:
            logits = logits + head(h)
        return softcap(logits[..., : self.config.vocab_size], self.config.softcap)

    def layer(self, i: int, x, x0, idx, cos, sin, cache=None, doc_ids=None) -> torch.Tensor:
        """Layer i: mix in the embedding (resid/x0 lambdas), then the block (with its value embedding)."""
        x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
        ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
        return self.transformer.h[i](x, ve, cos, sin, cache, doc_ids)

    # ------------------------------------------------------------------------- the layer walk
    @staticmethod
    def padding(attention_mask: torch.Tensor, cache, T: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A padded batch as document ids and positions: (doc_ids (B, Tk), positions (B, T)), or
        (None, None) when nothing is hidden (the plain path, bit for bit).

        `attention_mask` (B, T) or (B, Tk): 1 for real tokens, 0 for padding (left or right); for the
        cached positions the mask the cache recorded wins (the cache keeps the mask it was fed). Real
        tokens are document 0 and padding document -1, so a real token never sees padding; each row's
        rotary positions count its real tokens from 0, so a padded row computes what it computes alone.
        """
        mask = attention_mask[:, -T:].bool()
        past = cache.get_seq_length() if cache is not None else 0
        stored = getattr(cache, "attention_mask", None) if cache is not None else None
        if stored is None and bool(mask.all()):
            return None, None  # nothing hidden, before or now: nothing to record either
        if past:
            if stored is None:
                stored = torch.ones(mask.size(0), past, dtype=torch.bool, device=mask.device)
            mask = torch.cat([stored, mask], dim=1)
        if cache is not None:
            cache.attention_mask = mask
        if bool(mask.all()):
            return None, None
        doc_ids = mask.long() - 1
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -T:]
        return doc_ids, positions

    def begin(self, idx: torch.Tensor, cache=None, doc_ids: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
              tokens: torch.Tensor | None = None) -> Walk:
        """The walk of `idx` (B, T) before layer 0: embedding with the smear (continuing the cache's
        previous token), rotary tables at `positions` (B, T), else right after the cache's length.
        `attention_mask` (a padded batch) gives both (`padding`); packed documents give them directly.
        `tokens`: the embedding-table rows of `idx`, looked up by the caller (`embed`)."""
        c = self.config
        if attention_mask is not None:
            if doc_ids is not None or positions is not None:
                raise ValueError("give an attention_mask (padding) or doc_ids/positions (packing), not both")
            doc_ids, positions = self.padding(attention_mask, cache, idx.size(1))
        x = self.embed(idx, cache, doc_ids, tokens)
        if positions is not None:
            cos, sin = rotary_at(positions, c.head_dim, c.rope_base, x.dtype)
        else:
            start = cache.get_seq_length() if cache is not None else 0
            cos, sin = rotary_tables(start, idx.size(1), c.head_dim, c.rope_base, x.device, x.dtype)
        return Walk(idx=idx, x=x, x0=x, x_backout=None, cos=cos, sin=sin, doc_ids=doc_ids, layer=0)

    def run_layers(self, walk: Walk, stop: int, cache=None, *, detach_stages: bool = False,
                   frozen_layers: int = 0) -> Walk:
        """Carry `walk` through layers walk.layer .. stop-1 (writing each layer's keys and values into
        `cache`), recording the backout residual when its layer runs.

        Training rules: `detach_stages` detaches the residual where each stage after the first begins
        (local losses); `frozen_layers=n` runs layers below n without autograd and detaches what enters
        layer n (a frozen trunk).
        """
        c = self.config
        x, x0, x_backout = walk.x, walk.x0, walk.x_backout
        grad = torch.is_grad_enabled()
        starts = c.stage_starts[1:] if detach_stages else ()
        for i in range(walk.layer, stop):
            if i in starts:
                x = x.detach()  # local learning: stage k's layers learn only from their own loss
            if 0 < frozen_layers == i:  # the trunk's outputs enter the trained layers as constants
                x, x0 = x.detach(), x0.detach()
                x_backout = x_backout.detach() if x_backout is not None else None
            with torch.set_grad_enabled(grad and i >= frozen_layers):
                x = self.layer(i, x, x0, walk.idx, walk.cos, walk.sin, cache, walk.doc_ids)
            if i == c.backout_layer:
                x_backout = x
        return dataclasses.replace(walk, x=x, x0=x0, x_backout=x_backout, layer=max(stop, walk.layer))

    def _backout(self, walk: Walk, stage: int, detach: bool) -> torch.Tensor | None:
        """The backout residual stage `stage` subtracts; detached when it comes from an earlier stage
        and `detach` (local losses: no gradient back into another stage's layers)."""
        c = self.config
        if detach and walk.x_backout is not None and c.backout_layer < c.stage_starts[stage]:
            return walk.x_backout.detach()
        return walk.x_backout

    def readout(self, walk: Walk, stage: int, detach_backout: bool = False) -> torch.Tensor:
        """Stage `stage`'s logits (B, T, vocab) float32 from a walk that has just run its last layer."""
        if walk.layer != self.config.stage_ends[stage] + 1:
            raise ValueError(f"readout of stage {stage} needs the walk after layer {self.config.stage_ends[stage]}, "
                             f"it has run {walk.layer} layers")
        return self.stage_logits(walk.x, stage, self._backout(walk, stage, detach_backout))

    def rollback(self, cache, length: int | list[int], last_token) -> None:
        """Roll a decoding cache back to its first `length` positions: keys and values cropped, and the
        smear's previous embedding set to that of `last_token` (B,) (the token at position length - 1),
        so the next token is computed as if nothing after it had been fed. A list of lengths, one per
        row, keeps each row's own (`KVCache.realign`: ragged rows stay one left-padded batch)."""
        if isinstance(length, int):
            cache.crop(length)
        else:
            cache.realign(length)
        if self.config.smear:
            ids = torch.as_tensor(last_token, device=self.transformer.wte.weight.device).reshape(-1, 1)
            cache.prev_embedding = norm(self.token_embedding(ids))  # what `embed` keeps: (B, 1, d)

    def readout_stages(self, last: int, output: str | None = None) -> list[int]:
        """The stages whose logits `predictor` needs to decode stage `last` under `output`."""
        return list(range(last + 1)) if (output or self.config.poe_output) == "logop" else [last]

    def predictor(self, stage_logits: list[torch.Tensor], output: str | None = None) -> torch.Tensor:
        """What is decoded from the logits of `readout_stages(k, output)`: the last one
        (`output="last"`), or their Log-OP as log-probabilities (`"logop"`)."""
        output = output or self.config.poe_output
        return logop(stage_logits, self.config.poe_alpha) if output == "logop" else stage_logits[-1]

    # --------------------------------------------------------------------------- forward
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache=None,
        exit_stage: int | None = None,
        output: str | None = None,
        return_stages: bool = False,
        loss_reduction: str = "mean",
        fused_loss: bool = True,
        loss_chunk: int | None = None,
        frozen_layers: int = 0,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        stage_loss_fraction: float = 1.0,
    ) -> PoEOutput:
        """Run stages 0..exit_stage (default: all) on idx (B, T).

        Inference (no targets): `logits` is the last computed stage's predictor (`output="last"`, the
        config default) or the Log-OP of all computed stages (`output="logop"`, log-probabilities).
        Training (targets (B, T), -1 = ignore): `loss` per `poe_mode` and `stage_losses`. In `none`
        and `flat` mode the head and cross-entropy run fused in chunks of `loss_chunk` tokens
        (HeadCrossEntropy; default: about 4M logits, 16 MB in float32, per chunk: small enough to stay
        in cache and out of the allocator's page-faulting path on a CPU); `fused_loss=False` takes the
        plain path the tests compare it with.
        `frozen_layers=n`: the embedding and layers 0..n-1 run without autograd and their outputs enter
        layer n detached (a specialist stage trains on a frozen trunk: one trunk forward, no trunk
        backward). The values are the same as with autograd; only the graph is not built.
        `doc_ids` (B, T) and `positions` (B, T): packed documents (conversations) that must not see each
        other: attention stays within a document, the smear does not cross into one, and rotary
        positions restart, so each document is computed as if it were alone in the row.
        `attention_mask` (B, T) or (B, cache + T), 1 = real token: a padded batch (left or right); each
        row's real positions give what the row gives alone (to float rounding; `padding`).
        `stage_loss_fraction=F` < 1 (flat mode): every stage but the last takes its loss on a random
        ceil(F * N) of the N positions, drawn from the default CPU generator (so a training run's
        checkpointed RNG state makes it resumable), scaled by N / n: an unbiased estimate of the full
        loss for a fraction of the head's cost. The last stage always takes every position.
        """
        c = self.config
        last = c.n_stages - 1 if exit_stage is None else exit_stage
        if not 0 <= last < c.n_stages:
            raise ValueError(f"exit_stage={exit_stage}: this model has stages 0..{c.n_stages - 1}")
        output = output or c.poe_output
        training = targets is not None
        mode = c.poe_mode if training else "none"
        # Which boundaries need a predictor: all of them for local losses, Log-OP or return_stages.
        readouts = set(range(last + 1)) if return_stages or mode != "none" else set(self.readout_stages(last, output))
        fused = training and fused_loss and mode in ("none", "flat")
        local = mode != "none"
        if not 0 < stage_loss_fraction <= 1:
            raise ValueError(f"stage_loss_fraction={stage_loss_fraction}: expected a fraction in (0, 1]")
        if stage_loss_fraction < 1 and not (fused and mode == "flat"):
            raise ValueError("stage_loss_fraction < 1 applies to flat training with the fused loss")

        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen_layers == 0):
            walk = self.begin(idx, cache, doc_ids, positions, attention_mask)
        logits: list[torch.Tensor] = []  # per read-out stage: logits, or (fused) the normed hidden
        for k in range(last + 1):
            walk = self.run_layers(walk, c.stage_ends[k] + 1, cache, detach_stages=local,
                                   frozen_layers=frozen_layers)
            if k not in readouts:
                continue
            if fused:
                logits.append(self.stage_hidden(walk.x, k, self._backout(walk, k, local)))
            else:
                logits.append(self.readout(walk, k, detach_backout=local))

        if not training:
            out = self.predictor(logits, output)
            return PoEOutput(logits=out, stage_logits=logits if return_stages else None)
        if fused:
            stages = sorted(readouts)[-1:] if mode == "none" else sorted(readouts)
            hidden = logits[-1:] if mode == "none" else logits
            return self._aggregate(self.fused_losses(hidden, stages, targets, reduction=loss_reduction,
                                                     chunk=loss_chunk, fraction=stage_loss_fraction), mode)
        return self._loss(logits, targets, mode, loss_reduction)

    def fused_losses(self, hidden: list[torch.Tensor], stages: list[int], targets: torch.Tensor, *,
                     reduction: str = "sum", chunk: int | None = None, fraction: float = 1.0,
                     exact: int | None = None) -> list[torch.Tensor]:
        """Each stage's cross-entropy from its normed read-out residual (`stage_hidden`) through
        HeadCrossEntropy, in chunks of `chunk` tokens: no full logit tensor is ever held. With `fraction`
        < 1 every stage but `exact` (default: the last of `stages`) scores a random subset of positions
        (see `forward`). Stage-parallel training calls this with the stages one process owns."""
        c = self.config
        chunk = chunk or max(64, (1 << 22) // c.padded_vocab_size)
        exact = stages[-1] if exact is None else exact
        flat_targets = targets.reshape(-1)
        losses = []
        for k, h in zip(stages, hidden):
            h, t, scale = h.reshape(-1, h.size(-1)), flat_targets, 1.0
            if fraction < 1 and k != exact:
                n = math.ceil(fraction * len(t))
                keep = torch.randperm(len(t))[:n].to(t.device)  # the default CPU generator: checkpointed
                h, t, scale = h[keep], t[keep], len(flat_targets) / n
            total = HeadCrossEntropy.apply(h, self.head_weight(k), t, c.softcap, c.vocab_size, chunk) * scale
            if reduction == "mean":
                total = total / (flat_targets >= 0).sum()
            losses.append(total)
        return losses

    def _aggregate(self, losses: list[torch.Tensor], mode: str) -> PoEOutput:
        """The training loss of `mode` from per-stage losses: sum_k loss_k / K**(1 - poe_alpha)."""
        if mode == "none":
            return PoEOutput(loss=losses[-1], stage_losses=losses[-1].reshape(1))
        loss = sum(losses) / len(losses) ** (1.0 - self.config.poe_alpha)
        return PoEOutput(loss=loss, stage_losses=torch.stack(losses))

    def _loss(self, logits, targets, mode, reduction) -> PoEOutput:
        """Cross-entropy per stage from materialised logits (the reference path, and residual_logop)."""
        V, alpha = self.config.vocab_size, self.config.poe_alpha
        flat_targets = targets.reshape(-1)

        def ce(l):
            return F.cross_entropy(l.reshape(-1, V), flat_targets, ignore_index=-1, reduction=reduction)

        if mode in ("none", "flat"):
            return self._aggregate([ce(l) for l in logits], mode)
        else:  # residual_logop: stage k is trained on the Log-OP of 0..k, earlier stages detached
            logps, losses = [], []
            for k, l in enumerate(logits):
                logp = F.log_softmax(l, dim=-1)
                score = (sum(p.detach() for p in logps) + logp) / (k + 1) ** (1.0 - alpha)
                losses.append(ce(score))  # cross_entropy renormalises the score with logsumexp
                logps.append(logp)
        return self._aggregate(losses, mode)

    # ---------------------------------------------------------------------------- counts
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_table(self) -> list[tuple[str, int]]:
        """Parameter counts per group, in the order a reader meets them (embedding, stages, head)."""
        c = self.config
        rows = [("wte", self.transformer.wte.weight.numel())]
        if len(self.value_embeds):
            rows.append(("value_embeds", sum(p.numel() for p in self.value_embeds.parameters())))
        for k, (a, b) in enumerate(zip(c.stage_starts, c.stage_ends)):
            n = sum(p.numel() for i in range(a, b + 1) for p in self.transformer.h[i].parameters())
            rows.append((f"stage {k} (layers {a}-{b})", n))
        rows.append(("lm_head", self.lm_head.weight.numel()))
        if c.poe_stage_heads:
            rows.append(("stage_heads", sum(p.numel() for p in self.stage_heads.parameters())))
        if c.head_fold:
            rows.append(("ancestors_head", self.ancestors_head.weight.numel()))
        if c.stage_head:
            rows.append(("specialist_head", self.specialist_head.weight.numel()))
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        scalars += (25 if c.smear else 0) + (1 if c.backout else 0)
        rows.append(("scalars", scalars))
        rows.append(("total", self.num_params()))
        return rows
