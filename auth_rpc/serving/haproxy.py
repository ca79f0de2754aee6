"""HAProxy in front of Thrift (and HTTP) replicas: the configuration and a process to run it.

One configuration, :func:`render_config`, serves the repository's
``deploy/haproxy.cfg`` (a test checks the file is exactly its output) and the
tests and the bench, which run it with their own addresses. It is templated
only for addresses, through HAProxy's own environment variables (``"${NAME}"``
in the file): ``<LISTENER>_BIND`` for each listener's bind address and
``<LISTENER>_1`` .. ``<LISTENER>_N`` for its servers, plus
``HAPROXY_STATS_SOCKET``.

Health checks. A plain TCP check passes a hung backend (a stopped process's
kernel still completes the handshake into the listen backlog), so the Thrift
listeners are checked at the Thrift level: :func:`health_check_request` is a
binary-protocol ``CALL`` of a method no service declares,
``HEALTH_CHECK_METHOD``, with no arguments. A live serving loop answers it at
once with an ``EXCEPTION`` message (``TApplicationException`` UNKNOWN_METHOD,
or "server busy" when a full listener read the call before refusing it), runs nothing and
writes no access-log line; the check matches that reply's header
(:func:`health_check_reply`: message type, method name, sequence id), which any
Thrift server (thriftpy2, Apache Thrift's C++ or Java) sends for an unknown
method. The Auth service's HTTP listener is checked with ``GET /healthz``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HEALTH_CHECK_METHOD",
    "HAProxy",
    "Listener",
    "find_haproxy",
    "health_check_reply",
    "health_check_request",
    "render_config",
]

#: ``{(listener, server): (status, check_status)}``, e.g. ``("UP", "L7OK")``.
States = dict[tuple[str, str], tuple[str, str]]

#: The method the health check calls: declared by no service, so it is never run.
HEALTH_CHECK_METHOD = "__health_check__"
_SEQID = 1
_VERSION_1 = 0x80010000
_CALL, _EXCEPTION = 1, 3

#: Check timing (seconds): every ``inter``; a server is DOWN after ``fall``
#: failed checks in a row (a hung one: each waits ``check_timeout``), UP again
#: after ``rise`` good ones.
CHECK_INTER_MS = 1000
CHECK_FAST_INTER_MS = 250
CHECK_TIMEOUT_MS = 1000
CHECK_FALL = 2
CHECK_RISE = 2
#: Connections HAProxy opens to one server at most (more wait in its queue):
#: below the listeners' ``--max-connections-per-peer`` (64), since every
#: connection through HAProxy comes from HAProxy's address, with room for checks.
SERVER_MAXCONN = 60


def _message_header(message_type: int) -> bytes:
    name = HEALTH_CHECK_METHOD.encode()
    return struct.pack("!Ii", _VERSION_1 | message_type, len(name)) + name + struct.pack(
        "!i", _SEQID
    )


def health_check_request(*, framed: bool = False) -> bytes:
    """The bytes of the check's call: a strict binary-protocol CALL, no arguments."""
    body = _message_header(_CALL) + b"\x00"  # the empty argument struct
    return struct.pack("!i", len(body)) + body if framed else body


def health_check_reply() -> bytes:
    """What a live Thrift server's answer contains: an EXCEPTION message to this call.

    The same framed or not (the frame length, which depends on the exception's
    message, comes before it and is not matched).
    """
    return _message_header(_EXCEPTION)


@dataclass(frozen=True)
class Listener:
    """One listener of the configuration: ``name`` (a HAProxy section name),
    ``servers`` (how many replicas), ``kind``: ``thrift``, ``thrift-framed`` or
    ``http`` (checked with ``GET /healthz``). ``proxy_protocol`` (Thrift
    only): each connection to a server, the checks' too, begins with a PROXY
    protocol v2 header naming the client (``send-proxy-v2``); the servers must
    be started with ``--proxy-protocol-from`` HAProxy's address."""

    name: str
    servers: int
    kind: str = "thrift"
    proxy_protocol: bool = False

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").isalnum() or not self.name.isascii():
            raise ValueError(f"listener name {self.name!r}: letters, digits and _ only")
        if self.kind not in ("thrift", "thrift-framed", "http"):
            raise ValueError(f"listener kind {self.kind!r}: thrift, thrift-framed or http")
        if self.servers < 1:
            raise ValueError("a listener needs at least one server")
        if self.proxy_protocol and self.kind == "http":
            raise ValueError("the PROXY protocol is for Thrift listeners (the HTTP one reads none)")

    @property
    def bind_var(self) -> str:
        return f"{self.name.upper()}_BIND"

    def server_var(self, number: int) -> str:
        return f"{self.name.upper()}_{number}"

    def server_name(self, number: int) -> str:
        return f"{self.name}{number}"


