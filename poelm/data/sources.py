"""SFT data SPECs and the conversations read from them: `PATH[:EPOCHS]` or `hf:NAME[@SPLIT][:EPOCHS]`,
each read into a `Source`, what was read and skipped in a `LoadReport`.

Design choices (the whole of them: docs/data.md, "SPECs"):
- Only a trailing `:<digits>` is the epoch count, so paths holding ':' elsewhere work.
- A SPEC names a file (JSONL whatever its name, unless `.json`: a JSON array, or `.parquet`; `.gz` /
  `.zst` decompressed), a directory of them, a `datasets` folder or a Hub split (`hf:`, through
  `datasets.load_dataset`, its cache and offline switches as the library has them); `datasets` (the
  extra `poelm[data]`) is imported only for those.
- The same input reached twice is an error: it would put one record in both splits (repeat a source
  with `:EPOCHS` instead).
- A table row (Parquet, `datasets`, Hub) is read as a record: a None cell is a missing key, and a
  `Sequence` of message structs is turned back into a list of messages.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

from ..common.progress import ByteProgress, format_size
from ..core.errors import PoelmError
from .conversations import Conversation, to_messages
from .records import BadRecord, InputFile, dataset_records, expand, is_datasets_folder, records

_SPEC_EPOCHS = re.compile(r"^(.*):([+-]?\d+)$", re.DOTALL)


def parse_spec(spec: str) -> tuple[str, int]:
    """`PATH[:EPOCHS]` -> (PATH, EPOCHS); EPOCHS defaults to 1. Only a trailing `:<digits>` is the
    epoch count ("a:b.jsonl" is a path, "a:b.jsonl:3" is that path for 3 epochs; "hf:a/b@test:3" is
    ("hf:a/b@test", 3): a Hub NAME is never all digits, so the colon of `hf:` is not taken for one)."""
    if not isinstance(spec, str) or not spec:
        raise PoelmError(f"data SPEC {spec!r}: expected PATH[:EPOCHS], e.g. code.jsonl:3")
    m = _SPEC_EPOCHS.match(spec)
    if m is None:
        if spec.endswith(":"):  # "data.jsonl:" is a half-typed epoch count, not a file name
            raise PoelmError(f"data SPEC {spec!r}: nothing after ':'; "
                             f"expected PATH[:EPOCHS] with EPOCHS a positive int")
        return spec, 1
    path, epochs = m.group(1), int(m.group(2))
    if not path:
        raise PoelmError(f"data SPEC {spec!r}: no PATH before ':'; expected PATH[:EPOCHS]")
    if epochs < 1:
        raise PoelmError(f"data SPEC {spec!r}: EPOCHS is {epochs}; expected a positive int")
    return path, epochs


@dataclass
class Source:
    """The conversations of one SPEC: its path as given, its epoch count, and (where, messages) pairs."""

    path: str
    epochs: int
    conversations: list[Conversation]
    files: list[str] = field(default_factory=list)  # the inputs read, in order (paths; hf:NAME@SPLIT)


@dataclass
class LoadReport:
    """What `load_conversations` read and skipped.

    skipped: input (file path, `datasets` folder or hf:NAME@SPLIT) -> reason -> records skipped
    (inputs with skips only); first_error: reason -> the first skipped record's full error;
    ignored_files: files in SPEC directories that are not .jsonl, .json or .parquet (compressed or not).
    """

    conversations: int = 0
    files: int = 0
    bytes: int = 0
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)
    ignored_files: list[str] = field(default_factory=list)

    @property
    def total_skipped(self) -> int:
        return sum(sum(r.values()) for r in self.skipped.values())

    def skipped_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for reasons in self.skipped.values():
            for reason, n in reasons.items():
                out[reason] = out.get(reason, 0) + n
        return out

    def summary(self) -> str:
        """One log line."""
        line = f"chat data: {self.conversations:,} conversations from {self.files} file(s) ({format_size(self.bytes)})"
        if self.skipped:
            reasons = ", ".join(f"{n:,} {r}" for r, n in sorted(self.skipped_by_reason().items()))
            line += (f"; skipped {self.total_skipped:,} invalid record(s) in {len(self.skipped)} file(s) ({reasons}; "
                     f"first: {next(iter(self.first_error.values()))})")
        if self.ignored_files:
            line += (f"; ignored {len(self.ignored_files)} file(s) not .jsonl/.json/.parquet "
                     f"(first: {self.ignored_files[0]})")
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for run metadata."""
        return {"conversations": self.conversations, "files": self.files, "bytes": self.bytes,
                "skipped_total": self.total_skipped, "skipped_by_reason": self.skipped_by_reason(),
                "skipped": self.skipped, "first_error": self.first_error, "ignored_files": self.ignored_files}


