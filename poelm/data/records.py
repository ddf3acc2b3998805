"""Records from the files corpora come in: the one reader under pretraining text, SFT conversations
and `poelm data tokenize`.

Design choices (the whole of them: docs/data.md, "Records"):
- A file's format is decided by its name after a compression suffix (`.gz`, `.zst`) is taken off:
  `.jsonl`, `.json` (one array), `.parquet`; a `datasets` folder is one input. Callers decide what
  the rest ("text") is.
- Every record says where it is (`path:LINE`, `path[ROW]`) and the bytes of the file on disk it
  accounts for, so errors name it and progress in bytes reaches each file's size exactly.
- A bad JSONL line is not raised here: its record carries a `BadRecord` for the caller to raise or
  count; a whole-file problem is raised.
- pyarrow, zstandard and `datasets` are imported only when a file needs them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from ..core.errors import PoelmError

BATCH_ROWS = 1024  # Parquet / datasets rows decoded at a time
_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# Reasons a record is bad (SFT's --skip-invalid counts records under them).
NOT_UTF8, INVALID_JSON = "not UTF-8", "invalid JSON"


class BadRecord(PoelmError):
    """A record-level error: `reason` is what a caller that skips bad records counts it under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Record(NamedTuple):
    """One record: where it is (`path:LINE` or `path[ROW]`), its 0-based index in the file (lines for
    JSONL), its value (a JSON value, a row dict, or a text file's str) or the BadRecord that stands
    for it, and the bytes of the file on disk it accounts for."""

    where: str
    index: int
    value: Any
    nbytes: int


@dataclass(frozen=True)
class InputFile:
    """One input: `kind` is "jsonl", "json", "parquet", "datasets" or "text"; `compression` None,
    "gzip" or "zstd"; `explicit` when the user named it (not found inside a directory); `size` the
    bytes on disk (all files of a `datasets` folder)."""

    path: str
    kind: str
    compression: str | None
    explicit: bool
    size: int

    def parts(self) -> list[str]:
        """The files on disk this input reads (one, or a `datasets` folder's files)."""
        if self.kind != "datasets":
            return [self.path]
        return [os.path.join(root, f) for root, dirs, files in sorted(os.walk(self.path))
                for f in sorted(files) if not f.startswith(".")]


# A tokenized data folder (shards.py writes it): recognised here, where every input's kind is decided.
FORMAT, INDEX, PROGRESS = "poelm-tokens", "index.json", "progress.json"


def is_token_folder(path: str | os.PathLike) -> bool:
    """A directory holding a tokenized data folder's index (its first line names the format; a corpus
    folder that happens to hold an index.json is not one), or one being written."""
    if os.path.isfile(os.path.join(path, PROGRESS)):
        return True
    try:
        with open(os.path.join(path, INDEX), "rb") as f:
            return f'"format": "{FORMAT}"'.encode() in f.read(200)
    except OSError:
        return False


def is_datasets_folder(path: str) -> bool:
    """A folder written by `datasets`' save_to_disk: a Dataset (state.json + dataset_info.json) or a
    DatasetDict (dataset_dict.json)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))))


def classify(path: str, explicit: bool) -> InputFile:
    """The InputFile for an existing file or `datasets` folder, its kind from its name."""
    if os.path.isdir(path):
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
        return InputFile(path, "datasets", None, explicit, size)
    stem, ext = os.path.splitext(path.lower())
    compression = _COMPRESSION.get(ext)
    if compression is not None:
        ext = os.path.splitext(stem)[1]
    kind = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(ext, "text")
    if kind == "parquet" and compression:
        if explicit:
            raise PoelmError(f"{path}: a compressed Parquet file; Parquet compresses inside the file, "
                             f"expected .parquet")
        kind = "text"  # inside a directory: an unreadable file, skipped like any binary one
    return InputFile(path, kind, compression, explicit, os.path.getsize(path))


# ---- opening ------------------------------------------------------------------------------------


class _Counted(io.RawIOBase):
    """A raw file whose reads are counted, so progress can follow a compressed stream's position on disk."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.pos += n or 0
        return n


def _open_stream(f: InputFile) -> tuple[io.BufferedIOBase, _Counted]:
    """A binary stream of the file's decompressed bytes, and the counter of bytes read from disk."""
    raw = _Counted(open(f.path, "rb"))
    if f.compression is None:
        return io.BufferedReader(raw, 1 << 20), raw
    if f.compression == "gzip":
        return gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20), mode="rb"), raw
    try:
        import zstandard
    except ImportError:
        raise PoelmError(f"{f.path}: reading zstd needs the 'zstandard' package (pip install zstandard)") from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), 1 << 20), raw


