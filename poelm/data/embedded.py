"""The Python standard library as the embedded default data: present on any machine with Python, offline.

- `stdlib_corpus`: its own source files as a text corpus (the demo's tokenizer and pretraining text).
- `code_instructions`: a code-instruction set (the demo's SFT data). Every module-level function with a
  docstring becomes one conversation in the Magicoder / Evol-Instruct shape: instruction "Write a
  Python function `name(args)` that <the docstring's first sentence>", response: the function's
  source. Deterministic (sorted files, source order). Functions whose source is longer than
  `max_chars` are skipped so that a conversation fits a short training row.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sysconfig
from pathlib import Path

from ..core.files import write_text
from .documents import as_text
from .records import walk_files


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


def first_sentence(doc: str) -> str | None:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = (m.group(1) if m else text).rstrip(".")
    if len(sentence) < 12 or len(sentence) > 160:
        return None
    return sentence[0].lower() + sentence[1:] if not sentence[:2].isupper() else sentence


def code_instructions(paths: list[str], max_chars: int = 900) -> list[dict[str, str]]:
    """Instruction/response records from the module-level functions of `paths`."""
    records = []
    for path in paths:
        source = Path(path).read_text(encoding="utf-8")
        try:
            tree = ast.parse(source)
        except SyntaxError:  # a few stdlib test inputs are deliberately broken
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            segment = ast.get_source_segment(source, node)
            sentence = first_sentence(doc) if doc else None
            if sentence is None or segment is None or len(segment) > max_chars:
                continue
            signature = f"{node.name}({ast.unparse(node.args)})"
            records.append({"instruction": f"Write a Python function `{signature}` that {sentence}.",
                            "response": segment})
    return records


def write_jsonl(records: list[dict[str, str]], out: str | os.PathLike) -> Path:
    out = Path(out)
    write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    return out
