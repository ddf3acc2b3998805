"""Conversations for stage SFT: records of several shapes from JSONL, JSON, Parquet, `datasets`
folders or the Hugging Face Hub, a seeded mixture with a held-out split, best-fit packing into rows
with document boundaries, and a row loader for DDP.

Design choices:
- A data SPEC is `PATH[:EPOCHS]` or `hf:NAME[@SPLIT][:EPOCHS]`; only a trailing `:<digits>` is the
  epoch count, so paths holding ':' elsewhere work. Files are read through `records.py`, the format
  decided by the name after a `.gz` / `.zst` suffix is taken off (the stream is decompressed): a
  file named explicitly is a JSON array if `.json`, Parquet if `.parquet`, and JSONL otherwise
  (whatever its name); a directory contributes its `.jsonl`, `.json` and `.parquet` files (compressed
  or not) and the `datasets` folders inside it in sorted order (`records.expand`; other files are
  ignored and listed in the report); a folder written by `datasets`' `save_to_disk` is read row by
  row (a DatasetDict: its `train` split).
- `hf:NAME[@SPLIT]` (NAME as on the Hub, e.g. `sahil2801/CodeAlpaca-20k`; SPLIT `train` by default)
  is `datasets.load_dataset(NAME, split=SPLIT)`, with the library's cache and its offline switches
  (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) as the library has them; any failure to load is one error
  line naming `hf:NAME`, the split and the cause. `datasets` (the extra `poelm[data]`) is imported only
  for `hf:` SPECs and `datasets` folders.
- The same input reached twice through the SPECs (a file or `datasets` folder by its real path, a Hub
  split by `hf:NAME@SPLIT`) is an error: it would put one record in both the val and the train split;
  repeat a source with `:EPOCHS` instead.
- A record is a JSONL line, an element of a JSON array, or a row of a Parquet file, `datasets` folder
  or Hub split (a dict of its columns; Parquet list<struct> columns come as lists of dicts). Rows of
  those tables are read as records with two adjustments, since a table gives every row every
  column: a None cell is a missing key (an Alpaca row without `input` has `input` None in a table
  that others give it to), and a `messages` / `conversations` cell that `datasets` stores as a dict
  of equal-length lists (a `Sequence` of structs) is turned back into the list of message dicts. In
  JSON, `null` stays a value (`{"output": null}` is a bad conversation).
- Each record's shape is detected per record, first match wins:
  `messages` [{role, content}] (roles system/user/assistant) | ShareGPT `conversations`
  [{from, value}] (from human/user, gpt/assistant, system) | Alpaca {instruction, input?, output}
  (user = instruction + "\\n\\n" + input when input is non-empty) | Evol-Instruct {instruction,
  response} | Magicoder OSS-Instruct {problem, solution}. Extra keys are ignored.
- A conversation is checked here with the tokenizer's rules (`chat_turns` in core/tokenizer.py,
  called, not copied: optional leading system, then user and assistant turns alternating, beginning
  with either, so an app's opening assistant greeting is kept and trained on; a system message needs
  a user message after it; string contents) and then three more, for SFT: it ends with an assistant
  reply (an unanswered turn is row space with no loss), user and assistant contents are not blank,
  and contents are valid Unicode (no lone surrogates).
  A blank system message is dropped (ShareGPT dumps carry `{"from": "system", "value": ""}`).
- Every error names where the record is -- `path:LINE` (1-based) for JSONL, `path[ROW]` (0-based)
  for JSON arrays, Parquet and `datasets` folders, `hf:NAME@SPLIT[ROW]` for the Hub -- or the file,
  and what was expected. With `skip_invalid` a bad record (a JSONL line not UTF-8 or invalid JSON,
  not an object, unknown shape, bad conversation) is skipped and counted per input and reason; an
  empty file, a file that does not parse as a whole (a `.json` that is not one JSON array, an
  unreadable Parquet file or compressed stream), or a SPEC with no valid conversation stays an error.
- Mixture: pool every source's conversations once (SPEC order, file order), shuffle the pool with
  `random.Random(seed)`, hold out the first `val_conversations`, then repeat each source's remaining
  conversations EPOCHS times and shuffle the train list with the same generator. Holding out before
  repeating keeps every val conversation out of training whatever the epochs. (The seed card took
  its 512 val conversations after repetition: 20,022 x 3 + 111,183 x 2 - 512 = 281,920, so its
  train set contained copies of val conversations; here train is smaller by the repeats of those.)
- Case augmentation (`case_augment=True`): each distinct train conversation (before repetition)
  whose first user message starts, after leading whitespace, with a greeting -- hi, hello, hey,
  greetings, good morning, good afternoon, good evening, howdy; case-insensitive, whole word, any
  whitespace inside the two-word ones -- gets exactly ONE duplicate, added to the train list once
  (not multiplied by EPOCHS: it nudges robustness to the greeting's case without reweighting
  greeting conversations). In the duplicate only the greeting's characters change, to one of
  lower ("hello"), UPPER ("HELLO") or Sentence ("Hello", "Good morning") case, picked uniformly
  among the forms that differ from the original by `random.Random(f"poelm-case-augment:{seed}")`,
  drawn source by source in shuffled-pool order. Its `where` is the original's + " (case-augmented)". Val is never augmented.
- Packing is best-fit decreasing: conversations sorted longest first (ties: input order) each go to
  the row with the least remaining room that still fits (ties: the earliest row), else a new row.
  A row holds seq_len + 1 tokens (inputs row[:-1], targets row[1:]); conversations are never split
  across rows; one longer than seq_len + 1 tokens is cut to seq_len + 1 (counted). Best fit keeps
  a sorted list of the distinct remaining room sizes (at most seq_len + 1 of them), so a placement
  is one bisect however many rows there are (281k conversations pack in ~20 s, mostly list->array).
- Each row carries `doc_ids` and `positions` beside inputs and targets, so a model with document
  masking sees every conversation as if it were alone: doc ids count conversations 0, 1, ... in row
  order and the trailing padding gets the next id (it attends only to itself); positions restart at
  0 for each conversation and for the padding run. A target is -1 where the target token is
  unsupervised (mask 0), padding, or the first token of the next conversation. Whether the model
  uses doc_ids/positions is the caller's choice (`--no-document-masking`); they are always made.
- Memory: inputs and targets are int32 (ids < 2**31), doc ids and positions int16 (< seq_len + 1
  <= 32767; int32 beyond), 12 bytes per position: ~68k rows of 2048 (the seed's 2,131 steps of
  32 rows) take ~1.7 GB per process. The loader turns only the rows of one batch into int64 tensors.
- `ChatLoader` and `eval_batches` keep `text.TokenLoader`'s contract: per-epoch row order from
  `torch.Generator().manual_seed(seed + epoch)`, one global row sequence of which rank r takes the
  r-th block of B rows per call (2K calls on one process == K calls on two), epochs rolling over
  mid-batch, and a JSON-able state valid on every rank that also pins the packed data by digest.
- torch is imported inside the loader only: reading and checking conversations does not need it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import random
import re
from bisect import bisect_left, insort
from dataclasses import asdict, dataclass, field
from functools import cached_property
from heapq import heappop, heappush
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import numpy as np

from ..core.errors import PoelmError
from ..core.tokenizer import chat_turns
from .records import (INVALID_JSON, NOT_UTF8, BadRecord, InputFile, dataset_records, expand, is_datasets_folder,
                      records)
from .text import ByteProgress, RowLoader, _check_int, format_size

if TYPE_CHECKING:
    import torch

    from ..core.tokenizer import Tokenizer

Messages = list[dict[str, str]]


class Conversation(NamedTuple):
    """One conversation: where it came from (`path:LINE`, `path[ROW]` or `hf:NAME@SPLIT[ROW]`) and its
    messages [{role, content}]."""

    where: str
    messages: Messages


# ---- SPEC ----------------------------------------------------------------------------------------

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


# ---- record shapes -------------------------------------------------------------------------------

# Reasons a record is bad, the keys of LoadReport.skipped[file]: records.py's NOT_UTF8 and INVALID_JSON
# (a JSONL line that does not parse), and these.
NOT_OBJECT, UNKNOWN_SHAPE, BAD_CONVERSATION = "not an object", "unknown shape", "bad conversation"
REASONS = (NOT_UTF8, INVALID_JSON, NOT_OBJECT, UNKNOWN_SHAPE, BAD_CONVERSATION)

_SHAPES = ('{"messages": [{"role", "content"}, ...]}, ShareGPT {"conversations": [{"from", "value"}, ...]}, '
           'Alpaca {"instruction", "input", "output"}, Evol-Instruct {"instruction", "response"} or '
           'Magicoder {"problem", "solution"}')
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _string(record: dict, key: str, where: str, what: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"{where}: {what} field {key!r} is {type(value).__name__}; expected a string",
                        BAD_CONVERSATION)
    return value


def _message_list(record: dict, key: str, role_key: str, text_key: str, where: str) -> Messages:
    items = record[key]
    if not isinstance(items, list):
        raise BadRecord(f"{where}: field {key!r} is {type(items).__name__}; expected a list of messages",
                        BAD_CONVERSATION)
    messages = []
    for i, m in enumerate(items):
        at = f"{where}: {key}[{i}]"
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            got = f"keys {sorted(m)}" if isinstance(m, dict) else type(m).__name__
            raise BadRecord(f"{at}: expected an object with {role_key!r} and {text_key!r}, got {got}",
                            BAD_CONVERSATION)
        role = m[role_key]
        if key == "conversations":
            if not isinstance(role, str) or role not in _SHAREGPT_ROLES:  # a list or object is unhashable
                raise BadRecord(f"{at}: unknown 'from' {role!r}; expected one of {sorted(_SHAREGPT_ROLES)}",
                                BAD_CONVERSATION)
            role = _SHAREGPT_ROLES[role]
        elif role not in ("system", "user", "assistant"):
            raise BadRecord(f"{at}: unknown role {role!r}; expected 'system', 'user' or 'assistant'",
                            BAD_CONVERSATION)
        content = m[text_key]
        if not isinstance(content, str):
            raise BadRecord(f"{at}: {text_key!r} is {type(content).__name__}; expected a string", BAD_CONVERSATION)
        messages.append({"role": role, "content": content})
    return messages


def check_messages(messages: Messages, where: str) -> Messages:
    """Check a conversation with the tokenizer's rules (`chat_turns`) plus SFT's (module docstring); return
    it with a blank system message dropped. Errors name `where` and the message index."""
    if messages and messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages = messages[1:]
    if not messages:
        raise BadRecord(f"{where}: no messages; expected a user message and an assistant reply", BAD_CONVERSATION)
    try:  # the role rules live in one place, the tokenizer's
        chat_turns(messages)
    except PoelmError as e:
        raise BadRecord(f"{where}: {e}", BAD_CONVERSATION) from None
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role != "system" and not content.strip():
            raise BadRecord(f"{where}: message {i}: {role!r} content is blank; expected text", BAD_CONVERSATION)
        try:  # JSON escapes can spell a lone surrogate ("\ud800"), which no tokenizer can encode
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRecord(f"{where}: message {i}: content has an unpaired surrogate at character {e.start}; "
                            f"expected valid Unicode", BAD_CONVERSATION) from None
    if messages[-1]["role"] != "assistant":
        raise BadRecord(f"{where}: message {len(messages) - 1}: the conversation ends with a "
                        f"{messages[-1]['role']!r} message; expected a final 'assistant' reply", BAD_CONVERSATION)
    return messages


def to_messages(record: Any, where: str) -> Messages:
    """One JSON record -> checked messages [{"role", "content"}] (new dicts, other keys dropped).

    The shape is detected per record (module docstring). Raises PoelmError naming `where` for an
    unknown shape, a non-object, a wrong field type or a bad conversation.
    """
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: a JSON {type(record).__name__}; expected an object: {_SHAPES}", NOT_OBJECT)
    if "messages" in record:
        messages = _message_list(record, "messages", "role", "content", where)
    elif "conversations" in record:
        messages = _message_list(record, "conversations", "from", "value", where)
    elif "instruction" in record and "output" in record:
        user = _string(record, "instruction", where, "Alpaca")
        extra = _string(record, "input", where, "Alpaca") if "input" in record else ""
        if extra:
            user += "\n\n" + extra
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _string(record, "output", where, "Alpaca")}]
    elif "instruction" in record and "response" in record:
        messages = [{"role": "user", "content": _string(record, "instruction", where, "Evol-Instruct")},
                    {"role": "assistant", "content": _string(record, "response", where, "Evol-Instruct")}]
    elif "problem" in record and "solution" in record:
        messages = [{"role": "user", "content": _string(record, "problem", where, "Magicoder")},
                    {"role": "assistant", "content": _string(record, "solution", where, "Magicoder")}]
    else:
        raise BadRecord(f"{where}: unknown record shape with keys {sorted(record)}; expected {_SHAPES}",
                        UNKNOWN_SHAPE)
    return check_messages(messages, where)


# ---- loading SPECs -------------------------------------------------------------------------------


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
_SPEC_PATHS = ("a .jsonl, .json or .parquet file (.gz/.zst compressed too), a directory of them, a `datasets` "
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

    files, ignored = expand([path], accept, _SPEC_PATHS)
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
    reports bytes read on stderr and a closing summary line (as `text.TextCorpus.build`; pass
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
    bar.line(report.summary())
    return sources, report


# ---- mixture -------------------------------------------------------------------------------------

_GREETING = re.compile(r"\s*(good\s+morning|good\s+afternoon|good\s+evening|greetings|hello|howdy|hey|hi)(?!\w)",
                       re.IGNORECASE)


def greeting_span(messages: Messages) -> tuple[int, int, int] | None:
    """(message index, start, end) of the greeting that opens the first user message, else None."""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            match = _GREETING.match(m["content"])
            return (i, match.start(1), match.end(1)) if match else None
    return None


def _case_forms(word: str) -> list[str]:
    """The greeting's lower, UPPER and Sentence-case forms that differ from it, in that order."""
    forms = [word.lower(), word.upper(), word[:1].upper() + word[1:].lower()]
    return [f for k, f in enumerate(forms) if f != word and f not in forms[:k]]