def _stream_error(f: InputFile, e: Exception) -> PoelmError:
    what = {"gzip": "gzip", "zstd": "zstd"}.get(f.compression or "", "")
    return PoelmError(f"{f.path}: cannot read the {what} stream ({e}); expected a complete {what} file")


@contextmanager
def _opened(f: InputFile) -> Iterator[tuple[io.BufferedIOBase, _Counted]]:
    """`_open_stream` for a `with` block: closed after, a broken compressed stream one error naming it."""
    stream, raw = _open_stream(f)
    try:
        with stream:
            yield stream, raw
    except (OSError, EOFError, ValueError) as e:
        if f.compression is None:
            raise
        raise _stream_error(f, e) from None
    finally:
        raw.f.close()


def read_bytes(f: InputFile) -> bytes:
    """The whole (decompressed) content of a text or JSON file."""
    with _opened(f) as (stream, _):
        return stream.read()


def parse_json(data: bytes | str, where: str, bom: bool = True) -> Any:
    """One JSON value, or a BadRecord naming `where` (not UTF-8, invalid, too large to parse). A UTF-8
    byte-order mark is allowed where a file starts (`bom`)."""
    if isinstance(data, bytes):
        if b"\x00" in data:
            raise BadRecord(f"{where}: not UTF-8 text; expected JSON", NOT_UTF8)
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord(f"{where}: not UTF-8 text; expected JSON", NOT_UTF8) from None
    try:
        return json.loads(data.removeprefix("\ufeff") if bom else data)
    except json.JSONDecodeError as e:
        hint = (" (the file looks like one JSON array: name it .json, or write one object per line as JSONL)"
                if data.strip() == "[" else
                " (the file looks like JSONL, one value per line: name it .jsonl)" if e.msg == "Extra data" else "")
        raise BadRecord(f"{where}: not valid JSON ({e.msg} at column {e.colno}){hint}", INVALID_JSON) from None
    except (ValueError, RecursionError) as e:  # an integer over Python's 4300 digits, deep nesting
        raise BadRecord(f"{where}: JSON too large to parse ({e})", INVALID_JSON) from None


# ---- records per format -------------------------------------------------------------------------


def _jsonl(f: InputFile, start: int) -> Iterator[Record]:
    done = 0  # bytes of the file on disk already reported
    with _opened(f) as (stream, raw):
        for index, line in enumerate(stream):
            pos = raw.pos if f.compression else done + len(line)
            n, done = pos - done, pos
            if index < start or not line.strip():  # skipped or blank: bytes only
                if n:
                    yield Record(f"{f.path}:{index + 1}", -1, None, n)
                continue
            try:
                value = parse_json(line, f"{f.path}:{index + 1}", bom=index == 0)
            except BadRecord as e:
                value = e
            yield Record(f"{f.path}:{index + 1}", index, value, n)
    if f.size > done:
        yield Record(f.path, -1, None, f.size - done)  # the compressed stream's trailer


def _json_array(f: InputFile, start: int) -> Iterator[Record]:
    try:
        data = parse_json(read_bytes(f), f.path)
    except BadRecord as e:
        raise PoelmError(str(e)) from None
    if not isinstance(data, list):
        raise PoelmError(f"{f.path}: a JSON {type(data).__name__}; expected a JSON array of records "
                         f"(or JSONL: one record per line)")
    yield from _spread(f.path, f.size, ((i, v) for i, v in enumerate(data) if i >= start), len(data), start)


def _spread(name: str, size: int, rows: Iterator[tuple[int, Any]], total: int, start: int) -> Iterator[Record]:
    """Records `name[ROW]` for rows of a table of `total` rows, `size` bytes attributed to them in
    proportion (cumulative, so the sum is exact)."""
    done = size * start // max(total, 1)
    if done:
        yield Record(name, -1, None, done)
    for i, value in rows:
        upto = size * (i + 1) // total
        yield Record(f"{name}[{i}]", i, value, upto - done)
        done = upto
    if size > done:
        yield Record(name, -1, None, size - done)


