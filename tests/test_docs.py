"""The repository's documentation stays true and self-contained (issue 15, item 10).

- Nothing in the repository (docs, code, scripts) points to a file outside it:
  not to the measuring notes, contract notes or shared folder of the place it
  was first written in (``_OUTSIDE``); every relative Markdown link names a
  file of the repository.
- No Markdown table is split by a blank line (its rows after the gap would be
  shown as stray text).
- The README's claim list names every claim of a real access token.
- The README's fixture table lists every fixture the three pytest plugins
  provide, each beside its plugin, and nothing else.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from _pytest.fixtures import getfixturemarker

ROOT = Path(__file__).resolve().parent.parent

#: Directories that are not the repository's own text (made by tools, or installed).
_SKIP_DIRS = {
    ".git", ".venv", "venv", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache",
    ".pytest_cache", ".hypothesis", "node_modules", "out",
}
_TEXT_SUFFIXES = {".md", ".py", ".thrift", ".toml", ".cfg", ".ini", ".txt", ".sh", ".java"}
_TEXT_NAMES = {"Makefile", "run", "with-busy-cores"}

#: Files of the place the project was first written in, never shipped with it. Spelled in
#: pieces so that this file does not name them itself.
_OUTSIDE = ("MEASURING" + ".md", "CONTRACT" + ".md", ".." + "/shared", "/work" + "/shared")

PLUGINS = ("auth_rpc.testing", "posts_rpc.testing", "client.testing")


def _repository_files() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in relative.parts):
            continue
        if path.is_file() and (path.suffix in _TEXT_SUFFIXES or path.name in _TEXT_NAMES):
            yield path


def _markdown_files() -> list[Path]:
    return [p for p in _repository_files() if p.suffix == ".md"]


def test_the_walk_sees_the_docs_and_the_code() -> None:
    seen = {p.relative_to(ROOT).as_posix() for p in _repository_files()}
    for expected in ("README.md", "docs/design.md", "docs/benchmarks.md", "docs/contract.md",
                     "bench/bare.py", "bench/verifier_micro.py", "client/cli.py", "Makefile"):
        assert expected in seen


def test_nothing_points_to_a_file_outside_the_repository() -> None:
    found = []
    for path in _repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            found += [
                f"{path.relative_to(ROOT)}:{number}: {needle}"
                for needle in _OUTSIDE if needle in line
            ]
    assert not found, "\n".join(found)


_LINK = re.compile(r"\]\(([^()\s]+)\)")


def test_relative_markdown_links_name_files_of_the_repository() -> None:
    broken = []
    for path in _markdown_files():
        for target in _LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same file
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            if not resolved.exists() or not resolved.is_relative_to(ROOT):
                broken.append(f"{path.relative_to(ROOT)}: ({target})")
    assert not broken, "\n".join(broken)


def _table_starts(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, first row, the line after it) of each table outside code blocks."""
    lines = text.splitlines()
    fenced = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or not line.startswith("|"):
            continue
        if i == 0 or not lines[i - 1].startswith("|"):
            yield i + 1, line, lines[i + 1] if i + 1 < len(lines) else ""


def test_no_markdown_table_is_split_by_a_blank_line() -> None:
    """A table's first row is its header, followed by the ``|---|`` delimiter row.

    A blank line inside a table ends it: the rows after it start a "table"
    without a delimiter row, which Markdown shows as stray text.
    """
    separator = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+\s*$")
    split = [
        f"{path.relative_to(ROOT)}:{number}: {first[:60]}"
        for path in _markdown_files()
        for number, first, after in _table_starts(path.read_text(encoding="utf-8"))
        if not separator.match(after)
    ]
    assert not split, "\n".join(split)


def test_the_readme_claim_list_names_every_claim_of_an_access_token(
    auth_client: Any, make_user: Any
) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("; claims ")
    listed = set(re.findall(r"`([a-z_]+)`", readme[start:readme.index(".", start)]))
    make_user("claire", "claire's long password")
    token = auth_client.login("claire", "claire's long password").access_token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) <= listed, f"not in the README's claim list: {set(claims) - listed}"
    assert "nbf" in claims and "nbf" in listed


def _plugin_fixtures() -> dict[str, str]:
    """Every fixture the installed plugins define: name -> plugin module."""
    fixtures: dict[str, str] = {}
    for module_name in PLUGINS:
        for attribute, value in vars(importlib.import_module(module_name)).items():
            marker = getfixturemarker(value)
            if marker is not None and not attribute.startswith("_"):
                fixtures[marker.name or attribute] = module_name
    return fixtures


def _readme_fixture_table() -> dict[str, str]:
    """The README's fixture table: fixture name -> the plugin named on its row."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Testing your own Thrift services"):]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no fixture table"
    table: dict[str, str] = {}
    for row in rows:
        fixtures, plugin = row.split(" | ")[:2]
        plugin_name = plugin.strip().strip("`")
        # `name(arg, ...)` or `name` (and "(session)" notes outside backticks)
        for item in re.findall(r"`([^`]+)`", fixtures):
            table[re.split(r"[(\s]", item, maxsplit=1)[0]] = plugin_name
    return table


def test_the_readme_fixture_table_lists_every_fixture_of_the_plugins() -> None:
    provided = _plugin_fixtures()
    assert {"auth_server", "auth_client", "posts_server", "make_session"} <= set(provided)
    documented = _readme_fixture_table()
    assert sorted(set(provided) - set(documented)) == [], "fixtures missing from the README"
    assert sorted(set(documented) - set(provided)) == [], "README rows naming no fixture"
    wrong = {name: (documented[name], plugin) for name, plugin in provided.items()
             if documented[name] != plugin}
    assert not wrong, f"README names another plugin (README, actual): {wrong}"


@pytest.mark.parametrize("module_name", PLUGINS)
def test_each_plugin_is_registered_under_pytest11(module_name: str) -> None:
    """The table's plugins are the ones ``pip install`` registers (loaded automatically)."""
    from importlib import metadata

    registered = {ep.value for ep in metadata.entry_points(group="pytest11")}
    assert module_name in registered
