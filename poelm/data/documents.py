"""Documents read from input paths: the one reader of plain text in poelm (tokenizer training, pretraining,
`poelm eval bpb`, `poelm data tokenize`), so they all see the same documents.

Design choices (the whole of them: docs/data.md, "Reading documents"):
- Inputs are text files (one file, one document), directories (walked in sorted order) and records
  (records.py: JSONL, JSON arrays, Parquet, `datasets` folders, gzip/zstd). A file named explicitly
  must be non-empty text; inside a directory other files are skipped and listed (`reader.skipped`).
- A null text is no document in every format and is counted; a malformed record is an error naming
  its file and line (or row).
- Paths are checked and sized when the reader is made, so a typo fails before any work and progress
  counts bytes against a known total.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from ..core.errors import PoelmError
from .records import BadRecord, InputFile, expand, is_token_folder, read_bytes, records


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
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.inputs: list[str] = [os.fspath(p) for p in paths]
        if not self.inputs:
            raise PoelmError(f"no input paths given; expected {INPUTS}")
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
        first, start = self.start
        self._consumed(sum(f.size for f in self.files[:first]))
        for k, f in enumerate(self.files[first:], start=first):
            kind = "text" if f.kind == "json" and not f.explicit else f.kind  # a directory's .json is text
            if kind != "text":
                yield from self._records(k, f, start if k == first else 0, kind)
                continue
            if not (k == first and start > 0):  # a resume past a text file's one document skips it
                yield from self._text_file(k, f)
            self._consumed(f.size)
        if self.documents == 0 and self.start == (0, 0):
            skipped = skipped_note(len(self.skipped), self.null_texts, ", ")
            raise PoelmError(f"no documents in {self.inputs} (empty files and records hold none{skipped}); "
                             f"expected {INPUTS} with non-empty text")

    def _text_file(self, k: int, f: InputFile) -> Iterator[Document]:
        """One file, one document: skipped (and listed) inside a directory when it is not UTF-8 text."""
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

    def _records(self, k: int, f: InputFile, start: int, kind: str) -> Iterator[Document]:
        """The documents of a file of records from record `start`: each record's text, checked."""
        column = self.text_column if kind in ("parquet", "datasets") else None
        for r in records(f, start, column):
            if r.index >= 0:
                text = _record_text(r.value, r.where, column)
                if text is None:  # a null text, in any format: no document, counted
                    self.null_texts += 1
                    self.first_null = self.first_null or r.where
                    self._null_at.append((k, r.index))
                elif text:
                    self.documents += 1
                    yield Document(r.where, text, k, r.index)
            self._consumed(r.nbytes)


def _record_text(value: Any, where: str, column: str | None) -> str | None:
    """A record's text (None: a null text), or an error naming `where` and what the record held."""
    if isinstance(value, BadRecord):
        raise PoelmError(str(value)) from None
    if column is None:  # a JSON record: an object with a "text" string (or null)
        if not isinstance(value, dict) or "text" not in value:
            got = f"an object with keys {sorted(value)}" if isinstance(value, dict) else json_type(value)
            raise PoelmError(f"{where}: expected an object with a 'text' field, got {got}")
        value = value["text"]
        if value is not None and not isinstance(value, str):
            raise PoelmError(f"{where}: 'text' is {json_type(value)}; expected a string (or null: no text)")
    elif value is not None and not isinstance(value, str):
        raise PoelmError(f"{where}: column {column!r} holds {type(value).__name__}; expected strings")
    if value is not None:
        try:  # JSON escapes can spell a lone surrogate ("\ud800"), which no tokenizer can encode
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PoelmError(f"{where}: 'text' has an unpaired surrogate at character {e.start}; "
                             f"expected valid Unicode") from None
    return value


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