def _parquet(f: InputFile, start: int, column: str | None) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except (pa.ArrowException, OSError) as e:
        raise PoelmError(f"{f.path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if column is not None and column not in names:
        raise PoelmError(f"{f.path}: no column {column!r}; it has {names} (choose one with --text-column)")
    total = pf.metadata.num_rows
    groups, first = [], 0  # skip whole row groups before `start` through the metadata
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n > start:
            groups.append(g)
        else:
            first += n

    def rows() -> Iterator[tuple[int, Any]]:
        i = first
        try:
            batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups,
                                      columns=[column] if column is not None else None)
            for batch in batches:
                values = batch.column(0).to_pylist() if column is not None else batch.to_pylist()
                for v in values:
                    if i >= start:
                        yield i, v
                    i += 1
        except (pa.ArrowException, OSError) as e:
            raise PoelmError(f"{f.path}: Parquet data unreadable near row {i} ({e})") from None

    yield from _spread(f.path, f.size, rows(), total, start)


def load_datasets_folder(path: str) -> Any:
    """The `datasets.Dataset` saved in `path` (a DatasetDict's `train` split)."""
    try:
        import datasets
    except ImportError:
        raise PoelmError(f"{path}: reading a `datasets` folder needs the optional extra: "
                         f"pip install 'poelm[data]'") from None
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # the library raises many types (FileNotFoundError, ArrowInvalid, JSONDecodeError)
        raise PoelmError(f"{path}: not a readable `datasets` folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise PoelmError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(ds)}); "
                             f"name the split's folder, e.g. {os.path.join(path, sorted(ds)[0])}")
        ds = ds["train"]
    return ds


def dataset_records(ds: Any, name: str, size: int, start: int = 0, column: str | None = None) -> Iterator[Record]:
    """The rows of a `datasets.Dataset` (a folder's, or a Hub split's) as records `name[ROW]`, `size`
    bytes spread over them; `column` as for `records`."""
    if column is not None and column not in ds.column_names:
        raise PoelmError(f"{name}: no column {column!r}; it has {ds.column_names} (choose one with --text-column)")
    total = len(ds)
    part = ds.select_columns([column]) if column is not None else ds

    def rows() -> Iterator[tuple[int, Any]]:
        for lo in range(start, total, BATCH_ROWS):
            batch = part[lo : lo + BATCH_ROWS]  # dict of columns
            if column is not None:
                yield from zip(range(lo, total), batch[column])
            else:
                keys = list(batch)
                yield from zip(range(lo, total), (dict(zip(keys, vals)) for vals in zip(*batch.values())))

    yield from _spread(name, size, rows(), total, start)


def records(f: InputFile, start: int = 0, column: str | None = None) -> Iterator[Record]:
    """The records of one input, from record `start` on (see the module docstring).

    column: for Parquet and `datasets`, read only this column and yield its values (else row dicts).
    Records with index -1 and value None only account for bytes (a trailer, skipped rows).
    """
    if f.kind == "jsonl":
        return _jsonl(f, start)
    if f.kind == "json":
        return _json_array(f, start)
    if f.kind == "parquet":
        return _parquet(f, start, column)
    if f.kind == "datasets":
        return dataset_records(load_datasets_folder(f.path), f.path, f.size, start, column)
    raise PoelmError(f"{f.path}: a text file holds one document, not records; expected JSONL, JSON, Parquet or "
                     f"a `datasets` folder")


def walk_files(directory: str, prune: frozenset[str] = frozenset({"__pycache__"}),
               whole: Callable[[str], bool] = lambda folder: False) -> Iterator[str]:
    """Regular files under `directory` in sorted order (a directory's files, then its subdirectories),
    skipping hidden entries (.git, .venv) and directories named in `prune`; a subdirectory that `whole`
    accepts is yielded as one path, not walked."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in prune)
        if root != directory and whole(root):
            dirs[:] = []
            yield root
            continue
        yield from (os.path.join(root, f) for f in sorted(files) if not f.startswith("."))


def expand(paths: Sequence[str], accept: Callable[[InputFile], bool], what: str) -> tuple[list[InputFile], list[str]]:
    """The inputs of `paths` in order: a file or `datasets` folder as itself, a directory walked in
    sorted order (hidden entries and `__pycache__` skipped; a `datasets` folder inside is one input, not
    its files) keeping the files `accept` takes (the rest returned as ignored). A missing path is an
    error naming `what` was expected."""
    out: list[InputFile] = []
    ignored: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if is_datasets_folder(p) or os.path.isfile(p):
            out.append(classify(p, explicit=True))
        elif os.path.isdir(p):
            for path in walk_files(p, whole=is_datasets_folder):
                f = classify(path, explicit=False)
                (out.append(f) if accept(f) else ignored.append(path))
        else:
            raise PoelmError(f"{p}: no such file or directory; expected {what}")
    return out, ignored
