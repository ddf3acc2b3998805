"""The row loaders: a token stream (pretraining) or packed rows (SFT, packing.py) cut into the batches of
one rank, in an order every rank agrees on.

Design choices (the whole of them: docs/data.md, "Rows and the loaders"):
- A token stream is cut into rows of T+1 tokens at stride T, so every token after the first is a
  target exactly once per epoch; documents are neither truncated nor padded, and only the stream's
  last row is short (padded, target -1).
- Row order per epoch is a permutation drawn from `torch.Generator().manual_seed(seed + epoch)`, one
  global sequence of which rank r takes the r-th block of B rows per call: 2K calls on one process see
  the rows K calls see on two (gradient accumulation equals data parallelism), and the state (epoch,
  cursor) is the same on every rank.
- torch is imported inside the functions only: reading documents and tokenizer training import this
  layer and should not pay torch's import time (about 1.5 s) for nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import numpy as np

from ..core.errors import PoelmError

if TYPE_CHECKING:
    import torch

Batch = TypeVar("Batch")


def n_rows(n_tokens: int, seq_len: int) -> int:
    """Rows of `seq_len` targets in a stream of `n_tokens` (the first token is never a target)."""
    return -(-(n_tokens - 1) // seq_len)


def check_int(name: str, value: Any, low: int) -> int:
    """`value` as an int, or an error naming `name` unless it is an int (not a bool) >= `low`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise PoelmError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    """(rank, world_size), checked: ints with 0 <= rank < world_size."""
    world_size = check_int("world_size", world_size, 1)
    rank = check_int("rank", rank, 0)
    if rank >= world_size:
        raise PoelmError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


def strided_batches(total: int, batch_size: int, rank: int, world_size: int,
                    batch: Callable[[np.ndarray], Batch]) -> Iterator[Batch]:
    """Rows 0..total-1 in order, rank r taking rows r, r + world, ..., as `batch(indices)` of at most
    `batch_size` rows (the last may be smaller). Ranks can get different numbers of rows (and batches):
    reduce sums after the loop, not per batch."""
    mine = np.arange(rank, total, world_size)

    def batches() -> Iterator[Batch]:
        for i in range(0, len(mine), batch_size):
            yield batch(mine[i : i + batch_size])

    return batches()


class TokenStream:
    """A 1-D token sequence sliced lazily, like an array (`len`, `[a:b]`): a tokenized folder's split
    (shards.ShardedTokens). The loaders take one where they take an array."""

    folder: Any


def _check_tokens(tokens: Any, who: str) -> np.ndarray:
    if isinstance(tokens, TokenStream):  # a tokenized folder's split: sliced from its memory-mapped shards
        if len(tokens) < 2:
            raise PoelmError(f"{who}: {tokens.folder}: a split of {len(tokens)} token(s); expected at least 2")
        return tokens
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu" or len(tokens) < 2:
        raise PoelmError(f"{who}: expected a 1-D integer token array of at least 2 tokens, "
                         f"got shape {tokens.shape} dtype {tokens.dtype}")
    return tokens


