"""Training a Tokenizer: byte-level BPE (rustbpe) on the documents of text files, directories and records.

Design choices:
- Not shipped with models (it imports rustbpe and tqdm); the runtime half is `tokenizer.py`.
- Training is rustbpe (nanochat's trainer) with `SPLIT_PATTERN`, for `vocab_size - 9` BPE tokens so
  the nine specials land right after the merges (vocab 32768 -> <|bos|> 32759). A corpus too small
  to learn that many merges is an error, not a silently smaller vocabulary.
- Inputs are read by `documents.read_documents`, the reader pretraining uses, so a tokenizer is trained
  on exactly the documents a model will see (text files, directories, JSONL and JSON arrays of "text"
  records, Parquet, `datasets` folders; docs/data.md). Skipped files and null texts are always reported.
- Progress counts bytes read (`common.progress.ByteProgress`).
"""

from __future__ import annotations

import logging
import sys
import time

from ..common.progress import ByteProgress, format_size
from ..core.errors import PoelmError
from ..core.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from .documents import read_documents, skipped_note

# ---- training ------------------------------------------------------------------------------------


def train_tokenizer(paths: list[str], vocab_size: int, progress: bool | None = None) -> Tokenizer:
    """Train byte-level BPE on the documents of `paths` (`read_documents`); return a Tokenizer whose
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
    if corpus.skipped or corpus.null_texts:  # reported even when progress is off: it changes what was trained on
        first = (corpus.skipped or [corpus.first_null])[0]
        print("tokenizer: " + skipped_note(len(corpus.skipped), corpus.null_texts, "", first), file=sys.stderr,
              flush=True)
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    if len(ranks) != vocab_size - n_special:
        raise PoelmError(
            f"train_tokenizer: the corpus ({corpus.total_bytes} bytes) yields only {len(ranks) - 256} merges; "
            f"vocab_size {vocab_size} needs {vocab_size - n_special - 256}. Use more text or a smaller vocab_size"
        )
    tok = Tokenizer(ranks, pattern=SPLIT_PATTERN)
    report.write(
        f"tokenizer: trained vocab {tok.vocab_size} on {corpus.documents} documents "
        f"({format_size(corpus.total_bytes)}) in {time.perf_counter() - t0:.1f}s"
    )
    return tok
