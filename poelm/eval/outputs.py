"""A resumable evaluation folder: records appended as they finish, the settings it was made with, and
per-problem pass@k.

- Each sample and each execution result is one flushed JSONL line, appended as it finishes; a rerun
  with the same settings (run.json) does only what is missing; a line cut short by a kill is dropped.
- pass@k is the unbiased estimator of the Codex paper, 1 - C(n - c, k) / C(n, k), as a stable product;
  a k above a problem's sample count is not reported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..common.recorded import record_or_refuse
from ..core.errors import PoelmError
from .problems import Problem


class Records:
    """A JSONL file of records appended as they finish (one flushed line each). Reading keeps every
    complete line; a last line cut short by a kill is dropped (and cut from the file before the next
    append); any other bad line is an error naming file:line."""

    def __init__(self, path: Path, keys: tuple[str, ...]):
        self.path, self.keys = path, keys
        self.rows: list[dict[str, Any]] = []
        if path.is_file():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        for line_no, line in enumerate(complete.decode("utf-8", errors="strict").splitlines(), 1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or any(k not in row for k in self.keys):
                    raise ValueError(f"expected an object with {', '.join(self.keys)}")
            except ValueError as e:
                raise PoelmError(f"{self.path}:{line_no}: {e}; remove the line or pass --overwrite") from None
            self.rows.append(row)
        if len(complete) < len(data):  # a line cut short by a kill: forget it
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))

    def done(self) -> set[tuple]:
        return {tuple(row[k] for k in self.keys[:2]) for row in self.rows}

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self.rows.append(row)


def open_out(out: Path, inputs: list, settings: dict[str, Any], overwrite: bool) -> None:
    """Make OUT ready for a run: never one of the inputs, emptied with `overwrite`, then its settings
    recorded (or a rerun made otherwise refused: `check_settings`)."""
    from ..common.atomic import check_output

    check_output(out, inputs, overwrite=True)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings)


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record the run's settings in OUT/run.json, or refuse a rerun whose settings differ (common/recorded)."""
    record_or_refuse(out / "run.json", settings, said=f"{out}: written with other settings ({{changes}})",
                     fix="give another --out, or --overwrite to start again")


def write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    from ..core.files import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def score(problems: list[Problem], results: Iterable[dict], n: dict[str, int], ks: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per problem: samples (`n[task_id]`: its first n samples count), correct ones, pass@k for every k <= n."""
    passed: dict[str, list[bool]] = {p.task_id: [False] * n[p.task_id] for p in problems}
    seen: dict[str, set[int]] = {p.task_id: set() for p in problems}
    for r in results:
        if r["task_id"] in passed and r["sample"] < n[r["task_id"]]:
            passed[r["task_id"]][r["sample"]] = bool(r["passed"])
            seen[r["task_id"]].add(r["sample"])
    missing = [t for t, s in seen.items() if len(s) < n[t]]
    if missing:
        raise PoelmError(f"no execution result for {len(missing)} problem(s) (first: {missing[0]}); rerun to finish")
    rows = []
    for p in problems:
        c, m = sum(passed[p.task_id]), n[p.task_id]
        row: dict[str, Any] = {"task_id": p.task_id, "n": m, "correct": c}
        row.update({f"pass@{k}": pass_at_k(m, c, k) for k in ks if k <= m})
        rows.append(row)
    return rows


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator for c correct of n samples: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