HF_PREFIX = "hf:"
_DIRECTORY_KINDS = ("jsonl", "json", "parquet", "datasets")  # what a directory SPEC contributes
_TABLE_KINDS = ("parquet", "datasets", "hub")  # whose records are rows of a table
_EXPECTED = {"jsonl": "one JSON conversation object per line", "json": "a JSON array of conversation objects",
             "parquet": "rows of conversation records", "datasets": "rows of conversation records",
             "hub": "rows of conversation records"}
# what a SPEC's PATH may name (in errors and in `poelm specialist train --data`'s help)
SPEC_INPUTS = ("a .jsonl, .json or .parquet file (.gz/.zst compressed too), a directory of them, a `datasets` "
               "folder, or hf:NAME[@SPLIT]")


class _Hub(NamedTuple):
    """A split of a Hugging Face Hub dataset: `path` "hf:NAME@SPLIT", the loaded `datasets.Dataset`,
    and the bytes of its cache files (what progress counts)."""

    path: str
    dataset: Any
    size: int
    kind: str = "hub"


def _load_hub(path: str) -> _Hub:
    """`hf:NAME[@SPLIT]` through `datasets.load_dataset(NAME, split=SPLIT)`: the library's cache and
    offline mode (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) as it has them; any failure is one line."""
    name, at, split = path[len(HF_PREFIX):].partition("@")
    if not name or (at and not split):
        raise PoelmError(f"data SPEC {path!r}: expected hf:NAME[@SPLIT][:EPOCHS], e.g. hf:sahil2801/CodeAlpaca-20k")
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise PoelmError(f"{path}: loading a Hugging Face Hub dataset needs the optional extra: "
                         f"pip install 'poelm[data]'") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the library raises many types (ConnectionError, DatasetNotFoundError, ValueError)
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise PoelmError(f"{HF_PREFIX}{name}: could not load split {split!r} from the Hugging Face Hub "
                         f"({type(e).__name__}: {first}); without a network only datasets already in the cache "
                         f"(~/.cache/huggingface/datasets, or $HF_DATASETS_CACHE) load") from None
    size = sum(os.path.getsize(c["filename"]) for c in ds.cache_files if os.path.isfile(c["filename"]))
    return _Hub(f"{HF_PREFIX}{name}@{split}", ds, size)


def _spec_inputs(path: str, report: LoadReport) -> list[InputFile | _Hub]:
    """The inputs of one SPEC's PATH in reading order (module docstring); a directory's other files
    go to `report.ignored_files`."""
    if path.startswith(HF_PREFIX):
        return [_load_hub(path)]

    def accept(f: InputFile) -> bool:
        return f.kind in _DIRECTORY_KINDS

    files, ignored = expand([path], accept, SPEC_INPUTS)
    report.ignored_files += ignored
    if os.path.isdir(path) and not is_datasets_folder(path):
        if not files:
            raise PoelmError(f"{path}: a directory without .jsonl, .json or .parquet files; expected conversation "
                             f"files")
        return files
    # a file named explicitly is JSONL whatever its name (unless .json or .parquet)
    return [dataclasses.replace(f, kind="jsonl") if f.kind == "text" else f for f in files]


def _table_row(row: Any) -> Any:
    """A Parquet / `datasets` row as a record. A table gives every row every column, so a None cell
    is a missing key; and `datasets` stores a `Sequence` of message structs as a dict of equal-length
    lists, which is turned back into the list of message dicts."""
    if not isinstance(row, dict):
        return row
    row = {k: v for k, v in row.items() if v is not None}
    for key in ("messages", "conversations"):
        v = row.get(key)
        if (isinstance(v, dict) and v and all(isinstance(x, list) for x in v.values())
                and len({len(x) for x in v.values()}) == 1):
            row[key] = [dict(zip(v, items)) for items in zip(*v.values())]
    return row


