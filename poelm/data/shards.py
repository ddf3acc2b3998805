"""Tokenized data folders: `poelm data tokenize` writes one, `poelm pretrain --data DATADIR` memory-maps it.

A folder (its format: docs/formats.md, "A tokenized data folder"): `index.json` (format, dtype, shard
size, the tokenizer's fingerprint, the split rule, the sources with their digests, per split the
counts and shards), `train-00000.safetensors ...` and `val-00000.safetensors ...` (tensors "tokens",
uint16 when the vocabulary fits else uint32, and "block_xxh3", a digest per BLOCK_TOKENS tokens), and
`digests.json`.

Design choices (the whole of them: docs/data.md, "Tokenized folders"):
- The token stream is exactly the one `corpus.TextCorpus.build` makes in memory (same reader, encoding,
  split rule and order); only where the tokens live differs, so pretraining reads a folder through the
  same loaders, with the same row order and loader state.
- Tokenizing runs in spawned worker processes, results taken in submission order with a bounded
  window: the output does not depend on the number of workers, and memory not on the corpus.
- Resumable: built in `OUT.partial/`, a checkpoint at a document boundary each time a shard completes;
  a rerun with the same settings continues to byte-identical shards, other settings are refused.
- No token is used unverified: the index and shard sizes are checked on open, each block's digest the
  first time a slice touches it (a cost that does not grow with the corpus or the shard size).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import xxhash

from ..common.atomic import check_output, replace_dir
from ..common.progress import ByteProgress, format_size
from ..common.recorded import refuse_changes
from ..core.errors import PoelmError
from ..core.files import ALGORITHM, MANIFEST, file_digest, read_json, write_json
from .corpus import (SPLIT_RULE, VAL_FRACTION, Encoded, SplitStats, TextCorpus, assign_splits, encode_documents,
                     is_fraction, split_record, tail_note)
from .documents import DocumentReader, skipped_note
from .loader import TokenStream
from .records import FORMAT, INDEX, PROGRESS, is_token_folder

if TYPE_CHECKING:
    from ..core.tokenizer import Tokenizer

FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 24  # 16.8M tokens: 32 MB as uint16
BLOCK_TOKENS = 1 << 16  # each shard's tokens are verified in blocks of this many (128 kB as uint16)
SPLITS = ("train", "val")
_DTYPES = {"uint16": (np.uint16, "U16"), "uint32": (np.uint32, "U32")}


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# ---- writing shards ------------------------------------------------------------------------------


def shard_name(split: str, k: int, suffix: str = "safetensors") -> str:
    return f"{split}-{k:05d}.{suffix}"


def n_blocks(n: int) -> int:
    return -(-n // BLOCK_TOKENS)


def shard_header(dtype: str, n: int, split: str, k: int) -> bytes:
    """The safetensors header of a shard of `n` tokens: tensors `tokens` (n,) and `block_xxh3` (blocks, 16)
    uint8, the xxh3-128 digest of each BLOCK_TOKENS tokens' bytes (8-byte little-endian length + JSON
    padded with spaces to a multiple of 8, so the data is aligned for memory mapping)."""
    np_dtype, st_dtype = _DTYPES[dtype]
    size = n * np.dtype(np_dtype).itemsize
    meta = {"__metadata__": {"format": FORMAT, "split": split, "shard": str(k), "block_tokens": str(BLOCK_TOKENS)},
            "tokens": {"dtype": st_dtype, "shape": [n], "data_offsets": [0, size]},
            "block_xxh3": {"dtype": "U8", "shape": [n_blocks(n), 16], "data_offsets": [size, size + 16 * n_blocks(n)]}}
    text = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def shard_bytes(dtype: str, n: int, split: str, k: int) -> int:
    """The size of a shard file of `n` tokens."""
    return len(shard_header(dtype, n, split, k)) + n * np.dtype(_DTYPES[dtype][0]).itemsize + 16 * n_blocks(n)


class ShardWriter:
    """One split's shards: tokens stream into `SPLIT-K.open`; a full one becomes `SPLIT-K.safetensors`."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int, state: dict | None = None):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.np_dtype = _DTYPES[dtype][0]
        self.itemsize = np.dtype(self.np_dtype).itemsize
        state = state or {"shards": [], "open_tokens": 0, "open_documents": 0}
        self.shards: list[dict[str, Any]] = list(state["shards"])
        self.open_tokens, self.open_documents = state["open_tokens"], state["open_documents"]
        self.retired: list[Path] = []  # open files of shards finished since the last checkpoint
        k = len(self.shards)
        for p in folder.glob(f"{split}-*"):  # what a killed run wrote after its last checkpoint
            try:
                j = int(p.name.split("-")[1].split(".")[0])
            except ValueError:
                continue
            if (p.suffix == ".safetensors" and j >= k) or (p.suffix == ".open" and j != k) or p.suffix == ".tmp":
                p.unlink()
        path = folder / shard_name(split, k, "open")
        want = self.open_tokens * self.itemsize
        if want and (not path.exists() or path.stat().st_size < want):
            have = path.stat().st_size if path.exists() else 0
            raise PoelmError(f"{path}: {have} bytes, but {folder / PROGRESS} records {want}; the interrupted "
                             f"tokenize cannot continue (remove {folder} and start again)")
        self.f = open(path, "r+b" if path.exists() else "wb")
        self.f.truncate(want)
        self.f.seek(want)

    def add(self, tokens: np.ndarray) -> int:
        """Append one document's tokens; the number of shards this completed."""
        self.open_documents += 1
        done, pos = 0, 0
        while pos < len(tokens):
            part = tokens[pos : pos + self.shard_tokens - self.open_tokens]
            self.f.write(part.astype(self.np_dtype).tobytes())
            self.open_tokens += len(part)
            pos += len(part)
            if self.open_tokens == self.shard_tokens:
                self._finish_shard()
                done += 1
        return done

    def _finish_shard(self) -> None:
        k = len(self.shards)
        self.f.close()
        src = self.folder / shard_name(self.split, k, "open")
        dst = self.folder / shard_name(self.split, k)
        tmp = dst.with_name(dst.name + ".tmp")
        block = BLOCK_TOKENS * self.itemsize
        digests = []
        with open(tmp, "wb") as out, open(src, "rb") as f:
            out.write(shard_header(self.dtype, self.open_tokens, self.split, k))
            while data := f.read(block):  # one pass: each block hashed and copied
                digests.append(xxhash.xxh3_128_digest(data))
                out.write(data)
            out.write(b"".join(digests))
        os.replace(tmp, dst)
        self.shards.append({"file": dst.name, "tokens": self.open_tokens, "documents": self.open_documents,
                            **file_digest(dst)})
        self.retired.append(src)
        self.open_tokens = self.open_documents = 0
        self.f = open(self.folder / shard_name(self.split, k + 1, "open"), "wb")

    def flush(self) -> dict[str, Any]:
        """Make what was written durable for a checkpoint; the state to record."""
        self.f.flush()
        return {"shards": self.shards, "open_tokens": self.open_tokens, "open_documents": self.open_documents}

    def forget_retired(self) -> None:
        """After a checkpoint recorded the finished shards: their open files are not needed to resume."""
        for p in self.retired:
            p.unlink(missing_ok=True)
        self.retired = []

    def close(self) -> None:
        """Write the last, short shard (if any tokens) and remove the open file."""
        if self.open_tokens:
            self._finish_shard()
        self.f.close()
        (self.folder / shard_name(self.split, len(self.shards), "open")).unlink(missing_ok=True)
        self.forget_retired()