def _rows(tokens: np.ndarray, rows: np.ndarray, seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `rows` (R,) of the stream -> x, y (R, T) int64: x = tokens[i*T : i*T+T], y shifted by one.
    Positions past the stream's last target are padded: pad_id in x, -1 (ignored) in y."""
    import torch

    x = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    y = np.full((len(rows), seq_len), -1, dtype=np.int64)
    for b, i in enumerate(rows.tolist()):  # a contiguous slice per row: cheaper than a (R, T) gather
        row = tokens[i * seq_len : i * seq_len + seq_len + 1]  # T+1 tokens; fewer only in the last row
        x[b, : len(row) - 1] = row[:-1]
        y[b, : len(row) - 1] = row[1:]
    return torch.from_numpy(x), torch.from_numpy(y)


class RowLoader:
    """The row order every loader shares: per epoch a seeded permutation of the rows (or the rows in
    order), one global sequence for all ranks. Each `next_indices()` on rank r returns rows
    [cursor + r*B, cursor + (r+1)*B) of that sequence and advances the cursor by world_size*B, so N
    calls on one process see exactly the rows that N/world calls see across `world_size` processes
    (gradient accumulation on one process equals one step on many). A batch may straddle epochs.
    The position (epoch, cursor) is identical on every rank and resumes exactly.
    Subclasses turn indices into tensors (`next_batch`) and may add facts to check on resume.
    """

    _SHAPE_KEYS = ("batch_size", "seq_len", "world_size", "rows_per_epoch", "seed", "shuffle")
    _RESUME_HINT = "resume with the same data, batch size, sequence length, world size and seed"

    def __init__(self, n: int, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.rank, self.world_size = check_rank(rank, world_size)
        self.seed = check_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.rows_per_epoch = n  # fixed by the data
        self._epoch, self._cursor = 0, 0  # global position: row `cursor` of epoch `epoch`'s order
        self._orders: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def cursor(self) -> int:
        return self._cursor

    def _order(self, epoch: int) -> np.ndarray:
        """(rows_per_epoch,) row indices in epoch `epoch`'s order."""
        if epoch not in self._orders:
            if self.shuffle:
                import torch

                g = torch.Generator().manual_seed(self.seed + epoch)
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # above ~32k rows randperm spreads over threads: slower, not faster
                try:
                    self._orders[epoch] = torch.randperm(self.rows_per_epoch, generator=g).numpy()
                finally:
                    torch.set_num_threads(threads)
            else:
                self._orders[epoch] = np.arange(self.rows_per_epoch)
        return self._orders[epoch]

    def next_indices(self) -> np.ndarray:
        """This rank's next `batch_size` row indices, and advance the shared position."""
        B, R = self.batch_size, self.rows_per_epoch
        start = self._epoch * R + self._cursor + self.rank * B  # absolute row slot of this rank's first row
        epochs, slots = np.divmod(start + np.arange(B), R)  # (B,) a batch may straddle epochs (or several)
        rows = np.empty(B, dtype=np.int64)
        for e in range(int(epochs[0]), int(epochs[-1]) + 1):  # sorted already: no np.unique
            here = epochs == e
            rows[here] = self._order(int(e))[slots[here]]
        self._epoch, self._cursor = divmod(self._epoch * R + self._cursor + self.world_size * B, R)
        self._orders = {e: o for e, o in self._orders.items() if e >= self._epoch}
        return rows

    def __iter__(self):
        while True:
            yield self.next_batch()  # each subclass makes its tensors from next_indices()

    def state_dict(self) -> dict[str, Any]:
        """The position, JSON-able and identical on every rank, with the settings it is valid for."""
        return {"epoch": self._epoch, "cursor": self._cursor, "rows_per_epoch": self.rows_per_epoch,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "world_size": self.world_size,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Continue from `state` (from `state_dict`); `source` names where it came from for errors."""
        if not isinstance(state, dict):
            raise PoelmError(f"{source}: data loader state is {type(state).__name__}; expected an object")
        mine = self.state_dict()
        for key in self._SHAPE_KEYS:
            if key not in state:
                raise PoelmError(f"{source}: data loader state lacks '{key}'")
            if state[key] != mine[key] or isinstance(state[key], bool) != isinstance(mine[key], bool):
                raise PoelmError(f"{source}: data loader state has {key}={state[key]!r} but this run has "
                                 f"{key}={mine[key]!r}; {self._RESUME_HINT}")
        for key, high in (("epoch", float("inf")), ("cursor", self.rows_per_epoch)):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < high:
                bound = f" and < {high}" if key == "cursor" else ""
                raise PoelmError(f"{source}: data loader state '{key}' is {value!r}; expected an int >= 0{bound}")
        self._epoch, self._cursor = state["epoch"], state["cursor"]
        self._orders = {}


class TokenLoader(RowLoader):
    """Endless (x, y) batches of one rank from a token stream; see the module docstring.

    Documents follow each other in the stream and rows are cut at fixed positions, so a row may hold
    the end of one document, a <|bos|> and the start of the next (attention is not masked at the
    <|bos|>, as in GPT-2 and nanochat pretraining), and a long document continues in the rows after."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, pad_id: int):
        self.tokens = _check_tokens(tokens, "TokenLoader")
        self.pad_id = check_int("pad_id", pad_id, 0)
        super().__init__(n_rows(len(self.tokens), check_int("seq_len", seq_len, 1)), batch_size, seq_len,
                         rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), each (batch_size, seq_len) int64; y is -1 where there is no target."""
        return _rows(self.tokens, self.next_indices(), self.seq_len, self.pad_id)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_rows: int | None = None, rank: int = 0,
                 world_size: int = 1, *, pad_id: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `max_rows` rows (all when None) of `tokens` in order, rank r taking rows r, r+world, ...,
    as (x, y) batches of at most `batch_size` rows, padded like `TokenLoader`.

    Ranks can get different numbers of rows (and batches): reduce sums after the loop, not per batch.
    pad_id only fills input positions after the stream's end, whose targets are ignored; with causal
    attention it cannot change any scored position.
    """
    tokens = _check_tokens(tokens, "eval_batches")
    B, T = check_int("batch_size", batch_size, 1), check_int("seq_len", seq_len, 1)
    rank, world_size = check_rank(rank, world_size)
    total = n_rows(len(tokens), T)
    if max_rows is not None:
        total = min(total, check_int("max_rows", max_rows, 1))
    pad = check_int("pad_id", pad_id, 0)
    return strided_batches(total, B, rank, world_size, lambda rows: _rows(tokens, rows, T, pad))
