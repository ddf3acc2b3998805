"""The tokenized corpus and its train/val split: documents encoded as `[<|bos|>] + encode(text)` (here
with tiktoken's threads or in worker processes), split by content, and concatenated per split in input
order (`TextCorpus`, in memory; shards.py writes the same stream to a tokenized folder).

Design choices (the whole of them: docs/data.md, "Encoding and the held-out split"):
- The split is by document and by content (`assign_splits`, `SPLIT_RULE`): a document is held out when
  its blake2b hash falls under `val_fraction` (default `VAL_FRACTION`, declared here once), so the same
  text lands in the same split on every machine and in any input order, and duplicates never straddle
  it. Every corpus gets a val document and keeps a train one, decided with one document of look-ahead
  so that a stream can apply the rule.
- Token ids are int32 (half of int64's memory; ids < 2**31).
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from ..common.progress import ByteProgress, format_size
from ..core.errors import PoelmError
from .documents import read_documents, skipped_note

if TYPE_CHECKING:
    from ..core.tokenizer import Tokenizer

VAL_FRACTION = 0.02  # the default share of documents held out (pretraining, `poelm data tokenize`)


def is_fraction(value: Any) -> bool:
    """A valid `val_fraction`: a number (not a bool) in [0, 1)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < 1


_HASH_BUCKETS = 10**6


def document_hash(text: str | bytes) -> int:
    """A stable 64-bit hash of a document's text (blake2b of its UTF-8 bytes, first 8 bytes, big-endian):
    the same on every machine and Python run, unlike `hash()`."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


SPLIT_RULE = ("a document is held out (val) when blake2b-64(UTF-8 text) mod 10**6 < val_fraction * 10**6; "
              "if no document is, the last one is held out; if every document is, the last one is kept for training; "
              "a corpus of one document holds out its last max(2, ceil(val_fraction * tokens)) tokens")
_WORKER_CHUNK_BYTES, _WORKER_CHUNK_DOCS = 1 << 20, 512


class Encoded(NamedTuple):
    """One tokenized document: where it came from, its tokens `[bos, ...]` (int32), its UTF-8 size and
    hash (the split key); `tail` marks the held-out end of a corpus's only document (`assign_splits`)."""

    source: str
    file: int
    index: int
    tokens: np.ndarray
    nbytes: int
    hash: int
    tail: bool = False


def encode_texts(tokenizer: Tokenizer, texts: list[str], threads: int) -> tuple[np.ndarray, np.ndarray, list[int],
                                                                             list[int]]:
    """Texts -> (all their tokens, each document `[bos] + encode(text)`, as one int32 array;
    per-document token counts; UTF-8 byte counts; hashes)."""
    # one thread: a plain loop (tiktoken's batch call hands every text to a thread pool, ~1.5x slower)
    ids = [tokenizer.encode(t) for t in texts] if threads == 1 else tokenizer.encode_batch(texts, num_threads=threads)
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat[starts] = tokenizer.bos_id
    for s, d in zip(starts.tolist(), ids):
        flat[s + 1 : s + 1 + len(d)] = d
    data = [t.encode("utf-8") for t in texts]
    return flat, lengths, [len(b) for b in data], [document_hash(b) for b in data]


_worker_tokenizer: Tokenizer | None = None


def _init_worker(ranks: dict[bytes, int], pattern: str, name: str) -> None:
    global _worker_tokenizer
    from ..core.tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer(ranks, pattern, name)


def _encode_in_worker(texts: list[str]):
    return encode_texts(_worker_tokenizer, texts, threads=1)  # one core per worker: the pool is the parallelism


def encode_documents(docs: Iterable, tokenizer: Tokenizer, workers: int = 0) -> Iterator[Encoded]:
    """The documents' Encoded, in input order. workers=0 encodes here (tiktoken's threads, 8 MB
    chunks); workers>=1 in that many spawned processes, ~1 MB chunks, at most 4 x workers in flight."""
    chunk_bytes, chunk_docs = (8 << 20, 1024) if workers == 0 else (_WORKER_CHUNK_BYTES, _WORKER_CHUNK_DOCS)

    def chunks() -> Iterator[tuple[list, list[str]]]:
        meta, texts, size = [], [], 0
        for d in docs:
            meta.append((d.source, d.file, d.index))
            texts.append(d.text)
            size += len(d.text)
            if len(texts) >= chunk_docs or size >= chunk_bytes:
                yield meta, texts
                meta, texts, size = [], [], 0
        if texts:
            yield meta, texts

    def unpack(meta, result) -> Iterator[Encoded]:
        flat, lengths, nbytes, hashes = result
        pos = 0
        for (source, file, index), n, b, h in zip(meta, lengths.tolist(), nbytes, hashes):
            yield Encoded(source, file, index, flat[pos : pos + n], b, h)
            pos += n

    if workers == 0:
        for meta, texts in chunks():
            yield from unpack(meta, encode_texts(tokenizer, texts, threads=8))
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                               initargs=(tokenizer.mergeable_ranks, tokenizer.pattern, tokenizer.name))
    window: list[tuple[list, Future]] = []
    try:
        for meta, texts in chunks():
            window.append((meta, pool.submit(_encode_in_worker, texts)))
            if len(window) >= 4 * workers:
                meta0, fut = window.pop(0)
                yield from unpack(meta0, fut.result())
        for meta0, fut in window:
            yield from unpack(meta0, fut.result())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def assign_splits(encoded: Iterable[Encoded], val_fraction: float, counts: tuple[int, int] = (0, 0),
                  ) -> Iterator[tuple[bool, Encoded, Encoded | None]]:
    """(is_val, document, the document after it or None) in input order, by `SPLIT_RULE`; a corpus of one
    document yields its head (train) and its last max(2, ceil(val_fraction * tokens)) tokens (val, `tail`).

    The last document is held back until the input ends (the look-ahead the fallback needs), so each
    yield also names the next document, where a resume continues. `counts` are the (train, val)
    documents already written before a resume.
    """
    threshold = val_fraction * _HASH_BUCKETS
    n_train, n_val = counts
    pending: tuple[bool, Encoded] | None = None
    for e in encoded:
        if pending is not None:
            n_val += pending[0]
            n_train += not pending[0]
            yield pending[0], pending[1], e
        pending = (e.hash % _HASH_BUCKETS < threshold, e)
    if pending is None:
        return
    is_val, e = pending
    if n_train + n_val == 0:  # one document: hold out the tail of its token stream instead
        n = len(e.tokens)
        k = max(2, math.ceil(val_fraction * n))
        if n - k < 2:
            raise PoelmError(f"{e.source}: the only document of the inputs, {n} tokens: too short to hold out "
                             f"its last {k} tokens and train on the rest (add text)")
        part = e.nbytes * k // n  # its bytes in proportion (for the statistics only)
        yield False, e._replace(tokens=e.tokens[: n - k], nbytes=e.nbytes - part), None
        yield True, e._replace(tokens=e.tokens[n - k :], nbytes=part, tail=True), None
        return
    if n_val == 0:
        is_val = True
    elif n_train == 0:
        is_val = False
    yield is_val, e, None


