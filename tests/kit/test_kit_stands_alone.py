"""The kit is shared by every room, so it imports none of them (nor anything else of `app`)."""

from __future__ import annotations

import ast
from pathlib import Path

import app.kit

KIT = Path(app.kit.__file__).parent


def _imported_modules(source: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_the_kit_imports_nothing_of_app() -> None:
    modules = sorted(KIT.glob("*.py"))
    assert {m.name for m in modules} >= {"money.py", "times.py", "cursors.py"}
    for module in modules:
        for name in _imported_modules(module.read_text()):
            assert not (name == "app" or name.startswith(("app.", ".."))), (module.name, name)


def test_the_check_sees_an_import_of_app() -> None:
    assert _imported_modules(
        "from app.errors import AppError\nimport app.db\nfrom .. import x"
    ) == [
        "app.errors",
        "app.db",
        "..",
    ]