# ---- the tokenize command ------------------------------------------------------------------------


def _settings(reader: DocumentReader, tokenizer: Tokenizer, shard_tokens: int, val_fraction: float,
              text_column: str) -> dict[str, Any]:
    """What an interrupted run must share with its rerun."""
    files = [{"path": f.path, "kind": f.kind, "compression": f.compression,
              "parts": [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in f.parts()]} for f in reader.files]
    return {"inputs": reader.inputs, "files": files, "tokenizer": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "shard_tokens": shard_tokens, "val_fraction": val_fraction,
            "text_column": text_column, "dtype": token_dtype(tokenizer.vocab_size)}


def _digests(reader: DocumentReader, stop: threading.Event) -> list[dict[str, Any]] | None:
    """Every source's parts with their digests; None once `stop` is set (checked between files)."""
    out = []
    for f in reader.files:
        parts = []
        for p in f.parts():
            if stop.is_set():
                return None
            parts.append({"path": p, **file_digest(p)})
        out.append({"path": f.path, "kind": f.kind, "bytes": f.size, "files": parts})
    return out


def tokenize(inputs: Sequence[str], tokenizer: Tokenizer, out: str | os.PathLike, *, workers: int = 1,
             shard_tokens: int = DEFAULT_SHARD_TOKENS, val_fraction: float = VAL_FRACTION, text_column: str = "text",
             overwrite: bool = False, progress: bool = True, tokenizer_dir: str | None = None,
             _stop_after_checkpoints: int | None = None) -> dict[str, Any]:
    """Tokenize `inputs` into the data folder `out` (see the module docstring); returns its index.

    A folder `OUT.partial` left by an interrupted run with the same settings is continued.
    `_stop_after_checkpoints` raises KeyboardInterrupt after that many checkpoints (tests: an
    interruption at a known point; a SIGKILL anywhere is tested too).
    """
    out = Path(out)
    _check_arguments(workers, shard_tokens, val_fraction)
    partial = out.with_name(out.name + ".partial")
    labelled = [("input", p) for p in inputs] + ([("tokenizer", tokenizer_dir)] if tokenizer_dir else [])
    check_output(out, labelled, overwrite=overwrite)
    check_output(partial, labelled, overwrite=True)
    reader = DocumentReader(inputs, text_column=text_column)
    settings = _settings(reader, tokenizer, shard_tokens, float(val_fraction), text_column)
    state, resumed = _start(partial, settings)
    run = _Run(partial, reader, state, shard_tokens)
    report = ByteProgress(progress, reader.total_bytes, "tokenize", extra=run.tokens_line)
    if resumed:
        done = sum(len(w.shards) for w in run.writers.values())
        report.write(f"tokenize: continuing {partial} from {done} complete shard(s) "
                     f"({run.tokens_line() or 'no tokens written'}), at "
                     f"{reader.files[reader.start[0]].path if reader.files else ''}")
    reader.on_bytes = report.update
    t0 = time.time()
    encoded = assign_splits(encode_documents(reader, tokenizer, workers), val_fraction,
                            (run.stats["train"]["documents"], run.stats["val"]["documents"]))
    sources = run.write(encoded, report, _stop_after_checkpoints)
    index = run.index(tokenizer, float(val_fraction), text_column, list(inputs), sources)
    _finish(partial, out, index)
    train, val = index["train"], index["val"]
    report.write(f"tokenize: {out}: train {train['documents']:,} documents, {train['tokens']:,} tokens in "
                 f"{len(train['shards'])} shard(s); val {val['documents']:,} documents, {val['tokens']:,} tokens in "
                 f"{len(val['shards'])} shard(s); {format_size(reader.total_bytes)} in {time.time() - t0:.2f}s with "
                 f"{workers} worker(s)" + skipped_note(len(index["skipped"]), index["null_texts"],
                                                      first=(index["skipped"] or [index["first_null"]])[0]))
    return index


