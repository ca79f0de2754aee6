"""``--version`` on every command, and ``auth_rpc.__version__``.

Each command is run as a real process, as ``python -m <module>`` and as the
console script ``pip install`` put next to this interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import auth_rpc

COMMANDS = {
    "auth-rpc": "auth_rpc.auth.cli",
    "posts-rpc": "posts_rpc.cli",
    "posts-client": "client.cli",
}


def _installed_version() -> str:
    return metadata.version("thrift-token-auth")


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own commands, fixed arguments
        args, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_module_prints_prog_and_version(prog: str) -> None:
    done = _run([sys.executable, "-m", COMMANDS[prog], "--version"])
    expected = f"{prog} {_installed_version()}\n"
    assert (done.returncode, done.stdout, done.stderr) == (0, expected, "")


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_console_script_prints_prog_and_version(prog: str) -> None:
    script = Path(sys.executable).parent / prog
    if not script.is_file():
        pytest.skip(f"{prog} is not installed next to {sys.executable}")
    done = _run([str(script), "--version"])
    assert (done.returncode, done.stdout) == (0, f"{prog} {_installed_version()}\n")


def test_dunder_version_is_the_distribution_version() -> None:
    assert auth_rpc.__version__ == _installed_version()
    assert "__version__" in auth_rpc.__all__


def test_source_checkout_falls_back_to_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _installed_version()  # an editable install of this checkout

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    pyproject = Path(auth_rpc.__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("auth_rpc is not imported from a source checkout")
    assert auth_rpc._version() == expected
