"""Making a Tokenizer: train byte-level BPE on text files, or import nanochat's tokenizer.pkl.

Design choices:
- Not shipped with models (it imports rustbpe and tqdm); the runtime half is `tokenizer.py`.
- Training is rustbpe (nanochat's trainer) with `SPLIT_PATTERN`, for `vocab_size - 9` BPE tokens so
  the nine specials land right after the merges (vocab 32768 -> <|bos|> 32759). A corpus too small
  to learn that many merges is an error, not a silently smaller vocabulary.
- Inputs are read by `poelm.data.text.read_documents`, the reader pretraining uses, so a tokenizer
  is trained on exactly the documents a model will see: files, directories (walked recursively in
  sorted order, hidden entries skipped), `.jsonl` files of "text" records. Inside a directory
  non-UTF-8 files are skipped and counted; a file named explicitly must be non-empty text.
- Progress counts bytes read (`ByteProgress`): a tqdm bar on a terminal, a handful of plain lines
  otherwise, so logs are not flooded with carriage-return updates.
- nanochat's tokenizer.pkl is read through a restricted Unpickler that resolves only the globals a
  pickled `tiktoken.Encoding` uses, each to a harmless stand-in: no constructor, no `__setstate__`
  of tiktoken ever runs (a str state would make tiktoken download a registered encoding).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import sysconfig
import time
from typing import Any

from .data.text import ByteProgress, as_text, format_size, read_documents, walk_files
from .core.errors import PoelmError
from .core.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

# ---- training ------------------------------------------------------------------------------------


def train_tokenizer(paths: list[str], vocab_size: int, progress: bool | None = None) -> Tokenizer:
    """Train byte-level BPE on text files / directories / .jsonl files; return a Tokenizer whose
    vocab_size is exactly `vocab_size` (BPE tokens + 9 specials).

    progress: False is silent; None or True reports bytes read (tqdm on a terminal, plain lines
    on stderr otherwise). Skipped non-UTF-8 files in directories are always reported.
    """
    import rustbpe  # training-only dependency

    n_special = len(SPECIAL_TOKENS)
    if type(vocab_size) is not int or vocab_size <= 256 + n_special:
        raise PoelmError(
            f"vocab_size must be an int > {256 + n_special} (256 single bytes + {n_special} special tokens), "
            f"got {vocab_size!r}"
        )
    corpus = read_documents(paths)
    report = ByteProgress(progress is not False, corpus.total_bytes, "tokenizer")
    corpus.on_bytes = report.update
    t0 = time.perf_counter()
    trainer = rustbpe.Tokenizer()
    # rustbpe logs a line per 1% of merges through Python logging: keep it to warnings so a
    # terminal shows one progress bar, not a hundred log lines.
    rust_log = logging.getLogger("rustbpe")
    level = rust_log.level
    rust_log.setLevel(logging.WARNING)
    try:
        trainer.train_from_iterator(
            (doc.text for doc in corpus), vocab_size=vocab_size - n_special, pattern=SPLIT_PATTERN
        )
    finally:
        rust_log.setLevel(level)
        report.close()
    if corpus.skipped:  # reported even when progress is off: it changes what was trained on
        print(
            f"tokenizer: skipped {len(corpus.skipped)} non-UTF-8 file(s) in input directories "
            f"(first: {corpus.skipped[0]})",
            file=sys.stderr,
            flush=True,
        )
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    if len(ranks) != vocab_size - n_special:
        raise PoelmError(
            f"train_tokenizer: the corpus ({corpus.total_bytes} bytes) yields only {len(ranks) - 256} merges; "
            f"vocab_size {vocab_size} needs {vocab_size - n_special - 256}. Use more text or a smaller vocab_size"
        )
    tok = Tokenizer(ranks, pattern=SPLIT_PATTERN)
    report.line(
        f"tokenizer: trained vocab {tok.vocab_size} on {corpus.documents} documents "
        f"({format_size(corpus.total_bytes)}) in {time.perf_counter() - t0:.1f}s"
    )
    return tok


def stdlib_corpus(max_bytes: int) -> list[str]:
    """A deterministic corpus: the standard library's own non-empty UTF-8 .py files in sorted path
    order, up to about `max_bytes` in total (the first file that crosses the limit is included).
    Empty files (many `__init__.py`) are left out: an empty file named as an input is an error."""
    root = sysconfig.get_paths()["stdlib"]
    out, total = [], 0
    candidates = walk_files(root, prune=frozenset({"site-packages", "dist-packages", "__pycache__"}))
    for path in sorted(p for p in candidates if p.endswith(".py")):
        with open(path, "rb") as f:
            data = f.read()
        if not data or as_text(data) is None:  # a few test files are deliberately in other encodings
            continue
        out.append(path)
        total += len(data)
        if total >= max_bytes:
            break
    return out


# ---- nanochat import -----------------------------------------------------------------------------


class _EncodingState:
    """Stands in for `tiktoken.Encoding` while unpickling: keeps the state, executes nothing."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _reconstructor(cls: Any, base: Any, state: Any) -> _EncodingState:
    # Pickle protocols 0-1 build objects with copyreg._reconstructor(cls, object, None).
    if cls is not _EncodingState or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor used for something other than a tiktoken Encoding")
    return object.__new__(_EncodingState)


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: str = "strict") -> bytes:
    # Pickle protocols 0-2 store bytes as _codecs.encode(str, "latin1"); allow exactly that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


