"""Pretraining text: documents read from files, a tokenized train/val split, and a row loader for DDP.

Design choices:
- One reader for every plain-text input in poelm (`read_documents`): tokenizer training,
  pretraining, `poelm eval bpb` and `poelm data tokenize` see the same documents through the same
  code. Inputs are text files (one file = one document), directories (walked recursively in sorted
  order, hidden entries and `__pycache__` skipped), and records (records.py): JSONL and JSON arrays
  of objects with a "text" string, Parquet files and `datasets` folders (a text column), gzip/zstd
  compressed. Text is whatever decodes as UTF-8 without NUL bytes. A file named explicitly must be
  non-empty text; inside a directory other files are skipped and listed in `reader.skipped` so the
  caller can report them, and empty files and empty texts are no documents. A record whose text is
  null (a Parquet or `datasets` null cell, a JSON `{"text": null}`) is no document either, in every
  format alike, and is counted (`reader.null_texts`, reported beside the skipped files). A malformed
  record (a JSON line that is not an object, no "text" key, a text that is not a string) is an error
  wherever it is, naming file and line (or row) and what the text field held.
- Paths are checked and sized when the reader is made (a typo fails before any work), so progress
  can count bytes against a known total: tqdm on a terminal, a handful of plain lines otherwise.
- Each document is tokenized as `[<|bos|>] + encode(text)` (`encode_documents`: here with tiktoken's
  threads, or in worker processes for `poelm data tokenize`) and the documents of a split are
  concatenated in input order into one int32 array (half the memory of int64; ids < 2**31), or
  written to a tokenized folder's shards (shards.py) — the same stream either way.
- The train/val split is by document and by content (`assign_splits`): a document is held out when
  blake2b(UTF-8 text)[:8] mod 10**6 < val_fraction * 10**6. The same text lands in the same split on
  every machine and in every input order, and exact duplicates never straddle the split. A tiny
  corpus still gets one val document and keeps one train document: if no document falls in val,
  the last one read is held out; if all do, the last one is kept for training (a rule a stream can
  apply, holding back one document, where "the lowest hash" would need the whole corpus first).
- `TokenLoader` cuts the stream into rows of T+1 tokens at stride T, so every token after the first
  is a target exactly once per epoch. Row order is a permutation drawn from
  `torch.Generator().manual_seed(seed + epoch)`: reproducible, and the whole position is two ints.
- DDP shares one global row sequence: each call takes the next world_size*B rows and rank r keeps
  the r-th block of B. So 2K calls on one process see the rows, in order, that K calls see on two
  (gradient accumulation equals data parallelism), and the loader state is the same on every rank:
  rank 0 saves it, every rank loads it.
- torch is imported inside the loader functions only: tokenizer training reads documents through
  this module and should not pay torch's import time (about 1.5 s) for nothing.

Long documents and document boundaries: documents are never truncated, padded or dropped. Every
document starts with <|bos|> and follows the previous one directly in a single token stream; the
loader cuts that stream into rows of `seq_len` inputs at fixed positions, without regard to where
documents begin or end. A row may therefore hold the end of one document, a <|bos|>, and the start
of the next (attention is not masked at the <|bos|>, as in GPT-2 and nanochat pretraining), and a
document longer than `seq_len` simply continues in the following rows, so its later tokens are
predicted with at most `seq_len` tokens of context from the start of their row. Every token after
the first is predicted exactly once per epoch; only the last row of the whole stream can be short,
and its missing positions are padded and carry no loss (target -1).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from ..core.errors import PoelmError

if TYPE_CHECKING:
    import torch

    from ..core.tokenizer import Tokenizer

# ---- reading documents ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One document: where it came from ("path", "path:LINE" for JSONL, "path[ROW]" for a JSON array,
    Parquet or `datasets` row) and its text; `file` and `index` place it among the reader's inputs
    (its file's position in `DocumentReader.files`, its record's index in that file) for a resume."""

    source: str
    text: str
    file: int = field(default=0, compare=False)
    index: int = field(default=0, compare=False)


