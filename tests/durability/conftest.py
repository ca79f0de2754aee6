"""Fixtures of the durability suite: Auth and Posts servers as real processes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

AUTH_READY = re.compile(r"^auth-rpc ready: thrift=[\d.]+:(?P<port>\d+) http=(?P<http>\S+) ")
POSTS_READY = re.compile(r"^posts-rpc ready: thrift=[\d.]+:(?P<port>\d+) ")


@dataclass
class Process:
    """A started server process and the port its ready line named."""

    name: str
    proc: subprocess.Popen[str]
    port: int
    log: Path

    def kill(self) -> None:
        """SIGKILL, then reap."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        """SIGTERM (graceful), then reap; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


def _start(name: str, module: str, args: list[str], log: Path,
           ready: re.Pattern[str]) -> Process:
    with log.open("a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=err,  # a file, not a pipe: the access log must never block the server
            stdin=subprocess.DEVNULL,
            text=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # blocks until ready: no sleeping
    match = ready.match(line)
    if match is None:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"{name}: no ready line: {line!r}\n{log.read_text()[-2000:]}")
    return Process(name=name, proc=proc, port=int(match["port"]), log=log)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """``spawn("auth"|"posts", data_dir, ...)``: a server process, stopped at teardown."""
    started: list[Process] = []

    def start(kind: str, data_dir: Path, *, issuer: str, auth_port: int = 0) -> Process:
        log = tmp_path / f"{kind}.log"
        if kind == "auth":
            process = _start(kind, "auth_rpc.auth.cli", [
                "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", "0",
                "--http-port", "0", "--issuer", issuer,
            ], log, AUTH_READY)
        else:
            process = _start(kind, "posts_rpc.cli", [
                "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", "0",
                "--verify", "thrift", "--auth-addr", f"127.0.0.1:{auth_port}",
                "--issuer", issuer,
            ], log, POSTS_READY)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        if process.proc.poll() is None:
            process.terminate()
        if process.proc.stdout is not None:
            process.proc.stdout.close()
