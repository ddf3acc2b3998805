"""The SFT mixture: every source's conversations pooled, a held-out val split, the rest repeated EPOCHS
times, optionally case-augmented, and shuffled, all deterministic in the seed.

Design choices (the whole of them, with the numbers of the seed card: docs/data.md, "The mixture"):
- Val is held out from the pool before repetition, so no val conversation is trained on, whatever
  the epochs.
- Case augmentation adds ONE duplicate of each distinct train conversation that opens with a
  greeting, only the greeting's case changed (not multiplied by EPOCHS: robustness to the greeting's
  case without reweighting greeting conversations), from its own random stream so that it moves no
  split. Val is never augmented.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ..core.errors import PoelmError
from .conversations import Conversation, Messages
from .loader import check_int
from .sources import Source

# a greeting opening the first user message: whole word, any case, any whitespace inside the two-word ones
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
    val_n = check_int("val_conversations", val_conversations, 0)
    seed = check_int("seed", seed, 0)
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