#: The repository's topology (``deploy/haproxy.cfg``): Auth's Thrift and HTTP
#: listeners and Posts, two replicas each; the Thrift listeners tell the
#: replicas each client's address (PROXY protocol v2).
DEPLOY_LISTENERS = (
    Listener("auth", 2, "thrift", proxy_protocol=True),
    Listener("auth_http", 2, "http"),
    Listener("posts", 2, "thrift", proxy_protocol=True),
)


def render_config(listeners: Sequence[Listener] = DEPLOY_LISTENERS) -> str:
    """The HAProxy configuration for ``listeners`` (addresses from the environment)."""
    lines = [
        "# HAProxy (2.6) in front of replicas of thrift-token-auth's services, TCP mode.",
        "# Generated by auth_rpc.serving.haproxy.render_config(); the tests run this very",
        "# file's text. Addresses come from the environment (HAProxy expands \"${NAME}\"):",
        "# HAPROXY_STATS_SOCKET, and per listener <NAME>_BIND and <NAME>_1..<NAME>_N.",
        "# See docs/deploy.md.",
        "global",
        "    maxconn 4096",
        '    stats socket "${HAPROXY_STATS_SOCKET}" mode 600 level admin',
        "",
        "defaults",
        "    mode tcp",
        "    timeout connect 1s",
        "    # Longer than the services' idle timeout (300 s): they close idle connections first.",
        "    timeout client 310s",
        "    timeout server 310s",
        f"    timeout check {CHECK_TIMEOUT_MS}ms",
        "    timeout queue 5s",
        "    # A refused connection is tried again, on another server.",
        "    retries 3",
        "    option redispatch 1",
        "    # Connections to a server marked DOWN (e.g. hung) are cut, so clients reconnect.",
        f"    default-server inter {CHECK_INTER_MS}ms fastinter {CHECK_FAST_INTER_MS}ms"
        f" fall {CHECK_FALL} rise {CHECK_RISE} maxconn {SERVER_MAXCONN}"
        " on-marked-down shutdown-sessions",
    ]
    request = health_check_request().hex()
    framed_request = health_check_request(framed=True).hex()
    reply = health_check_reply().hex()
    for listener in listeners:
        lines += ["", f"listen {listener.name}", f'    bind "${{{listener.bind_var}}}"']
        lines.append("    balance leastconn")
        if listener.kind == "http":
            lines += [
                "    option httpchk GET /healthz",
                "    http-check expect status 200",
            ]
        else:
            framing = "framed" if listener.kind == "thrift-framed" else "unframed"
            lines += [
                f"    # Thrift-level check ({framing} binary protocol): a call of a method no",
                f"    # service declares ({HEALTH_CHECK_METHOD}); a live server answers it with",
                "    # an EXCEPTION message, a hung one not at all.",
                "    option tcp-check",
                *(
                    [
                        "    # The servers read a PROXY header first: the check sends one",
                        "    # too (LOCAL: it names no client).",
                        "    tcp-check connect default",
                    ]
                    if listener.proxy_protocol
                    else ["    tcp-check connect"]
                ),
                "    tcp-check send-binary "
                + (framed_request if listener.kind == "thrift-framed" else request),
                f"    tcp-check expect binary {reply}",
            ]
        if listener.proxy_protocol:
            lines += [
                "    # Each connection begins with a PROXY v2 header naming the client, so the",
                "    # servers (started with --proxy-protocol-from HAProxy's address) see it.",
            ]
        for number in range(1, listener.servers + 1):
            lines.append(
                f"    server {listener.server_name(number)}"
                f' "${{{listener.server_var(number)}}}" check'
                + (" send-proxy-v2" if listener.proxy_protocol else "")
            )
    return "\n".join(lines) + "\n"


def find_haproxy() -> str | None:
    """The ``haproxy`` program: on ``PATH``, else ``/usr/sbin/haproxy``; ``None`` if neither."""
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


def _address(value: tuple[str, int] | str) -> str:
    if isinstance(value, tuple):
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return value