@dataclass(frozen=True)
class SplitStats:
    documents: int
    tokens: int  # including one <|bos|> per document
    bytes: int  # UTF-8 bytes of the documents' text


@dataclass
class TextCorpus:
    """A tokenized corpus split by document into train and val streams."""

    train_tokens: np.ndarray  # (N_train,) int32: [bos, doc..., bos, doc..., ...] in input order
    val_tokens: np.ndarray  # (N_val,) int32, same layout
    train: SplitStats
    val: SplitStats
    skipped: list[str]  # non-UTF-8 files skipped inside input directories
    inputs: list[str]
    bos_id: int
    val_fraction: float
    tail_tokens: int = 0  # > 0: one document, val is the last tail_tokens of its tokens (a tail hold-out)
    null_texts: int = 0  # records whose text is null (no document)
    first_null: str | None = None

    @classmethod
    def build(cls, paths: Sequence[str | os.PathLike] | str | os.PathLike, tokenizer: Tokenizer,
              val_fraction: float = VAL_FRACTION, progress: bool | None = None) -> TextCorpus:
        """Read, tokenize and split `paths` (see `read_documents`).

        progress: False is silent; None or True reports bytes read (tqdm on a terminal, plain lines
        on stderr otherwise) and a closing summary line.
        """
        if not is_fraction(val_fraction):
            raise PoelmError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        reader = read_documents(paths)
        report = ByteProgress(progress is not False, reader.total_bytes, "data")
        reader.on_bytes = report.update
        parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
        counts = {False: [0, 0, 0], True: [0, 0, 0]}  # per split: documents, tokens, bytes
        tail = 0
        try:
            for is_val, e, _ in assign_splits(encode_documents(reader, tokenizer), val_fraction):
                tail = len(e.tokens) if e.tail else tail
                parts[is_val].append(e.tokens)
                c = counts[is_val]
                c[0], c[1], c[2] = c[0] + 1, c[1] + len(e.tokens), c[2] + e.nbytes
        finally:
            report.close()
        corpus = cls(train_tokens=np.concatenate(parts[False]), val_tokens=np.concatenate(parts[True]),
                     train=SplitStats(*counts[False]), val=SplitStats(*counts[True]), skipped=list(reader.skipped),
                     inputs=list(reader.inputs), bos_id=tokenizer.bos_id, val_fraction=float(val_fraction),
                     tail_tokens=tail, null_texts=reader.null_texts, first_null=reader.first_null)
        report.write(corpus.summary())
        return corpus

    def summary(self) -> str:
        """One log line: documents, tokens and bytes per split, a tail hold-out, and what was skipped."""
        skipped = skipped_note(len(self.skipped), self.null_texts, first=(self.skipped or [self.first_null])[0]) \
            + tail_note(self.tail_tokens)
        return (f"data: train {self.train.documents:,} documents, {self.train.tokens:,} tokens "
                f"({format_size(self.train.bytes)}); val {self.val.documents:,} documents, {self.val.tokens:,} "
                f"tokens ({format_size(self.val.bytes)}){skipped}")

    def stats(self) -> dict[str, Any]:
        """JSON-able facts about the corpus, for run metadata."""
        return {"inputs": self.inputs, "val_fraction": self.val_fraction, "train": asdict(self.train),
                "val": asdict(self.val), "skipped_files": len(self.skipped), "null_texts": self.null_texts,
                "tail_tokens": self.tail_tokens}

    def split(self) -> dict[str, Any]:
        """How val was held out, for run.json."""
        return split_record(self.val_fraction, self.tail_tokens)


def tail_note(tail_tokens: int) -> str:
    """The log's words for a tail hold-out ("" when the split is by document)."""
    return (f"; one document: val is the last {tail_tokens:,} tokens of its token stream (a tail hold-out)"
            if tail_tokens else "")


def split_record(val_fraction: float, tail_tokens: int) -> dict[str, Any]:
    """run.json's `data_split`: the rule and, for one document, the tail held out."""
    return {"val_fraction": val_fraction, "by": "tail" if tail_tokens else "document",
            "tail_tokens": tail_tokens or None}