def as_text(data: bytes) -> str | None:
    """UTF-8 text without NUL bytes, else None (binary or another encoding)."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def walk_files(directory: str, prune: frozenset[str] = frozenset({"__pycache__"})) -> Iterator[str]:
    """Regular files under `directory` in sorted order (a directory's files, then its subdirectories),
    skipping hidden entries (.git, .venv) and directories named in `prune`."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in prune)
        yield from (os.path.join(root, f) for f in sorted(files) if not f.startswith("."))


INPUTS = ("text files, directories, JSONL or JSON arrays of {\"text\"} records, Parquet files or "
          "`datasets` folders (a text column)")


class DocumentReader:
    """An iterator over the documents of some input paths (see `read_documents`).

    Known when made: `inputs`, `files` (records.InputFile, in reading order), `total_bytes`. Filled
    while iterating: `documents` (count), `skipped` (files inside directories that are not UTF-8 text,
    in order). `on_bytes(n)` is called with the bytes of the files on disk as they are consumed, skipped
    ones too, so a progress report reaches `total_bytes` exactly. `start=(file, index)` begins at that
    record of that file (a resume), the bytes before it reported at once.
    """

    def __init__(self, paths: Sequence[str | os.PathLike] | str | os.PathLike,
                 on_bytes: Callable[[int], None] | None = None, text_column: str = "text",
                 start: tuple[int, int] = (0, 0)):
        from .records import expand

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.inputs: list[str] = [os.fspath(p) for p in paths]
        if not self.inputs:
            raise PoelmError(f"no input paths given; expected {INPUTS}")
        from .records import is_token_folder

        for p in self.inputs:
            if is_token_folder(p):
                raise PoelmError(f"{p}: a tokenized data folder; `poelm pretrain --data` reads it, this command "
                                 f"needs the text it was made from")
        self.files, _ = expand(self.inputs, lambda f: True, INPUTS)
        for f in self.files:
            if f.explicit and f.size == 0:
                raise PoelmError(f"{f.path}: empty file; expected text or records")
        self.total_bytes: int = sum(f.size for f in self.files)
        self.on_bytes = on_bytes
        self.text_column = text_column
        self.start = start
        self.documents = 0
        self.skipped: list[str] = []
        self.null_texts = 0  # records whose text is null, read so far (the first at `first_null`)
        self.first_null: str | None = None
        self._null_at: deque[tuple[int, int]] = deque()  # their (file, record) positions, until `nulls_before`
        self._nulls_before = 0
        self._it: Iterator[Document] | None = None

    def __iter__(self) -> DocumentReader:
        return self

    def __next__(self) -> Document:
        if self._it is None:
            self._it = self._read()
        return next(self._it)

    def nulls_before(self, file: int, index: int) -> int:
        """Null-text records read before position (file, record) — the reader may have run ahead of it."""
        while self._null_at and self._null_at[0] < (file, index):
            self._null_at.popleft()
            self._nulls_before += 1
        return self._nulls_before

    def _consumed(self, n: int) -> None:
        if self.on_bytes is not None and n:
            self.on_bytes(n)

    def _read(self) -> Iterator[Document]:
        from .records import BadRecord, read_bytes, records

        first, start = self.start
        self._consumed(sum(f.size for f in self.files[:first]))
        for k, f in enumerate(self.files[first:], start=first):
            kind = "text" if f.kind == "json" and not f.explicit else f.kind  # a directory's .json is text
            if kind == "text":  # one file, one document
                if k == first and start > 0:  # resumed past its document
                    self._consumed(f.size)
                    continue
                try:
                    text = as_text(read_bytes(f))
                except PoelmError:  # a compressed file that does not decompress
                    if f.explicit:
                        raise
                    text = None
                if text is None:
                    if f.explicit:
                        raise PoelmError(f"{f.path}: not UTF-8 text (binary file?); expected a text file or records")
                    self.skipped.append(f.path)
                elif text:
                    self.documents += 1
                    yield Document(f.path, text, k, 0)
                self._consumed(f.size)
                continue
            column = self.text_column if kind in ("parquet", "datasets") else None
            for r in records(f, start if k == first else 0, column):
                text = r.value
                if isinstance(text, BadRecord):
                    raise PoelmError(str(text)) from None
                if r.index >= 0 and column is None:  # a JSON record: an object with a "text" string (or null)
                    if not isinstance(text, dict) or "text" not in text:
                        got = f"an object with keys {sorted(text)}" if isinstance(text, dict) else json_type(text)
                        raise PoelmError(f"{r.where}: expected an object with a 'text' field, got {got}")
                    text = text["text"]
                    if text is not None and not isinstance(text, str):
                        raise PoelmError(f"{r.where}: 'text' is {json_type(text)}; expected a string (or null: no "
                                         f"text)")
                elif r.index >= 0 and text is not None and not isinstance(text, str):
                    raise PoelmError(f"{r.where}: column {column!r} holds {type(text).__name__}; expected strings")
                if r.index >= 0 and text is None:  # a null text, in any format: no document, counted
                    self.null_texts += 1
                    self.first_null = self.first_null or r.where
                    self._null_at.append((k, r.index))
                elif r.index >= 0:
                    try:  # JSON escapes can spell a lone surrogate ("\ud800"), which no tokenizer can encode
                        text.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise PoelmError(f"{r.where}: 'text' has an unpaired surrogate at character {e.start}; "
                                         f"expected valid Unicode") from None
                    if text:
                        self.documents += 1
                        yield Document(r.where, text, k, r.index)
                self._consumed(r.nbytes)
        if self.documents == 0 and self.start == (0, 0):
            skipped = skipped_note(len(self.skipped), self.null_texts, ", ")
            raise PoelmError(f"no documents in {self.inputs} (empty files and records hold none{skipped}); "
                             f"expected {INPUTS} with non-empty text")


def json_type(value: Any) -> str:
    """A JSON value's type in JSON's words: null, a boolean, a number, a string, an array, an object."""
    for kind, name in ((type(None), "null"), (bool, "a boolean"), ((int, float), "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def skipped_note(files: int, null_texts: int, lead: str = "; ", first: str | None = None) -> str:
    """The log's words for what was read but held no document ("" when nothing was skipped)."""
    parts = ([f"{files:,} non-UTF-8 file(s) in input directories"] if files else []) + \
            ([f"{null_texts:,} record(s) whose text is null"] if null_texts else [])
    return f"{lead}skipped {' and '.join(parts)}" + (f" (first: {first})" if first else "") if parts else ""


def read_documents(paths: Sequence[str | os.PathLike] | str | os.PathLike,
                   on_bytes: Callable[[int], None] | None = None, text_column: str = "text") -> DocumentReader:
    """The documents of text files, directories, JSONL and JSON-array records, Parquet files and
    `datasets` folders (records.py decides the format by name), in input order.

    Raises PoelmError for a missing path or an empty explicit file at once; while iterating, for an
    explicit file that is not UTF-8 text, for a malformed record (naming file:line or file[row]), a
    missing column, and, at the end, when there were no documents at all. After iterating, `.skipped`
    lists the files inside directories that are not UTF-8 text and `.documents` counts what was yielded.
    A `.json` file named explicitly is a JSON array of records; inside a directory it is a text file
    like any other (a source tree's package.json is text, not data).
    """
    return DocumentReader(paths, on_bytes, text_column)


# ---- progress ------------------------------------------------------------------------------------


def format_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


class ByteProgress:
    """Bytes-read progress: tqdm on a terminal, a few plain lines elsewhere (a log is not flooded
    with carriage-return updates), nothing when disabled."""

    def __init__(self, enabled: bool, total: int, label: str, extra: Callable[[], str] | None = None):
        self.enabled, self.total, self.done, self.label, self.extra = enabled, max(total, 1), 0, label, extra
        self.bar = None
        self.next_quarter = 1
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr)
        elif enabled:
            self.line(f"{label}: reading {format_size(total)}")

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            if self.extra is not None:
                self.bar.set_postfix_str(self.extra(), refresh=False)
            self.bar.update(n)
        elif self.enabled:
            while self.next_quarter < 4 and self.done >= self.total * self.next_quarter / 4:
                more = f", {self.extra()}" if self.extra is not None and self.extra() else ""
                self.line(f"{self.label}: read {25 * self.next_quarter}% ({format_size(self.done)}{more})")
                self.next_quarter += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---- tokenized corpus with a held-out split ------------------------------------------------------

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
              val_fraction: float = 0.02, progress: bool | None = None) -> TextCorpus:
        """Read, tokenize and split `paths` (see `read_documents`).

        progress: False is silent; None or True reports bytes read (tqdm on a terminal, plain lines
        on stderr otherwise) and a closing summary line.
        """
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
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
        report.line(corpus.summary())
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


# ---- loading rows --------------------------------------------------------------------------------


def n_rows(n_tokens: int, seq_len: int) -> int:
    """Rows of `seq_len` targets in a stream of `n_tokens` (the first token is never a target)."""
    return -(-(n_tokens - 1) // seq_len)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise PoelmError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


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
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise PoelmError(f"rank must be in [0, world_size={self.world_size}), got {rank}")
        self.seed = _check_int("seed", seed, 0)
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
    """Endless (x, y) batches of one rank from a token stream; see the module docstring."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, pad_id: int):
        self.tokens = _check_tokens(tokens, "TokenLoader")
        self.pad_id = _check_int("pad_id", pad_id, 0)
        super().__init__(n_rows(len(self.tokens), _check_int("seq_len", seq_len, 1)), batch_size, seq_len,
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
    B, T = _check_int("batch_size", batch_size, 1), _check_int("seq_len", seq_len, 1)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise PoelmError(f"rank must be in [0, world_size={world_size}), got {rank}")
    total = n_rows(len(tokens), T)
    if max_rows is not None:
        total = min(total, _check_int("max_rows", max_rows, 1))
    mine = np.arange(rank, total, world_size)
    pad = _check_int("pad_id", pad_id, 0)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(mine), B):
            yield _rows(tokens, mine[i : i + B], T, pad)

    return batches()
