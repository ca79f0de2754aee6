"""Fixtures of the topology suite: Auth and Posts replicas as real processes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

AUTH_READY = re.compile(
    r"^auth-rpc ready: thrift=[\d.]+:(?P<port>\d+) http=http://[\d.]+:(?P<http_port>\d+) "
)
POSTS_READY = re.compile(r"^posts-rpc ready: thrift=[\d.]+:(?P<port>\d+) ")


@dataclass
class Replica:
    """A started server process and the ports its ready line named."""

    name: str
    proc: subprocess.Popen[str]
    port: int
    http_port: int | None
    log: Path

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, then reap."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    """``spawn("auth"|"posts", *serve_args)``: a ``serve`` process on free ports,
    returned once its ready line is out (no sleeping); stopped at teardown."""
    started: list[Replica] = []

    def start(kind: str, *args: str) -> Replica:
        name = f"{kind}{sum(r.name.startswith(kind) for r in started) + 1}"
        module = "auth_rpc.auth.cli" if kind == "auth" else "posts_rpc.cli"
        ports = ["--port", "0"] + (["--http-port", "0"] if kind == "auth" else [])
        log = tmp_path / f"{name}.log"
        with log.open("a") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", *ports, *args],
                stdout=subprocess.PIPE,
                stderr=err,  # a file, not a pipe: the access log must never block the server
                stdin=subprocess.DEVNULL,
                text=True,
            )
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # blocks until ready: no sleeping
        match = (AUTH_READY if kind == "auth" else POSTS_READY).match(line)
        if match is None:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail(f"{name}: no ready line: {line!r}\n{log.read_text()[-3000:]}")
        replica = Replica(name, proc, int(match["port"]),
                          int(match["http_port"]) if kind == "auth" else None, log)
        started.append(replica)
        return replica

    yield start
    for replica in reversed(started):
        replica.stop()
