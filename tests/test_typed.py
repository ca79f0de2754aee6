"""Downstream type checking: every package this project installs carries a
``py.typed`` marker (PEP 561), so a user's mypy reads our annotations instead of
reporting "missing library stubs or py.typed marker"."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ("auth_rpc", "posts_rpc", "client")

USER_CODE = """\
from auth_rpc.testing import TokenFactory
from auth_rpc.verify.guard import requires
from client import Session
from posts_rpc.handler import PostsHandler

session: Session | None = None
"""


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_has_the_marker(package: str) -> None:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None
    assert (Path(spec.origin).parent / "py.typed").is_file()


def test_a_users_mypy_reads_our_annotations(tmp_path: Path) -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    (tmp_path / "use.py").write_text(USER_CODE)
    done = subprocess.run(  # fixed arguments; run from an empty folder: no config of ours
        [sys.executable, "-m", "mypy", "--no-incremental", "--strict", "use.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "py.typed" not in done.stdout, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