def case_augmented(conversation: Conversation, rng: random.Random) -> Conversation | None:
    """A copy of `conversation` with its opening greeting's case changed, or None without a greeting."""
    span = greeting_span(conversation.messages)
    if span is None:
        return None
    i, start, end = span
    text = conversation.messages[i]["content"]
    new = rng.choice(_case_forms(text[start:end]))  # never empty: lower and UPPER differ for 2+ letters
    messages = [dict(m) for m in conversation.messages]
    messages[i]["content"] = text[:start] + new + text[end:]
    return Conversation(conversation.where + " (case-augmented)", messages)


@dataclass(frozen=True)
class SourceCounts:
    path: str
    epochs: int
    read: int  # conversations in the source
    held_out: int  # of those, in val
    train: int  # (read - held_out) * epochs
    case_augmented: int  # duplicates added to train (once each, not repeated)


@dataclass
class Mixture:
    """Shuffled train conversations (repeated, augmented) and held-out val conversations."""

    train: list[Conversation]
    val: list[Conversation]
    sources: list[SourceCounts]
    seed: int
    case_augment: bool

    @property
    def conversations(self) -> int:
        """Distinct conversations read, over all sources."""
        return sum(s.read for s in self.sources)

    @property
    def case_augmented(self) -> int:
        return sum(s.case_augmented for s in self.sources)

    def summary(self) -> str:
        """One log line."""
        parts = "; ".join(f"{s.path} x{s.epochs}: {s.read:,} read, {s.held_out:,} val, {s.train:,} train"
                          + (f" +{s.case_augmented:,} case-augmented" if s.case_augmented else "")
                          for s in self.sources)
        aug = (f" (incl. {self.case_augmented:,} case-augmented: "
               f"{len(self.train) - self.case_augmented:,} -> {len(self.train):,})" if self.case_augment else "")
        return (f"mixture: {self.conversations:,} conversations from {len(self.sources)} source(s) ({parts}); "
                f"val {len(self.val):,}, train {len(self.train):,}{aug}, seed {self.seed}")

    def stats(self) -> dict[str, Any]:
        """JSON-able facts, for run metadata."""
        return {"seed": self.seed, "case_augment": self.case_augment, "conversations": self.conversations,
                "val": len(self.val), "train": len(self.train), "case_augmented": self.case_augmented,
                "sources": [asdict(s) for s in self.sources]}


