"""The source distribution carries what the README and docs point to (issue 15, item 10).

The sdist is built from this checkout with the build backend's own API
(``hatchling.build.build_sdist``, what ``python -m build --sdist`` calls),
in a separate process, into a temporary directory: the README links to
``docs/`` and ``deploy/`` and walks through ``examples/``, the Makefile runs
``bench/`` and ``scripts/``, and the tests read ``deploy/haproxy.cfg``, so all
must be in it, beside the packages, the IDL and the tests, and every relative
link of its Markdown files must name a file in it; nothing made locally (a
virtual environment, bytecode) may be.
"""

from __future__ import annotations

import posixpath
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_sdist_has_docs_and_examples(tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="hatchling (the build backend) is not installed")
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not run from a source checkout")
    done = subprocess.run(  # the build backend's API, as a build frontend calls it
        [sys.executable, "-c",
         "import sys, hatchling.build as b; print(b.build_sdist(sys.argv[1]))", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    archive = tmp_path / done.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        markdown = {
            name.split("/", 1)[1]: tar.extractfile(name).read().decode()  # type: ignore[union-attr]
            for name in names if name.endswith(".md")
        }
    top = names[0].split("/", 1)[0]
    members = {name.split("/", 1)[1] for name in names if "/" in name}

    for path in (ROOT / "docs").iterdir():
        assert f"docs/{path.name}" in members, f"docs/{path.name} is missing"
    for expected in (
        "README.md", "pyproject.toml", "Makefile",
        "examples/demo.py", "examples/notes/notes.thrift", "examples/notes/notes_service.py",
        "examples/notes/test_notes.py", "examples/notes/pytest.ini",
        "idl/auth.thrift", "idl/common.thrift", "idl/posts.thrift",
        "auth_rpc/__init__.py", "posts_rpc/cli.py", "client/cli.py",
        "tests/test_packaging.py", "deploy/haproxy.cfg", "bench/run.py",
        "scripts/with-busy-cores",
    ):
        assert expected in members, f"{expected} is missing from {top}"
    assert not [m for m in members if m.startswith(".venv/") or m.endswith(".pyc")]

    assert "README.md" in markdown and "docs/contract.md" in markdown
    for name, text in markdown.items():
        for target in re.findall(r"\]\(([^()\s]+)\)", text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            linked = posixpath.normpath(
                posixpath.join(posixpath.dirname(name), target.split("#", 1)[0])
            ).rstrip("/")
            assert linked in members or any(m.startswith(linked + "/") for m in members), (
                f"{name} links to {target}, which is not in the sdist"
            )
