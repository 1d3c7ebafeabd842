"""The house rules on size (shared/STYLE.md): product modules stay under ~400 lines and
functions under ~60, so each reads in a screenful or two."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "worker", "training")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_modules_are_small() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them): {long}"


def test_functions_are_short() -> None:
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"


def test_every_package_says_what_it_holds() -> None:
    """Each package's ``__init__`` has a docstring (what it holds, what it may import)."""
    folders = {p.parent for p in _modules()}
    missing = [str(f.relative_to(ROOT)) for f in sorted(folders)
               if not (f / "__init__.py").is_file()
               or ast.get_docstring(ast.parse((f / "__init__.py").read_text())) is None]
    assert not missing, f"packages without an __init__ docstring: {missing}"