def build_mixture(sources: Sequence[Source], val_conversations: int, seed: int,
                  case_augment: bool = False) -> Mixture:
    """Pool, shuffle, hold out `val_conversations`, repeat each source's rest EPOCHS times, optionally
    case-augment, shuffle train; see the module docstring. Deterministic in `seed`."""
    val_n = _check_int("val_conversations", val_conversations, 0)
    seed = _check_int("seed", seed, 0)
    if not sources:
        raise PoelmError("build_mixture: no sources; expected at least one loaded SPEC")
    pool = [(k, c) for k, s in enumerate(sources) for c in s.conversations]  # (source index, conversation)
    if val_n > len(pool) - 1:
        raise PoelmError(f"val_conversations is {val_n:,} but the data holds {len(pool):,} conversation(s); "
                         f"expected at most {len(pool) - 1:,} so that one is left to train on")
    rng = random.Random(seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    held = [pool[i] for i in order[:val_n]]
    kept: list[list[Conversation]] = [[] for _ in sources]  # per source, in shuffled pool order
    for i in order[val_n:]:
        k, c = pool[i]
        kept[k].append(c)
    case_rng = random.Random(f"poelm-case-augment:{seed}")  # its own stream: augmentation moves no split
    train: list[Conversation] = []
    counts = []
    for k, s in enumerate(sources):
        extra = [a for c in kept[k] if (a := case_augmented(c, case_rng)) is not None] if case_augment else []
        train += kept[k] * s.epochs + extra
        counts.append(SourceCounts(s.path, s.epochs, len(s.conversations), sum(1 for j, _ in held if j == k),
                                   len(kept[k]) * s.epochs, len(extra)))
    rng.shuffle(train)
    return Mixture(train, [c for _, c in held], counts, seed, bool(case_augment))


def render_conversations(conversations: Sequence[Conversation],
                         tokenizer: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) of each conversation via `tokenizer.render_conversation`; errors name its `where`."""
    out = []
    for where, messages in conversations:
        try:
            out.append(tokenizer.render_conversation(messages))
        except PoelmError as e:
            raise PoelmError(f"{where}: {e}") from None
    return out


# ---- packing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackStats:
    rows: int
    seq_len: int  # T; a row holds T + 1 tokens
    conversations: int
    truncated: int  # conversations longer than T + 1 tokens, cut to T + 1
    truncated_tokens: int  # tokens those cuts dropped
    truncated_supervised: int  # of them, supervised (mask 1)
    tokens: int  # conversation tokens placed (not padding)
    fill_ratio: float  # tokens / (rows * (T + 1))
    supervised_tokens: int  # targets that are not -1

    def summary(self) -> str:
        cut = (f"; {self.truncated:,} truncated to {self.seq_len + 1} tokens (dropped {self.truncated_tokens:,} "
               f"tokens, {self.truncated_supervised:,} supervised)" if self.truncated else "")
        return (f"packed {self.conversations:,} conversations into {self.rows:,} rows of {self.seq_len + 1} tokens: "
                f"fill {self.fill_ratio:.1%}, {self.supervised_tokens:,} supervised targets{cut}")


@dataclass
class PackedRows:
    """Rows of packed conversations: (N, T) arrays, position t of a row predicting its token t + 1.

    doc_ids and positions are int16 when seq_len + 1 fits (int32 otherwise); inputs, doc_ids and
    positions may be views of (N, T + 1) arrays."""

    inputs: np.ndarray  # (N, T) int32 token ids; pad_id after the row's last conversation
    targets: np.ndarray  # (N, T) int32 next token, -1 where unsupervised, padding or across a boundary
    doc_ids: np.ndarray  # (N, T) 0, 1, ... per conversation in row order; padding: the row's conversation count
    positions: np.ndarray  # (N, T) position within the conversation (or within the padding run)
    row_conversations: list[tuple[int, ...]]  # per row, indices into pack's input list, in row order
    stats: PackStats
    pad_id: int

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def n_rows(self) -> int:
        return len(self.inputs)

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    @cached_property
    def fingerprint(self) -> str:
        """blake2b of the rows' bytes (16 hex digits): loader states pin the data they index."""
        h = hashlib.blake2b(digest_size=8)
        for a in (self.inputs, self.targets, self.doc_ids):  # positions follow from doc_ids
            for i in range(0, len(a), 4096):  # row chunks: the arrays may be views, copy a little at a time
                h.update(np.ascontiguousarray(a[i : i + 4096], dtype=a.dtype).data)
        return h.hexdigest()


def _best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: per row, the indices of `lengths` placed in it, in placement order."""
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # remaining room -> heap of row indices with it (earliest first)
    rooms: list[int] = []  # sorted distinct remaining rooms with a non-empty heap
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep input order
        n = lengths[i]
        k = bisect_left(rooms, n)
        if k < len(rooms):  # the least room that still fits, then the earliest such row
            room = rooms[k]
            row = heappop(by_room[room])
            if not by_room[room]:
                del rooms[k], by_room[room]
            rows[row].append(i)
        else:
            room, row = capacity, len(rows)
            rows.append([i])
        left = room - n
        if left > 0:  # a full row never fits anything again (every conversation has >= 1 token)
            if left not in by_room:
                by_room[left] = []
                insort(rooms, left)
            heappush(by_room[left], row)
    return rows


def pack(conversations_tokens: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int,
         pad_id: int) -> PackedRows:
    """Pack rendered conversations (ids, mask) into rows of seq_len + 1 tokens by best-fit decreasing.

    Conversations are never split; one longer than seq_len + 1 tokens is truncated (counted in the
    stats). See the module docstring for targets, doc_ids and positions.
    """
    T = _check_int("seq_len", seq_len, 1)
    pad_id = _check_int("pad_id", pad_id, 0)
    if not conversations_tokens:
        raise PoelmError("pack: no conversations; expected at least one (ids, mask) pair")
    C = T + 1
    lengths = []  # per conversation, after truncation
    truncated = truncated_tokens = truncated_supervised = 0
    for i, (ids, mask) in enumerate(conversations_tokens):
        if len(ids) != len(mask) or len(ids) == 0:
            raise PoelmError(f"pack: conversation {i} has {len(ids)} ids and {len(mask)} mask values; "
                             f"expected equal, non-zero lengths")
        if len(ids) > C:
            truncated += 1
            truncated_tokens += len(ids) - C
            truncated_supervised += sum(1 for m in mask[C:] if m)
        lengths.append(min(len(ids), C))
    total = sum(lengths)
    # Every conversation's tokens into one flat buffer each (int32 ids, int8 mask): one allocation,
    # ~2x faster and 8x smaller than an int64 array per conversation.
    try:
        flat_ids = np.fromiter(itertools.chain.from_iterable(ids if len(ids) <= C else ids[:C]
                                                             for ids, _ in conversations_tokens),
                               dtype=np.int32, count=total)
        flat_mask = np.fromiter(itertools.chain.from_iterable(m if len(m) <= C else m[:C]
                                                              for _, m in conversations_tokens),
                                dtype=np.int8, count=total)
    except (OverflowError, ValueError, TypeError) as e:
        raise PoelmError(f"pack: expected int token ids in [0, 2**31) and 0/1 masks ({e})") from None
    if flat_ids.min() < 0 or ((flat_mask != 0) & (flat_mask != 1)).any():
        raise PoelmError(f"pack: expected token ids >= 0 and masks of 0/1, got ids from {flat_ids.min()} and "
                         f"mask values {np.unique(flat_mask)[:4].tolist()}")
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])

    placement = _best_fit(lengths, C)
    N = len(placement)
    small = np.int16 if C <= np.iinfo(np.int16).max else np.int32  # doc ids and positions are < C
    tok = np.full((N, C), pad_id, dtype=np.int32)  # (N, T+1) whole rows: inputs are tok[:, :-1]
    sup = np.zeros((N, C), dtype=bool)  # (N, T+1) token is supervised
    doc = np.empty((N, C), dtype=small)
    pos = np.empty((N, C), dtype=small)
    ramp = np.arange(C, dtype=small)
    for r, members in enumerate(placement):
        off = 0
        for d, i in enumerate(members):
            n, a = lengths[i], starts[i]
            tok[r, off : off + n] = flat_ids[a : a + n]
            sup[r, off : off + n] = flat_mask[a : a + n]
            doc[r, off : off + n] = d
            pos[r, off : off + n] = ramp[:n]
            off += n
        doc[r, off:] = len(members)  # padding: one more document, attending only to itself
        pos[r, off:] = ramp[: C - off]
    del flat_ids, flat_mask
    # target t is token t+1 of the row: kept only inside one conversation and where supervised
    # (padding is unsupervised; a conversation's first token, <|bos|>, is too, but the boundary test
    # does not rely on the mask).
    keep = sup[:, 1:] & (doc[:, 1:] == doc[:, :-1])
    del sup
    targets = np.where(keep, tok[:, 1:], np.int32(-1))
    stats = PackStats(rows=N, seq_len=T, conversations=len(lengths), truncated=truncated,
                      truncated_tokens=truncated_tokens, truncated_supervised=truncated_supervised, tokens=total,
                      fill_ratio=total / (N * C), supervised_tokens=int(keep.sum()))
    # inputs, doc_ids and positions are views of the (N, T+1) arrays: no copies of the largest data
    return PackedRows(inputs=tok[:, :-1], targets=targets, doc_ids=doc[:, :-1], positions=pos[:, :-1],
                      row_conversations=[tuple(m) for m in placement], stats=stats, pad_id=pad_id)


# ---- loading rows --------------------------------------------------------------------------------


class ChatBatch(NamedTuple):
    """One rank's batch, each (B, T) int64."""

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor


def _batch(rows: PackedRows, index: np.ndarray) -> ChatBatch:
    import torch

    return ChatBatch(*(torch.from_numpy(a[index].astype(np.int64))
                       for a in (rows.inputs, rows.targets, rows.doc_ids, rows.positions)))


def _check_rows(rows: Any, who: str) -> PackedRows:
    if not isinstance(rows, PackedRows) or len(rows) == 0:
        raise PoelmError(f"{who}: expected PackedRows with at least one row (from pack), got {type(rows).__name__}")
    return rows


def _check_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise PoelmError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


class ChatLoader(RowLoader):
    """Endless ChatBatch batches of one rank from packed rows (the row order of `text.RowLoader`)."""

    _SHAPE_KEYS = RowLoader._SHAPE_KEYS + ("data",)
    _RESUME_HINT = ("resume with the same data, mixture seed, tokenizer, batch size, sequence length, world size "
                    "and seed")

    def __init__(self, rows: PackedRows, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.rows = _check_rows(rows, "ChatLoader")
        super().__init__(len(rows), batch_size, rows.seq_len, rank=rank, world_size=world_size, seed=seed,
                         shuffle=shuffle)

    def next_batch(self) -> ChatBatch:
        """This rank's next (inputs, targets, doc_ids, positions), each (batch_size, seq_len) int64."""
        return _batch(self.rows, self.next_indices())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "data": self.rows.fingerprint}


def eval_batches(rows: PackedRows, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[ChatBatch]:
    """All rows in order, rank r taking rows r, r + world, ..., as batches of at most `batch_size`
    rows (the last may be smaller; no fake rows are added).

    Ranks can get different numbers of rows (and batches): reduce sums after the loop, not per batch.
    """
    rows = _check_rows(rows, "eval_batches")
    B = _check_int("batch_size", batch_size, 1)
    rank, world_size = _check_rank(rank, world_size)
    mine = np.arange(rank, len(rows), world_size)

    def batches() -> Iterator[ChatBatch]:
        for i in range(0, len(mine), B):
            yield _batch(rows, mine[i : i + B])

    return batches()
