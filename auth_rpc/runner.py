"""Running a server process from a command line: ready line, signals, exit code.

Shared by ``auth-rpc serve`` and ``posts-rpc serve``: print one ready line
naming the addresses (flushed, so a supervisor or a test reading standard
output sees it at once), wait for SIGTERM or SIGINT, stop gracefully (stop
accepting, finish calls in flight), and return 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

__all__ = ["configure_logging", "run_until_signal"]


def configure_logging(level: str = "INFO") -> None:
    """Log to standard error, one line per record (never tokens: see each logger)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def run_until_signal(ready_line: str, stop: Callable[[], None]) -> int:
    """Print ``ready_line``, block until SIGTERM/SIGINT, call ``stop``; return 0."""
    stopping = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(ready_line, flush=True)
        while not stopping.wait(1.0):
            pass
        logging.getLogger("auth_rpc.runner").info("signal received; stopping")
        stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
