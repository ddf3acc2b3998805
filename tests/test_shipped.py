"""What ships in every model directory is exactly `poelm/core`, and it imports only itself, the standard
library and the packages a transformers user has (torch, transformers, huggingface_hub, safetensors,
tiktoken) plus xxhash — so a directory loads with `trust_remote_code=True` without poelm installed."""

from __future__ import annotations

import ast
import sys

from poelm.models.directory import SHIPPED_DIR, shipped_code_files

THIRD_PARTY = {"torch", "transformers", "huggingface_hub", "safetensors", "tiktoken", "xxhash"}


def test_shipped_code_imports_only_itself_and_allowed_packages():
    files = shipped_code_files()
    siblings = {p.stem for p in files}
    assert {p.name for p in SHIPPED_DIR.glob("*.py")} == {p.name for p in files} | {"__init__.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in siblings, (path.name, node.module)  # a sibling, flat
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top in sys.stdlib_module_names or top in THIRD_PARTY or top == "__future__", \
                        (path.name, name)


def test_nothing_outside_core_is_imported_by_core():
    """The shipped files never reach back into the rest of poelm (it is not there in a model directory)."""
    for path in shipped_code_files():
        assert "poelm." not in "".join(l for l in path.read_text().splitlines(True)
                                       if l.lstrip().startswith(("import ", "from "))), path.name
