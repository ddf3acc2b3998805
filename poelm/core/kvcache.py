"""The decoding cache the model's forward needs: keys and values per layer, the smear's previous
embedding and, for a padded batch, which cached positions are real (docs/model.md §8).

A batch that gains and loses rows between steps needs more (row selection, padding, per-row lengths):
that is poelm/infer/cache.py, a subclass. Imports only torch: it ships beside model.py as remote code.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values (B, H_kv, T, D) per layer, written into preallocated room that doubles when full;
    `prev_embedding` (B, 1, d) the last fed token's normed embedding (the smear); `attention_mask`
    (B, T) bool, which cached positions are real tokens (None: all). `crop(n)` keeps the first n."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.prev_embedding: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # preallocated room to grow into

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        """Append (B, H_kv, T, D) keys and values; returns all of them. They are views of a buffer with
        room to grow (doubled when full), so a decode step writes in place instead of copying."""
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

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].size(2) if layer_idx in self.keys else 0

    def crop(self, length: int) -> None:
        for i in self.keys:
            self.keys[i] = self.keys[i][:, :, :length]
            self.values[i] = self.values[i][:, :, :length]
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[:, :length]