def _read_input(f: InputFile | _Hub, skip_invalid: bool, report: LoadReport,
                progress: ByteProgress) -> list[Conversation]:
    """The valid conversations of one input, in order; a bad record raises, or with `skip_invalid` is
    counted in `report`. An input without records is an error."""
    if f.kind in _DIRECTORY_KINDS and f.size == 0:  # no JSON array or Parquet footer to read either
        raise PoelmError(f"{f.path}: empty file (no records); expected {_EXPECTED[f.kind]}")
    table = f.kind in _TABLE_KINDS
    out: list[Conversation] = []
    n = 0
    for r in dataset_records(f.dataset, f.path, f.size) if isinstance(f, _Hub) else records(f):
        progress.update(r.nbytes)
        if r.index < 0:  # bytes only (a blank line, a compressed stream's trailer)
            continue
        n += 1
        bad = r.value if isinstance(r.value, BadRecord) else None  # a JSONL line not UTF-8 or not JSON
        if bad is None:
            try:
                out.append(Conversation(r.where, to_messages(_table_row(r.value) if table else r.value, r.where)))
            except BadRecord as e:
                bad = e
        if bad is not None:
            if not skip_invalid:
                raise PoelmError(str(bad)) from None
            counts = report.skipped.setdefault(f.path, {})
            counts[bad.reason] = counts.get(bad.reason, 0) + 1
            report.first_error.setdefault(bad.reason, str(bad))
    if n == 0:
        what = "empty file (no records)" if f.kind in _DIRECTORY_KINDS else "no rows"
        raise PoelmError(f"{f.path}: {what}; expected {_EXPECTED[f.kind]}")
    return out


def load_conversations(specs: Sequence[str], skip_invalid: bool = False,
                       progress: bool | None = None) -> tuple[list[Source], LoadReport]:
    """Read every SPEC (`PATH[:EPOCHS]` or `hf:NAME[@SPLIT][:EPOCHS]`) into a Source, in order.

    Raises PoelmError (naming `path:LINE`, `path[ROW]` or `hf:NAME@SPLIT[ROW]`) for a bad record
    unless `skip_invalid`, in which case bad records are counted in the report per input and reason.
    An empty file, a missing path, an unreadable file or Hub dataset, an input reached twice, and a
    SPEC with no valid conversation are errors either way. progress: False is silent; None or True
    reports bytes read on stderr and a closing summary line (as `corpus.TextCorpus.build`; pass
    `rank == 0` under DDP).
    """
    if isinstance(specs, str) or not specs:
        raise PoelmError(f"no data SPECs given (got {specs!r}); expected a list of PATH[:EPOCHS]")
    report = LoadReport()
    parsed = [(spec, *parse_spec(spec)) for spec in specs]
    plan: list[tuple[str, int, list[InputFile | _Hub]]] = []
    seen: dict[str, str] = {}  # real path (a Hub split: hf:NAME@SPLIT) -> the SPEC that named it first
    for spec, path, epochs in parsed:
        inputs = _spec_inputs(path, report)
        for f in inputs:
            key = f.path if isinstance(f, _Hub) else os.path.realpath(f.path)
            if key in seen:
                raise PoelmError(f"{f.path}: read twice (by SPECs {seen[key]!r} and {spec!r}); a record must be in "
                                 f"one split only: give each input once and repeat it with PATH:EPOCHS")
            seen[key] = spec
        plan.append((path, epochs, inputs))
    report.bytes = sum(f.size for _, _, inputs in plan for f in inputs)
    bar = ByteProgress(progress is not False, report.bytes, "chat data")
    sources = []
    try:
        for path, epochs, inputs in plan:
            conversations = []
            for f in inputs:
                conversations += _read_input(f, skip_invalid, report, bar)
            if not conversations:
                skipped = sum(sum(report.skipped.get(f.path, {}).values()) for f in inputs)
                raise PoelmError(f"{path}: no valid conversations ({skipped:,} invalid record(s) skipped, first: "
                                 f"{next(iter(report.first_error.values()), 'none')})")
            sources.append(Source(path, epochs, conversations, [f.path for f in inputs]))
            report.conversations += len(conversations)
            report.files += len(inputs)
    finally:
        bar.close()
    bar.write(report.summary())
    return sources, report


