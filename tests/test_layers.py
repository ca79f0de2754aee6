"""Imports run one way: auth -> verify -> serving; nothing in auth_rpc reaches up.

Read from the source (every import statement, including those inside functions
and under TYPE_CHECKING), so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What each part of the code may import, of the project's own packages.
ALLOWED = {
    "auth_rpc/serving": {"auth_rpc.serving", "auth_rpc.errors"},
    "auth_rpc/verify": {"auth_rpc.verify", "auth_rpc.serving", "auth_rpc.errors", "auth_rpc.idl"},
    "auth_rpc/auth": {
        "auth_rpc.auth", "auth_rpc.verify", "auth_rpc.serving", "auth_rpc.errors", "auth_rpc.idl",
        "auth_rpc.__version__",
    },
    "auth_rpc/errors.py": set(),
    "auth_rpc/idl.py": set(),
    "auth_rpc/testing.py": {
        "auth_rpc.auth", "auth_rpc.verify", "auth_rpc.serving", "auth_rpc.errors", "auth_rpc.idl",
    },
}
PROJECT = ("auth_rpc", "posts_rpc", "client")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from auth_rpc import errors`` imports auth_rpc.errors
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PROJECT}


def _allowed(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_run_one_way(part: str) -> None:
    target = ROOT / part
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files
    wrong = {
        f"{f.relative_to(ROOT)}: {name}"
        for f in files
        for name in _imports(f)
        if not _allowed(name, ALLOWED[part])
    }
    assert not wrong, sorted(wrong)
