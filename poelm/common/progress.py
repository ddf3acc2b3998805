"""Progress of long work, the one display in poelm: steps (`Progress`: training, evaluation) and bytes
read (`ByteProgress`: reading corpora, tokenizing, training a tokenizer).

Design choices:
- One decision where output goes (`_bar`): a tqdm bar when stderr is a terminal, else plain lines now
  and then, so a log file is not flooded with carriage-return updates. The same calls drive both, so
  the caller never asks where its output goes.
- A disabled display shows nothing (pass `enabled=rank == 0` under DDP); `write` prints a line above
  the bar, or as a plain line.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable


def format_size(n: int) -> str:
    """Bytes as the logs write them: kB below 100 kB, MB above."""
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _bar(enabled: bool, **tqdm_args: Any):
    """A tqdm bar on stderr when enabled and stderr is a terminal; None otherwise (plain lines)."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(file=sys.stderr, **tqdm_args)


class _Display:
    """What both displays share: enabled or silent, a bar or plain lines, `write` and `close`."""

    def __init__(self, enabled: bool, **tqdm_args: Any):
        self.enabled = enabled
        self.bar = _bar(enabled, **tqdm_args)

    def write(self, text: str) -> None:
        """One line on stderr (above the bar on a terminal); nothing when disabled."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Progress(_Display):
    """Steps of `total`: a bar with the latest fields, or a line every `every_s` seconds (and at the first
    and last step) with the fields and the time left."""

    def __init__(self, total: int, start: int = 0, desc: str = "train", enabled: bool = True,
                 every_s: float = 15.0):
        self.total, self.step, self.desc = total, start, desc
        self.start_step, self.t0, self.last_line, self.every_s = start, time.time(), 0.0, every_s
        super().__init__(enabled, total=total, initial=start, desc=desc, dynamic_ncols=True)

    def update(self, step: int, **fields: float | str) -> None:
        if not self.enabled:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
        if self.bar is not None:
            self.bar.update(step - self.step)
            self.bar.set_postfix(shown, refresh=False)
        self.step = step
        now = time.time()
        if self.bar is None and (now - self.last_line >= self.every_s or step == self.total
                                 or step == self.start_step + 1):
            rate = (now - self.t0) / max(step - self.start_step, 1)
            info = " ".join(f"{k} {v}" for k, v in shown.items())
            self.write(f"{self.desc} step {step}/{self.total} {info} eta {_eta(rate * (self.total - step))}")
            self.last_line = now


class ByteProgress(_Display):
    """Bytes read of `total`: a bar in bytes, or plain lines at the start and at 25%, 50% and 75%.
    `extra()` adds a few words to each (e.g. the tokens written so far)."""

    def __init__(self, enabled: bool, total: int, label: str, extra: Callable[[], str] | None = None):
        self.total, self.done, self.label, self.extra = max(total, 1), 0, label, extra
        self.next_quarter = 1
        super().__init__(enabled, total=total, unit="B", unit_scale=True, desc=label)
        if self.bar is None:
            self.write(f"{label}: reading {format_size(total)}")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            if self.extra is not None:
                self.bar.set_postfix_str(self.extra(), refresh=False)
            self.bar.update(n)
        elif self.enabled:
            while self.next_quarter < 4 and self.done >= self.total * self.next_quarter / 4:
                more = f", {self.extra()}" if self.extra is not None and self.extra() else ""
                self.write(f"{self.label}: read {25 * self.next_quarter}% ({format_size(self.done)}{more})")
                self.next_quarter += 1
