"""Server processes for the bench: start, wait for the ready line, pin, measure, stop.

Every process started here is registered and stopped by :func:`stop_all`
(SIGTERM, then SIGKILL after a grace period), which ``bench.run`` calls in a
``finally`` -- also on Ctrl-C and on errors.

CPU time and memory come from ``/proc``: user+sys ticks of the process and of
its descendants still alive (``/proc/<pid>/stat`` counts the time of every
thread, including threads that have exited), and ``VmHWM`` (peak resident set
size) from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ServerProcess",
    "all_cpus",
    "cpu_seconds",
    "peak_rss_mb",
    "rss_mb",
    "set_affinity",
    "stop_all",
]

_TICK = float(os.sysconf("SC_CLK_TCK"))
#: The checkout's root: servers run from here, so ``python -m bench...`` finds the package.
REPO_ROOT = Path(__file__).resolve().parent.parent
_RUNNING: list[ServerProcess] = []


def all_cpus() -> set[int]:
    """The CPUs this process may run on."""
    return set(os.sched_getaffinity(0))


def _descendants(pid: int) -> list[int]:
    """``pid`` and every live descendant (through ``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                text = Path(f"/proc/{current}/task/{tid}/children").read_text()
            except OSError:
                continue
            todo.extend(int(child) for child in text.split())
    return out


def _cpu_of(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces: split after its closing ")".
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def cpu_seconds(pid: int, *, descendants: bool = True) -> float:
    """User+sys CPU seconds of ``pid`` (and of its live descendants, by default)."""
    if not descendants:
        return _cpu_of(pid)
    return sum(_cpu_of(p) for p in _descendants(pid))


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of ``pid`` and its live descendants, summed, in MB."""
    return sum(_status_kb(p, "VmHWM") for p in _descendants(pid)) / 1024.0


def rss_mb(pid: int) -> float:
    """Current resident set size (VmRSS) of ``pid`` and its live descendants, in MB."""
    return sum(_status_kb(p, "VmRSS") for p in _descendants(pid)) / 1024.0


class ServerProcess:
    """A server started as a separate process, optionally pinned to some CPUs.

    ``start()`` waits (up to ``ready_timeout_s``) for a line on standard output
    that starts with ``ready_prefix`` and keeps it as :attr:`ready_line`; the
    server's standard error goes to ``log_path``. Raises ``RuntimeError`` when
    the process exits or stays silent instead.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: set[int] | None,
        log_path: Path,
        ready_prefix: str,
        ready_timeout_s: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.cpus = cpus
        self.log_path = log_path
        self.ready_prefix = ready_prefix
        self.ready_timeout_s = ready_timeout_s
        self.env = env
        self.ready_line = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServerProcess:
        """Launch and wait for the ready line; raises ``RuntimeError`` on failure."""
        self.launch()
        return self.wait_ready()

    def launch(self) -> ServerProcess:
        """Start the process (unpinned) without waiting for it to be ready."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                env=self.env, cwd=REPO_ROOT,
            )
        _RUNNING.append(self)
        return self

    def wait_ready(self) -> ServerProcess:
        """Wait for the ready line, then pin every thread to :attr:`cpus`.

        Pinning after start-up lets several servers import and initialise in
        parallel; a server is idle (its threads blocked) once it is ready, and
        threads made later inherit the pinned affinity of the thread making them.
        Stops the process and raises ``RuntimeError`` if it is not ready in time.
        """
        try:
            self.ready_line = self._wait_ready()
            if self.cpus:
                set_affinity(self.pid, self.cpus)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        deadline = time.monotonic() + self.ready_timeout_s
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(out, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"{self.name}: no ready line within {self.ready_timeout_s} s"
                    )
                if not sel.select(left):
                    continue
                chunk = os.read(out.fileno(), 65536)
                if not chunk:
                    code = self.proc.wait()
                    raise RuntimeError(
                        f"{self.name}: exited with {code} before it was ready; see {self.log_path}"
                    )
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace").strip()
                    if text.startswith(self.ready_prefix):
                        return text

    def begin_stop(self) -> None:
        """Send SIGTERM without waiting (:meth:`stop` or :func:`stop_all` reaps it)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.begin_stop()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                print(f"bench: {self.name} ignored SIGTERM; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if self in _RUNNING:
            _RUNNING.remove(self)
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Move every thread of ``pid`` and of its live descendants to ``cpus``."""
    for proc in _descendants(pid):
        try:
            tids = os.listdir(f"/proc/{proc}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):  # the thread has just exited
                os.sched_setaffinity(int(tid), cpus)


def stop_all(servers: list[ServerProcess] | None = None) -> None:
    """Stop ``servers`` (default: every server still running), all at once.

    SIGTERM to each first, then wait for each (SIGKILL after 5 s).
    """
    targets = list(_RUNNING if servers is None else servers)
    for server in targets:
        server.begin_stop()
    for server in reversed(targets):
        try:
            server.stop(grace_s=5.0)
        except Exception as exc:  # keep stopping the others
            print(f"bench: could not stop {server.name}: {exc}", file=sys.stderr)