# (module, name) -> harmless stand-in; both spellings of the renamed Python 2 modules appear in
# protocol 0-2 pickles, and a subclass's find_class sees them before any renaming.
_ALLOWED_GLOBALS = {
    ("tiktoken.core", "Encoding"): _EncodingState,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
    ("_codecs", "encode"): _latin1_encode,
}


class _TiktokenUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise PoelmError(
                f"{self.path}: refused to load global '{module}.{name}'; a nanochat tokenizer.pkl holds only a "
                f"tiktoken Encoding, so this file is not one (and may be malicious)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise PoelmError(f"{self.path}: refused a persistent id in the pickle; expected a tiktoken Encoding")


def load_nanochat_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Import nanochat's tokenizer (`tokenizer.pkl`, a pickled tiktoken.Encoding; or the directory
    holding it) without running any code from the file. Special ids must already follow the merges
    in poelm's order, which is nanochat's."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.pkl")
    try:
        with open(path, "rb") as f:
            obj = _TiktokenUnpickler(f, path).load()
    except FileNotFoundError:
        raise PoelmError(f"{path}: file not found; expected nanochat's tokenizer.pkl") from None
    except PoelmError:
        raise
    except Exception as e:  # truncated or corrupt pickle, a stand-in's refusal
        raise PoelmError(f"{path}: not a pickled tiktoken Encoding ({type(e).__name__}: {e})") from None
    if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
        raise PoelmError(f"{path}: the pickle holds {type(obj).__name__}; expected a tiktoken Encoding")
    state = obj.state
    if isinstance(state, str):
        raise PoelmError(
            f"{path}: pickles tiktoken's registered encoding {state!r} by name; expected a nanochat-trained "
            f"Encoding with its own ranks"
        )
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= set(state):
        raise PoelmError(f"{path}: Encoding state lacks pat_str/mergeable_ranks/special_tokens")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not isinstance(ranks, dict) or not isinstance(specials, dict):
        raise PoelmError(f"{path}: Encoding mergeable_ranks and special_tokens must be dicts")
    expected = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        detail = ", ".join(f"{t}={specials.get(t)}" for t in SPECIAL_TOKENS)
        raise PoelmError(
            f"{path}: special tokens are {{{detail}}} (+ {sorted(set(specials) - set(expected))}); poelm needs "
            f"exactly {list(SPECIAL_TOKENS)} at ids {len(ranks)}..{len(ranks) + len(SPECIAL_TOKENS) - 1}, right "
            f"after the {len(ranks)} merges, so model embeddings trained with nanochat keep their rows"
        )
    pattern = state["pat_str"]
    try:
        return Tokenizer(ranks, pattern=pattern, name=str(state.get("name", "poelm")))
    except PoelmError as e:
        raise PoelmError(f"{path}: {e}") from None
