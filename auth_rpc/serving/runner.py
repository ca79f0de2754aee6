"""Running a server process from a command line: ready line, signals, exit code.

Shared by ``auth-rpc serve`` and ``posts-rpc serve``: print one ready line
naming the addresses (flushed, so a supervisor or a test reading standard
output sees it at once), wait for SIGTERM or SIGINT, stop gracefully (stop
accepting, finish calls in flight), and return 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from auth_rpc.serving.proxy_protocol import parse_networks
from auth_rpc.serving.rpc import ACCESS_MESSAGE, TEXT_LOG_FORMAT

__all__ = [
    "ACCESS_FIELDS",
    "LOG_FORMATS",
    "JsonFormatter",
    "ListenError",
    "add_listener_arguments",
    "add_logging_arguments",
    "bind_socket",
    "configure_logging",
    "listener_limits",
    "report_error",
    "run_until_signal",
    "run_workers",
    "worker_number",
]

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_worker_number = 0


def worker_number() -> int:
    """This process's worker number under :func:`run_workers` (0..N-1); 0 when not pre-forked.

    A restarted worker takes the number of the one it replaces.
    """
    return _worker_number
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to send this worker SIGTERM when its parent dies (Linux).

    Without it, ``kill -9`` of the supervisor left the workers serving and
    holding the port. SIGTERM, not SIGKILL: the worker stops gracefully
    (finishes the calls in flight). If the parent is already gone (it died
    between the fork and this call), stop at once.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        except (OSError, AttributeError) as exc:  # pragma: no cover - not Linux-like
            logging.getLogger("auth_rpc.serving.runner").warning(
                "workers will not stop with their parent: %s", exc
            )
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


class ListenError(OSError):
    """A listening socket could not be made; the message names the address.

    ``str()`` is the message alone (``OSError`` would put ``[Errno 98]``
    in front of it), so a command's one error line reads well.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def bind_socket(host: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0`` picks a free one).

    Raises :class:`ListenError` (an ``OSError`` with the same ``errno``) whose
    message names the address: ``cannot listen on 127.0.0.1:9090: address
    already in use``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]" if ":" in host else host
        reason = (exc.strerror or str(exc)).lower()
        raise ListenError(exc.errno, f"cannot listen on {shown}:{port}: {reason}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def report_error(prog: str, exc: Exception) -> int:
    """Print the one-line error of a command (``PROG: error: ...``); returns exit code 1."""
    message = getattr(exc, "message", None) or str(exc)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


#: ``--log-format`` choices: ``text`` (the default) and ``json``.
LOG_FORMATS = ("text", "json")

#: The access lines' messages (``auth_rpc.access``, ``auth_rpc.access.http``) and
#: the names of their arguments, which :class:`JsonFormatter` gives as fields.
ACCESS_FIELDS: dict[str, tuple[str, ...]] = {
    ACCESS_MESSAGE: (
        "method", "outcome", "latency_ms", "subject", "request_id",
    ),
    "http method=%s path=%s status=%d latency_ms=%.3f client=%s subject=%s peer=%s": (
        "method", "path", "status", "latency_ms", "client", "subject", "peer",
    ),
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``--log-format json``.

    Always ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``
    and ``message`` (the same text as the text format's); an access line
    (:data:`ACCESS_FIELDS`) also has its values as fields: ``request_id``,
    ``method``, ``outcome``, ``latency_ms`` (a number) and ``subject`` for a
    Thrift call; ``method``, ``path``, ``status``, ``latency_ms``,
    ``client``, ``subject`` and ``peer`` for an HTTP request (``-``: unknown).
    A record with an exception adds ``exception`` (its class and traceback,
    as the text format prints them). What is logged is what the text format
    logs: never a token, a password or a secret.
    """

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = ACCESS_FIELDS.get(record.msg) if isinstance(record.msg, str) else None
        args = record.args
        if fields is not None and isinstance(args, tuple) and len(args) == len(fields):
            for name, value in zip(fields, args, strict=True):
                if name in ("latency_ms", "status") and isinstance(value, (int, float)):
                    out[name] = round(value, 3) if name == "latency_ms" else int(value)
                else:
                    out[name] = str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=True, separators=(",", ":"))


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Log to standard error, one line per record (never tokens: see each logger).

    ``log_format`` ``text`` (default): ``TIME LEVEL LOGGER MESSAGE``; ``json``:
    one JSON object per line (:class:`JsonFormatter`).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format``, the same on every ``serve`` command."""
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text",
        help="text (default): one line per record; json: one JSON object per line "
        "(time, level, logger, message; access lines add request_id, method, outcome, "
        "latency_ms, subject)",
    )  # fmt: skip


def run_until_signal(ready_line: str, stop: Callable[[], None], *, announce: bool = True) -> int:
    """Print ``ready_line`` (if ``announce``), wait for SIGTERM/SIGINT, call ``stop``; return 0."""
    stopping = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if announce:
            print(ready_line, flush=True)
        while not stopping.wait(1.0):
            pass
        logging.getLogger("auth_rpc.serving.runner").info("signal received; stopping")
        stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def run_workers(
    workers: int,
    ready_line: str,
    start_child: Callable[[], Callable[[], None]],
    *,
    stop_timeout_s: float = 30.0,
) -> int:
    """Pre-fork ``workers`` processes that share the listening sockets bound before the call.

    Each child calls ``start_child()`` (which opens its own stores and
    verifiers, starts serving on the inherited sockets, and returns its stop
    function), then serves until SIGTERM/SIGINT. The parent prints
    ``ready_line`` (the sockets already listen: connections queue until a
    child accepts them), restarts a child that dies unexpectedly, and on
    SIGTERM/SIGINT stops every child gracefully (SIGKILL after
    ``stop_timeout_s``) and returns 0. Nothing may run threads in the parent
    before this call: ``fork`` copies only the calling thread.
    """
    log = logging.getLogger("auth_rpc.serving.runner")
    stopping = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in _STOP_SIGNALS}
    children: dict[int, int] = {}  # pid -> worker number
    parent = os.getpid()

    def spawn(number: int) -> None:
        # The stop signals are blocked across fork() until the child has its
        # own handler: a SIGTERM that arrives in between (a supervisor stopping
        # the service just as a worker is restarted) then stops the child
        # gracefully instead of killing it with the default action.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            raise
        if pid == 0:  # the child
            global _worker_number
            _worker_number = number
            code = 1
            try:
                child_stopping = threading.Event()
                for sig in _STOP_SIGNALS:
                    signal.signal(sig, lambda signum, frame: child_stopping.set())
                _die_with_parent(parent)
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                stop = start_child()
                while not child_stopping.wait(1.0):
                    pass
                stop()
                code = 0
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                logging.shutdown()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        children[pid] = number

    try:
        for number in range(workers):
            spawn(number)
        print(ready_line, flush=True)
        restarts: list[float] = []
        while not stopping.wait(0.2):
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                number = children.pop(pid, -1)
                if stopping.is_set() or number < 0:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 5 * workers:
                    log.error("workers keep dying (%d restarts in 60 s); giving up", len(restarts))
                    stopping.set()
                    break
                log.warning(
                    "worker %d stopped with %s; starting a new one", number, _how_stopped(status)
                )
                spawn(number)
        log.info("signal received; stopping %d workers", len(children))
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + stop_timeout_s
        clean = True
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                if time.monotonic() > deadline:
                    for straggler in children:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(straggler, signal.SIGKILL)
                    clean = False
                    deadline = float("inf")
                stopping.wait(0.05)
                continue
            number = children.pop(pid, -1)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                log.error("worker %d stopped with %s", number, _how_stopped(status))
            clean &= code == 0
        return 0 if clean else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _how_stopped(wait_status: int) -> str:
    """``exit status N`` or ``signal N (SIGNAME)`` from a ``waitpid`` status."""
    code = os.waitstatus_to_exitcode(wait_status)
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
    return f"signal {-code} ({name})"


def _at_least_one(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 0x7FFFFFFF:
        raise argparse.ArgumentTypeError("must be 1..2147483647")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses NaN
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _network(text: str) -> str:
    try:
        parse_networks([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_listener_arguments(
    parser: argparse.ArgumentParser,
    *,
    max_connections: int,
    max_connections_per_peer: int,
    idle_timeout_s: float,
    max_message_bytes: int,
    message_help: str = "",
) -> None:
    """The Thrift listener's limits as flags, the same on every ``serve`` command.

    Read them back with :func:`listener_limits` (``ServerSettings`` keywords).
    """
    parser.add_argument(
        "--max-connections", type=_at_least_one, default=max_connections, metavar="N",
        help=f"Thrift connections in all (default {max_connections})",
    )  # fmt: skip
    parser.add_argument(
        "--max-connections-per-peer", type=_at_least_one, default=max_connections_per_peer,
        metavar="N",
        help="Thrift connections of one client IP address; more are answered 'server busy' "
        f"(default {max_connections_per_peer})",
    )  # fmt: skip
    parser.add_argument(
        "--idle-timeout", type=_seconds, default=idle_timeout_s, metavar="SECONDS",
        help="how long a Thrift connection may wait for its next call "
        f"(default {idle_timeout_s:g})",
    )  # fmt: skip
    parser.add_argument(
        "--max-message-bytes", type=_at_least_one, default=max_message_bytes, metavar="N",
        help=f"largest Thrift message accepted (default {max_message_bytes}{message_help})",
    )  # fmt: skip
    parser.add_argument(
        "--proxy-protocol-from", type=_network, action="append", default=[],
        metavar="ADDRESS[/BITS]",
        help="a TCP proxy in front (HAProxy with send-proxy-v2): its Thrift connections "
        "begin with a PROXY protocol header naming the client, whose address the service "
        "then sees; connections from it without one are closed. Repeatable",
    )  # fmt: skip


def listener_limits(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ServerSettings`` keywords of the flags :func:`add_listener_arguments` added."""
    return {
        "max_connections": args.max_connections,
        "max_connections_per_peer": args.max_connections_per_peer,
        "idle_timeout_s": args.idle_timeout,
        "max_message_bytes": args.max_message_bytes,
        "proxy_protocol_from": tuple(args.proxy_protocol_from),
    }
