"""Every command in the README and docs/ is spelled as the code spells it.

A command line in a ```bash block is parsed whole by the real parser: `poelm.app.cli.build_parser` for `poelm ...`,
`python -m poelm ...` and `torchrun ... -m poelm ...`, the benchmark's own parser for
`python benchmarks/NAME.py ...`. A command in running text (`poelm chat MODELDIR [decoding flags]`,
`poelm eval bpb`) is held to its command path and to every `--flag` it names. A command or flag renamed in the code and left in the docs
fails here, naming the file and line. What the commands do is tested elsewhere and run by `make demo`."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from poelm.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKETCH = re.compile(r"\.\.\.|[\[\]|<>]|\b[A-Z][A-Z_]{1,}\b")   # a placeholder, an option group, a choice


class Command:
    def __init__(self, words: list[str], where: str, whole: bool):
        self.words, self.where, self.whole = words, where, whole

    def __repr__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def bash_lines(text: str):
    """(line number, logical line) of each ```bash block, continuation lines joined."""
    inside, pending, start = False, "", 0
    for no, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            inside, pending = line.strip() == "```bash", ""
            continue
        if inside:
            start = start if pending else no
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
            else:
                yield start, pending + line
                pending = ""


def substituted(line: str) -> str:
    """`$(...)` (balanced parentheses) replaced by one word: what the shell would put there."""
    out, i = [], 0
    while (start := line.find("$(", i)) >= 0:
        depth, j = 0, start + 1
        for j in range(start + 1, len(line)):
            depth += {"(": 1, ")": -1}.get(line[j], 0)
            if depth == 0:
                break
        out += [line[i:start], "SUBSTITUTED"]
        i = j + 1
    return "".join(out) + line[i:]


def code_spans(text: str):
    """(line number, text) of each inline code span outside fenced blocks (a span may wrap a line)."""
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group().count("\n"), text, flags=re.S | re.M)
    for m in re.finditer(r"`([^`]+)`", prose):
        yield prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())


def program(words: list[str]) -> tuple[str, list[str]] | None:
    """("poelm", args) or (benchmark script, args) for a command line; None for anything else."""
    if words[0] in ("poelm", ".venv/bin/poelm"):
        return "poelm", words[1:]
    if words[0] in ("python", "python3", ".venv/bin/python", "torchrun"):
        for i, w in enumerate(words[:-1]):
            if w == "-m" and words[i + 1] == "poelm":
                return "poelm", words[i + 2:]
        if words[0] != "torchrun" and len(words) > 1 and re.fullmatch(r"benchmarks/\w+\.py", words[1]):
            return words[1], words[2:]
    return None


def commands() -> list[Command]:
    found = []
    for path in DOCS:
        text, name = path.read_text(), path.relative_to(ROOT)
        for no, line in bash_lines(text):
            if (words := shlex.split(substituted(line), comments=True)) and program(words):
                found.append(Command(words, f"{name}:{no}", whole=True))
        for no, span in code_spans(text):
            if (words := span.split()) and program(words):
                found.append(Command(words, f"{name}:{no}", whole=False))
    return found


ALL = commands()


class Parsed(BaseException):  # not an Exception: the benchmarks report those and exit
    pass


def benchmark_parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a benchmark builds in its main(), caught as it parses (nothing else of it runs)."""
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"

    def catch(self, args=None, namespace=None):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(sys, "argv", [str(path)])
    monkeypatch.syspath_prepend(str(path.parent))  # as `python benchmarks/X.py` puts its folder first
    with pytest.raises(Parsed) as caught:
        runpy.run_path(str(path), run_name="__main__")
    monkeypatch.undo()
    return caught.value.args[0]


def subcommand(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """Follow the command path (`specialist train`, `stage attach|train`) to the parser that takes the rest."""
    while words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or not re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", words[0]):
            break
        names = words[0].split("|")
        for name in names:
            assert name in subs[0].choices, f"no command `{name}`; the parser has {sorted(subs[0].choices)}"
        parser, words = subs[0].choices[names[0]], words[1:]
    return parser, words


def flags(words: list[str]) -> list[str]:
    return [f for w in words for f in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", w.split("=")[0])]


@pytest.mark.parametrize("command", ALL, ids=lambda c: c.where)
def test_command_matches_the_parser(command, monkeypatch):
    prog, argv = program(command.words)
    parser = build_parser() if prog == "poelm" else benchmark_parser(prog, monkeypatch)
    if command.whole:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{command} does not parse (exit {e.code})")
        return
    target, rest = subcommand(parser, argv)
    known = set(target._option_string_actions)
    unknown = [f for f in flags(rest) if f not in known]
    assert not unknown, f"{command}: {unknown} are not options of `{target.prog}`"


def test_the_docs_have_commands():
    """The extraction finds what is there (a broken fence or pattern would silently check nothing)."""
    pipeline = [c for c in ALL if c.where.startswith("README.md") and c.whole and c.words[0] == "poelm"]
    assert len(pipeline) >= 15
    assert sum(program(c.words)[0] != "poelm" for c in ALL) >= 10
    assert any(c.words[0] == "torchrun" for c in ALL)


@pytest.mark.parametrize("line", ["poelm generate base --no-such-flag", "poelm no-such-command",
                                  "poelm specialist attach|nope", "python benchmarks/decode.py DIR [--nope]"])
def test_a_wrong_command_is_caught(line, monkeypatch):
    """The check itself fails on a flag or command the code does not have, whole or sketched."""
    words = line.split()
    command = Command(words, "here", whole=not SKETCH.search(line))
    with pytest.raises((pytest.fail.Exception, AssertionError)):
        test_command_matches_the_parser(command, monkeypatch)


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_the_readme_python_runs(tiny_stage, tmp_path, monkeypatch):
    """The README's Python blocks (transformers, then the API in brief) run as written, on a tiny stage
    standing where they look for one (`runs/code/best`)."""
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) == 2 and "AutoModelForCausalLM" in blocks[0] and "make_decoder" in blocks[1]
    (tmp_path / "runs" / "code").mkdir(parents=True)
    (tmp_path / "runs" / "code" / "best").symlink_to(tiny_stage[1])
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["out"].logits.shape[-1] >= scope["tok"].vocab_size
