"""Progress of long work: a tqdm bar on a terminal, a plain log line now and then otherwise.

Design choice: the same calls drive both, so training code never asks where its output goes; only
rank 0 shows anything.
"""

from __future__ import annotations

import sys
import time


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total: int, start: int = 0, desc: str = "train", enabled: bool = True,
                 every_s: float = 15.0):
        self.total, self.step, self.desc, self.enabled = total, start, desc, enabled
        self.start_step, self.t0, self.last_line, self.every_s = start, time.time(), 0.0, every_s
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, file=sys.stderr)

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

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
