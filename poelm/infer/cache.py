"""The cache of a batch that gains and loses rows between steps: the model's `KVCache` plus what only
batches need — selecting rows, left padding, appending another batch's rows, one length per row, and
rows of different models writing their own part of a layer (docs/inference.md §2).

Every row stays left-padded: its real positions end at the cache's last position, and the mask says
which positions are real, so the model's padding rule gives each row what it gives alone.
"""

from __future__ import annotations

import torch

from ..core.kvcache import KVCache


class BatchKVCache(KVCache):
    """A `KVCache` whose rows join, leave and advance by different numbers of tokens (module docstring)."""

    def crop(self, length: int | list[int]) -> None:
        """Keep the first `length` positions; with one length per row, each row's own (`realign`)."""
        if isinstance(length, int):
            super().crop(length)
        else:
            self.realign(length)

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

    def extend(self, other: "BatchKVCache") -> None:
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

    def update_rows(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, rows: slice, batch: int, start: int):
        """Write the keys and values (b, H_kv, T, D) of `rows` (a slice of the `batch` rows) at positions
        start .. start + T of layer `layer_idx`; returns those rows' keys and values (views). The first
        group of rows to write a layer in a forward grows it for every row, with zeros in the rows that
        do not run the layer (nothing reads them): one tensor per layer keeps selecting, padding and
        trimming uniform for rows of different models (fleet.py)."""
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
    """Rows [start, stop) of a `BatchKVCache` during one forward of a `batch`-row batch from position
    `start`: the cache a group of rows running a layer of their own writes into (`update_rows`)."""

    def __init__(self, cache: BatchKVCache, rows: slice, batch: int, start: int):
        self.cache, self.rows, self.batch, self.start = cache, rows, batch, start

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        return self.cache.update_rows(k, v, layer_idx, self.rows, self.batch, self.start)