class HAProxy:
    """HAProxy running :func:`render_config`'s configuration in the foreground.

    The listening sockets are made here, on free ports of ``host`` (port 0), and
    handed to HAProxy (``bind fd@N``), so their ports are known before
    anything starts (e.g. for an issuer URL) and nobody can take them in
    between. :meth:`start` starts HAProxy in front of the given servers;
    :meth:`wait_until` polls the stats socket; :meth:`stop` stops it.
    """

    def __init__(
        self,
        listeners: Sequence[Listener],
        *,
        host: str = "127.0.0.1",
        program: str | None = None,
        work_dir: Path | None = None,
    ) -> None:
        program = program or find_haproxy()
        if program is None:
            raise FileNotFoundError("haproxy is not installed (apt-get install haproxy)")
        self.program = program
        self.listeners = {listener.name: listener for listener in listeners}
        self._own_dir = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="haproxy-")) if work_dir is None else work_dir
        self.config_path = self.work_dir / "haproxy.cfg"
        self.stats_socket = self.work_dir / "stats.sock"
        self.log_path = self.work_dir / "haproxy.log"
        self._sockets: dict[str, socket.socket] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            for name in self.listeners:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, 0))
                sock.listen(1024)
                self._sockets[name] = sock
        except BaseException:
            self.close_sockets()
            raise
        self.host = host

    def port(self, name: str) -> int:
        """The port of listener ``name`` (known before :meth:`start`)."""
        port: int = self._sockets[name].getsockname()[1]
        return port

    def address(self, name: str) -> str:
        """``host:port`` of listener ``name``."""
        return _address((self.host, self.port(name)))

    def start(
        self,
        servers: Mapping[str, Sequence[tuple[str, int] | str]],
        *,
        timeout_s: float = 30.0,
        wait_up: bool = True,
    ) -> HAProxy:
        """Start HAProxy with ``servers`` (per listener, its replicas' addresses).

        Waits (polling, up to ``timeout_s``) until the stats socket answers and,
        with ``wait_up``, until every server has passed its health check.
        """
        if set(servers) != set(self.listeners):
            raise ValueError(
                f"servers for {sorted(self.listeners)} expected, got {sorted(servers)}"
            )
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "HAPROXY_STATS_SOCKET": str(self.stats_socket)}
        for name, listener in self.listeners.items():
            addresses = list(servers[name])
            if len(addresses) != listener.servers:
                raise ValueError(f"{name}: {listener.servers} servers expected")
            env[listener.bind_var] = f"fd@{self._sockets[name].fileno()}"
            for number, addr in enumerate(addresses, start=1):
                env[listener.server_var(number)] = _address(addr)
        self.config_path.write_text(render_config(list(self.listeners.values())))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - the haproxy program, fixed arguments
                [self.program, "-db", "-f", str(self.config_path)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=[s.fileno() for s in self._sockets.values()],
            )
        try:
            deadline = time.monotonic() + timeout_s
            wanted = {
                (name, listener.server_name(n))
                for name, listener in self.listeners.items()
                for n in range(1, listener.servers + 1)
            }
            if wait_up:
                self.wait_until(lambda states: all(
                    states.get(key, ("", "")) in (("UP", "L7OK"), ("UP", "L6OK"), ("UP", "L4OK"))
                    for key in wanted
                ), deadline=deadline, what="every server UP")
            else:
                self.wait_until(lambda states: bool(states), deadline=deadline,
                                what="the stats socket")
        except BaseException:
            self.stop()
            raise
        return self

    def states(self) -> States:
        """``{(listener, server): (status, check_status)}`` from ``show stat``;
        e.g. ``("UP", "L7OK")``, ``("DOWN", "L7TOUT")``. Empty if HAProxy does not answer."""
        try:
            text = self.command("show stat")
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            # check_status starts with "* " while a check is running: the last result follows
            (row["pxname"], row["svname"]): (
                row.get("status", ""), row.get("check_status", "").removeprefix("* ")
            )
            for row in rows
            if row.get("svname") not in ("FRONTEND", "BACKEND")
        }

    def command(self, line: str, *, timeout_s: float = 5.0) -> str:
        """Send one command to the stats socket (``show stat``, ``disable server x/y``...)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def wait_until(
        self, condition: Callable[[States], bool], *, deadline: float, what: str
    ) -> None:
        """Poll :meth:`states` until ``condition(states)`` holds (``TimeoutError`` at
        ``deadline``; ``RuntimeError`` if HAProxy exited)."""
        states: States = {}
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"haproxy exited with status {self.proc.returncode}: {self.log_tail()}"
                )
            states = self.states()
            if condition(states):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"haproxy: waiting for {what}; states {states}; "
                                   f"log: {self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close()

    def stop(self) -> None:
        """Stop HAProxy (SIGUSR1 would wait for sessions: SIGTERM stops at once), close the
        listening sockets, remove the working directory if this object made it."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.close_sockets()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
