"""The README's "Protect your own Thrift service" shows the files of examples/notes/ exactly.

`make test` runs examples/notes/ as a project of its own; this test keeps the
README's copy of it from drifting, so that what a newcomer types is what CI ran.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"<!-- file: (?P<path>[^ ]+) -->\n```[a-z]*\n(?P<body>.*?)\n```\n", re.S)


def test_every_example_file_shown_in_the_readme_is_the_file() -> None:
    readme = (ROOT / "README.md").read_text()
    shown = {m["path"]: m["body"] for m in _BLOCK.finditer(readme)}
    expected = {
        f"examples/notes/{name}"
        for name in ("notes.thrift", "notes_service.py", "test_notes.py", "pytest.ini")
    }
    assert set(shown) == expected
    for path, body in shown.items():
        assert body == (ROOT / path).read_text().rstrip(), f"README's copy of {path} differs"