def _check_arguments(workers: Any, shard_tokens: Any, val_fraction: Any) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise PoelmError(f"--workers {workers}: expected an int >= 0 (0: tokenize in this process)")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 2:
        raise PoelmError(f"--shard-tokens {shard_tokens}: expected an int >= 2")
    if not is_fraction(val_fraction):
        raise PoelmError(f"--val-fraction {val_fraction}: expected a number in [0, 1)")


def _start(partial: Path, settings: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The checkpoint to go on from, and whether it continues an interrupted run (else a new `partial`)."""
    state = _resume_state(partial, settings)
    if state is not None:
        return state, True
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state = {"settings": settings, "next": [0, 0], "skipped": [], "null_texts": 0, "first_null": None,
             "stats": {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}, "splits": {}}
    write_json(partial / PROGRESS, state)
    return state, False


class _Run:
    """One tokenize run: the reader, a ShardWriter per split, and the checkpoint (`state`, written to
    `PROGRESS` each time a shard completes, at the next document boundary)."""

    def __init__(self, partial: Path, reader: DocumentReader, state: dict[str, Any], shard_tokens: int):
        self.partial, self.reader, self.state = partial, reader, state
        self.writers = {s: ShardWriter(partial, s, state["settings"]["dtype"], shard_tokens, state["splits"].get(s))
                        for s in SPLITS}
        self.stats = state["stats"]
        reader.start = tuple(state["next"])
        # what the run before a resume counted (the reader counts only what it reads from `start`)
        self.skipped_before = list(state["skipped"])
        self.nulls_before, self.first_null = state.get("null_texts", 0), state.get("first_null")
        self.position = {f.path: k for k, f in enumerate(reader.files)}
        self.checkpoints, self.tail = 0, 0

    def tokens_line(self) -> str:
        """Tokens written so far (they trail the bytes read by the chunks in flight)."""
        n = self.stats["train"]["tokens"] + self.stats["val"]["tokens"]
        return f"{n:,} tokens written" if n else ""

    def write(self, encoded: Iterator[tuple[bool, Encoded, Encoded | None]], report: ByteProgress,
              stop_after: int | None) -> list[dict[str, Any]]:
        """Write every (is_val, document, next document) into its split's shards; the sources' digests
        (hashed in a background thread meanwhile). A bad input removes `partial`; an interruption keeps
        its last checkpoint."""
        stop = threading.Event()  # an interruption stops the digests at the next file, not after the corpus
        with ThreadPoolExecutor(1) as hasher:
            digests = hasher.submit(_digests, self.reader, stop)
            try:
                for is_val, e, after in encoded:
                    if self.add(is_val, e, after) and stop_after is not None and self.checkpoints >= stop_after:
                        raise KeyboardInterrupt(f"stopped after {self.checkpoints} checkpoint(s)")
                for w in self.writers.values():
                    w.close()
                return digests.result()
            except PoelmError:  # bad input: nothing half-written stays
                for w in self.writers.values():
                    w.f.close()
                shutil.rmtree(self.partial, ignore_errors=True)
                raise
            finally:
                stop.set()
                report.close()
                for w in self.writers.values():
                    w.f.close()

    def add(self, is_val: bool, e: Encoded, after: Encoded | None) -> bool:
        """One document into its split; True when it completed a shard and a checkpoint was written."""
        self.tail = len(e.tokens) if e.tail else self.tail
        split = "val" if is_val else "train"
        finished = self.writers[split].add(e.tokens)
        st = self.stats[split]
        st["documents"] += 1
        st["tokens"] += len(e.tokens)
        st["bytes"] += e.nbytes
        if not (finished and after is not None):
            return False
        self.checkpoint(after)
        return True

    def checkpoint(self, after: Encoded) -> None:
        """Record that the run goes on at document `after`: the shards so far and what was skipped before it."""
        reader = self.reader
        earlier = [p for p in reader.skipped if self.position[p] < after.file]  # the reader runs ahead
        nulls = reader.nulls_before(after.file, after.index)
        self.state.update(next=[after.file, after.index], skipped=self.skipped_before + earlier,
                          null_texts=self.nulls_before + nulls,
                          first_null=self.first_null or (reader.first_null if nulls else None),
                          splits={s: w.flush() for s, w in self.writers.items()})
        write_json(self.partial / PROGRESS, self.state)
        for w in self.writers.values():
            w.forget_retired()
        self.checkpoints += 1

    def index(self, tokenizer: Tokenizer, val_fraction: float, text_column: str, inputs: list[str],
              sources: list[dict[str, Any]]) -> dict[str, Any]:
        """The folder's index.json."""
        settings, reader = self.state["settings"], self.reader
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": settings["dtype"],
                "shard_tokens": settings["shard_tokens"], "block_tokens": BLOCK_TOKENS,
                "tokenizer": {"fingerprint": tokenizer.fingerprint, "name": tokenizer.name,
                              "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id},
                "split": {"val_fraction": val_fraction, "rule": SPLIT_RULE, "tail_tokens": self.tail},
                "text_column": text_column, "inputs": inputs, "sources": sources,
                "skipped": self.skipped_before + reader.skipped, "null_texts": self.nulls_before + reader.null_texts,
                "first_null": self.first_null or reader.first_null,
                **{s: {**self.stats[s], "shards": self.writers[s].shards} for s in SPLITS}}


def _finish(partial: Path, out: Path, index: dict[str, Any]) -> None:
    """Write the index and the digests of every file, and put the complete folder at `out`."""
    write_json(partial / INDEX, index)
    (partial / PROGRESS).unlink()
    manifest = {"format": "poelm-digests", "format_version": 1, "algorithm": ALGORITHM,
                "files": {INDEX: file_digest(partial / INDEX),
                          **{sh["file"]: {"bytes": sh["bytes"], ALGORITHM: sh[ALGORITHM]}
                             for s in SPLITS for sh in index[s]["shards"]}}}
    write_json(partial / MANIFEST, manifest)
    replace_dir(partial, out)


def _resume_state(partial: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint of an interrupted run with these settings; None when there is none."""
    if not (partial / PROGRESS).is_file():
        return None
    state = read_json(partial / PROGRESS, verify=False)
    refuse_changes(state.get("settings", {}), settings,
                   said=f"{partial}: an interrupted tokenize with other settings is here ({{changes}})",
                   fix=f"rerun it with the same settings to continue, or remove {partial} to start again",
                   describe=lambda c: ("the inputs changed since (size or modification time)" if c.field == "files"
                                       else f"it had {c.field}={c.then!r}, this run {c.now!r}"))
    return state


# ---- reading a folder ----------------------------------------------------------------------------


class ShardedTokens(TokenStream):
    """One split's token stream over its memory-mapped shards, sliced like a 1-D array (`len`, `[a:b]`).

    A shard is mapped, and its header checked, the first time a slice touches it; each block of
    BLOCK_TOKENS tokens is checked against the digest the shard stores for it the first time a slice
    touches that block. So no token is used unverified, and what a batch costs to verify does not
    grow with the corpus or the shard size (whole-shard digests would: a first random batch touches up
    to batch-size shards).
    """

    def __init__(self, folder: Path, shards: list[dict[str, Any]], dtype: str):
        self.folder, self.shards = folder, shards
        self.dtype = np.dtype(_DTYPES[dtype][0])
        self.dtype_name = dtype
        counts = np.array([s["tokens"] for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # (S+1,) stream offset of each shard
        self._maps: dict[int, tuple[np.ndarray, bytes, np.ndarray]] = {}  # tokens, block digests, checked
        self.ndim = 1

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _map(self, k: int) -> tuple[np.ndarray, bytes, np.ndarray]:
        if k not in self._maps:
            entry = self.shards[k]
            path = self.folder / entry["file"]
            n = entry["tokens"]
            header = shard_header(self.dtype_name, n, path.name.split("-")[0], k)
            with open(path, "rb") as f:
                found = f.read(len(header))
                f.seek(len(header) + n * self.dtype.itemsize)
                digests = f.read(16 * n_blocks(n))
            if found != header or len(digests) != 16 * n_blocks(n):
                raise PoelmError(f"{path}: its safetensors header is not the one {self.folder / INDEX} describes "
                                 f"({n} {self.dtype_name} tokens in blocks of {BLOCK_TOKENS})")
            tokens = np.memmap(path, dtype=self.dtype, mode="r", offset=len(header), shape=(n,))
            self._maps[k] = (tokens, digests, np.zeros(n_blocks(n), dtype=bool))
        return self._maps[k]

    def _slice(self, k: int, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) of shard k, every block they touch verified."""
        tokens, digests, checked = self._map(k)
        for b in range(lo // BLOCK_TOKENS, (hi - 1) // BLOCK_TOKENS + 1):
            if not checked[b]:
                block = tokens[b * BLOCK_TOKENS : (b + 1) * BLOCK_TOKENS]
                if xxhash.xxh3_128_digest(memoryview(block).cast("B")) != digests[16 * b : 16 * b + 16]:
                    raise PoelmError(f"{self.folder / self.shards[k]['file']}: tokens {b * BLOCK_TOKENS:,}.."
                                     f"{b * BLOCK_TOKENS + len(block):,} do not match their stored digest "
                                     f"(corrupted); tokenize the data again")
                checked[b] = True
        return tokens[lo:hi]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices only")
        a, b, _ = key.indices(len(self))
        if b <= a:
            return np.empty(0, dtype=self.dtype)
        k = int(np.searchsorted(self.starts, a, side="right")) - 1
        parts = []
        while a < b:
            lo, hi = int(self.starts[k]), int(self.starts[k + 1])
            parts.append(self._slice(k, a - lo, min(b, hi) - lo))
            a = min(b, hi)
            k += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):  # np.asarray(stream): the whole split in memory (tests, small data)
        return np.array(self[0 : len(self)], dtype=dtype)  # one copy: out of the memory map


class TokenFolder:
    """A tokenized data folder, opened for training: what `TextCorpus` gives pretraining (train and val
    token streams, split statistics, a summary), from memory-mapped shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file() and (self.path / PROGRESS).is_file():
            raise PoelmError(f"{self.path}: an unfinished `poelm data tokenize` (no {INDEX} yet); rerun that command "
                             f"to finish it")
        self.index = index = read_json(index_path)  # checked against digests.json
        if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
            raise PoelmError(f"{index_path}: format {index.get('format')!r} version {index.get('format_version')!r}; "
                             f"expected {FORMAT!r} version {FORMAT_VERSION} (written by `poelm data tokenize`)")
        try:
            dtype = index["dtype"]
            if dtype not in _DTYPES:
                raise PoelmError(f"{index_path}: field 'dtype' is {dtype!r}; expected one of {sorted(_DTYPES)}")
            self.tokenizer = index["tokenizer"]
            self.val_fraction = float(index["split"]["val_fraction"])
            self.tail_tokens = int(index["split"]["tail_tokens"])
            self.inputs = list(index["inputs"])
            self.skipped = list(index["skipped"])
            self.null_texts = int(index.get("null_texts", 0))  # absent in folders written before it was counted
            self.bos_id = int(self.tokenizer["bos_id"])
            streams, stats = {}, {}
            for split in SPLITS:
                entry = index[split]
                stats[split] = SplitStats(int(entry["documents"]), int(entry["tokens"]), int(entry["bytes"]))
                for k, shard in enumerate(entry["shards"]):
                    p = self.path / shard["file"]
                    want = shard_bytes(dtype, shard["tokens"], split, k)
                    have = p.stat().st_size if p.is_file() else None
                    if have != want:
                        what = "missing" if have is None else f"{have:,} bytes"
                        raise PoelmError(f"{p}: {what}; {index_path} expects {want:,} bytes ({shard['tokens']:,} "
                                         f"tokens){' (truncated?)' if have is not None and have < want else ''}")
                streams[split] = ShardedTokens(self.path, entry["shards"], dtype)
                if sum(s["tokens"] for s in entry["shards"]) != stats[split].tokens:
                    raise PoelmError(f"{index_path}: {split} shards hold {len(streams[split]):,} tokens, "
                                     f"'tokens' says {stats[split].tokens:,}")
        except (KeyError, TypeError, ValueError) as e:
            raise PoelmError(f"{index_path}: malformed index ({type(e).__name__}: {e}); expected the fields "
                             f"`poelm data tokenize` writes") from None
        self.train_tokens, self.val_tokens = streams["train"], streams["val"]
        self.train, self.val = stats["train"], stats["val"]

    def check_tokenizer(self, tokenizer: Tokenizer, whose: str) -> None:
        """Refuse a model whose tokenizer is not the one the folder was made with."""
        fp = self.tokenizer.get("fingerprint")
        if fp != tokenizer.fingerprint:
            raise PoelmError(f"{self.path / INDEX}: tokenized with tokenizer {fp} (vocabulary "
                             f"{self.tokenizer.get('vocab_size')}), but {whose} uses {tokenizer.fingerprint} "
                             f"(vocabulary {tokenizer.vocab_size}); tokenize the data again with the model's "
                             f"tokenizer (poelm data tokenize --tokenizer MODELDIR ...)")

    def summary(self) -> str:
        return (f"data: {self.path}: train {self.train.documents:,} documents, {self.train.tokens:,} tokens in "
                f"{len(self.train_tokens.shards)} shard(s); val {self.val.documents:,} documents, "
                f"{self.val.tokens:,} tokens (tokenized, memory-mapped){tail_note(self.tail_tokens)}")

    def stats(self) -> dict[str, Any]:
        return {"inputs": [str(self.path)], "tokenized_from": self.inputs, "val_fraction": self.val_fraction,
                "train": asdict(self.train), "val": asdict(self.val), "skipped_files": len(self.skipped),
                "null_texts": self.null_texts, "tail_tokens": self.tail_tokens}

    def split(self) -> dict[str, Any]:
        """How val was held out, for run.json."""
        return split_record(self.val_fraction, self.tail_tokens)


def open_corpus(paths: Sequence[str], tokenizer: Tokenizer, val_fraction: float | None, progress: bool,
                whose: str = "the model"):
    """Pretraining's data: a tokenized folder (the only path given) memory-mapped, or raw inputs read
    and tokenized in memory (`TextCorpus.build`). val_fraction None: the folder's, or VAL_FRACTION for
    raw inputs."""
    folders = [p for p in paths if is_token_folder(p)]
    if not folders:
        return TextCorpus.build(paths, tokenizer, val_fraction=VAL_FRACTION if val_fraction is None else val_fraction,
                                progress=progress)
    if len(paths) != 1:
        raise PoelmError(f"{folders[0]}: a tokenized data folder must be the only --data path (got {list(paths)})")
    folder = TokenFolder(folders[0])
    folder.check_tokenizer(tokenizer, whose)
    if val_fraction is not None and val_fraction != folder.val_fraction:
        raise PoelmError(f"--val-fraction {val_fraction}: {folders[0]} was split with {folder.val_fraction} when it "
                         f"was tokenized (leave --val-fraction out, or tokenize again)")
    if progress:
        print(folder.summary(), file=sys.stderr, flush=True)
    return folder
