"""The package's layers, read from its imports: every import of every module of `poelm/` (at module level or
inside a function, relative or absolute) goes down the order below or stays in its own layer, and no
modules import each other in a cycle. The order is written here once; docs/architecture.md explains it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "poelm"

# Bottom to top. A module may import its own layer and the layers before it, never one after.
LAYERS = [
    "poelm.core",    # what ships in every model directory: the model, config, tokenizer, files, cascade loader
    "poelm.common",  # infrastructure: atomic outputs, command options, progress
    "poelm.data",    # corpora, records, tokenized folders, conversations, tokenizer training
    "poelm.models",  # model directories: write, read, cards, specialists, conversions
    "poelm.infer",   # decoders: engine, batches, speculative, adaptive, fleet, composition
    "poelm.eval",    # bits per byte, HumanEval and its sandbox
    "poelm.train",   # the training loop, pretraining, stage SFT, checkpoints, pipeline parallelism
    "poelm.serve",   # the OpenAI-compatible server
    "poelm.app",     # the applications: the command line, the demo, the chat
]
ROOTS = {"poelm": -1, "poelm.__main__": len(LAYERS) - 1}  # the package's own __init__ and `python -m poelm`


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer(module: str) -> int:
    if module in ROOTS:
        return ROOTS[module]
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    raise AssertionError(f"{module} belongs to no layer: put it in one of {LAYERS}")


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The poelm modules `module` imports, anywhere in its file (a name imported from a package counts
    as that submodule when it is one)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "poelm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "poelm":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    out.discard(module)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t in imports(m, p, known) if t in known} for m, p in known.items()}


def test_every_import_goes_down_the_layers():
    upward = [f"{m} (layer {LAYERS[layer(m)] if layer(m) >= 0 else 'poelm'}) imports {t} ({LAYERS[layer(t)]})"
              for m, targets in graph().items() for t in sorted(targets)
              if layer(t) > layer(m) and t not in ROOTS]
    assert upward == [], "\n".join(upward)


def test_no_module_imports_itself_through_others():
    edges = graph()
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in sorted(edges[m]):
            if t in ROOTS or layer(t) < 0:
                continue
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [m, t]) if t in stack else f"{m} -> {t}")
            elif t not in state:
                visit(t, stack + [m])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    # a package's __init__ re-exporting its own modules is not a cycle of the layering
    cycles = [c for c in cycles if not any(c.split(" -> ")[i + 1].startswith(c.split(" -> ")[i] + ".")
                                           for i in range(len(c.split(" -> ")) - 1))]
    assert cycles == [], "\n".join(cycles)


def test_the_checker_sees_what_it_must(tmp_path):
    """The parser reads relative, absolute and function-level imports, and a name imported from a package
    as the submodule it is."""
    source = ("from ..core.files import CONFIG\nimport poelm.infer.batch\n"
              "def f():\n    from ..serve import app\n    from . import sibling\n")
    path = tmp_path / "mod.py"
    path.write_text(source)
    known = {"poelm.core.files": path, "poelm.infer.batch": path, "poelm.serve.app": path, "poelm.data.sibling": path}
    assert imports("poelm.data.mod", path, known) == {"poelm.core.files", "poelm.infer.batch", "poelm.serve.app",
                                                      "poelm.data.sibling"}
    assert layer("poelm.serve.app") > layer("poelm.data.mod")
