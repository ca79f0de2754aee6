"""Bounded connections, timeouts, and graceful shutdown."""

from __future__ import annotations

import os
import resource
import socket
import statistics
import threading
import time
from typing import Any

import pytest
from thriftpy2.transport import TTransportException


def closed_within(wire: Any, sock: socket.socket, timeout_s: float) -> float:
    """Seconds until the server closed ``sock`` (fails after ``timeout_s``)."""
    sock.settimeout(timeout_s)
    started = time.monotonic()
    assert wire.read_until_closed(sock) == b""
    return time.monotonic() - started


class Dripper(threading.Thread):
    """Sends a valid call one byte at a time, every ``interval_s``, until cut off."""

    def __init__(self, wire: Any, server: Any, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.sock = wire.raw_connect(server)
        self.payload = wire.encode_call("echo", wire.echo_thrift.Echo.echo_args(text="x" * 200))
        self.interval_s = interval_s
        self.sent = 0
        self.cut_after_s: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        try:
            for byte in self.payload:
                self.sock.sendall(bytes([byte]))
                self.sent += 1
                if self._halt.wait(self.interval_s):
                    return
                # Closed by the server? (recv of 0 bytes, or a reset.)
                self.sock.setblocking(False)
                try:
                    if self.sock.recv(1) == b"":
                        break
                except BlockingIOError:
                    pass
                finally:
                    self.sock.setblocking(True)
        except OSError:
            pass
        self.cut_after_s = time.monotonic() - started

    def close(self) -> None:
        self._halt.set()
        self.join(5)
        self.sock.close()


def test_slow_drip_client_is_cut_at_the_message_deadline(wire: Any, make_server: Any) -> None:
    server = make_server(message_read_timeout_s=0.5, idle_timeout_s=30)
    dripper = Dripper(wire, server, interval_s=0.05)
    dripper.start()
    dripper.join(5)
    try:
        assert dripper.cut_after_s is not None
        print(f"\nslow drip cut after {dripper.cut_after_s:.2f} s, {dripper.sent} bytes sent")
        assert 0.4 <= dripper.cut_after_s < 3.0
        assert dripper.sent < len(dripper.payload)
    finally:
        dripper.close()


def test_idle_connection_is_closed_after_the_idle_timeout(wire: Any, make_server: Any) -> None:
    server = make_server(idle_timeout_s=0.3)
    sock = wire.raw_connect(server)
    try:
        sock.sendall(wire.encode_call("add", wire.echo_thrift.Echo.add_args(a=1, b=1)))
        assert sock.recv(1000)
        elapsed = closed_within(wire, sock, 5.0)
        assert 0.2 <= elapsed < 3.0
    finally:
        sock.close()
    assert wire.wait_for(lambda: server.connection_count == 0)


def test_connection_limit_refuses_extra_connections(wire: Any, make_server: Any) -> None:
    server = make_server(max_connections=3)
    clients = [wire.client_of(server) for _ in range(3)]
    try:
        for client in clients:
            assert client.add(1, 2) == 3
        assert server.connection_count == 3
        extra = wire.raw_connect(server)
        try:
            closed_within(wire, extra, 2.0)
        finally:
            extra.close()
        clients.pop().close()
        assert wire.wait_for(lambda: server.connection_count == 2)
        clients.append(wire.client_of(server))
        assert clients[-1].echo("room again") == "room again"
    finally:
        for client in clients:
            client.close()


def _raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def test_thousand_idle_and_slow_drip_clients_do_not_starve_a_normal_one(
    wire: Any, make_server: Any
) -> None:
    idle_count = 1000
    _raise_nofile(2 * idle_count + 512)
    threads_before = threading.active_count()
    server = make_server(max_connections=idle_count + 50, message_read_timeout_s=30)
    idle: list[socket.socket] = []
    drippers: list[Dripper] = []
    client = None
    try:
        started = time.monotonic()
        for _ in range(idle_count):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        assert wire.wait_for(lambda: server.connection_count >= idle_count, 20)
        opened_s = time.monotonic() - started
        drippers = [Dripper(wire, server, interval_s=0.2) for _ in range(5)]
        for dripper in drippers:
            dripper.start()
        client = wire.client_of(server)
        latencies = []
        for i in range(300):
            t0 = time.perf_counter()
            assert client.add(i, 1) == i + 1
            latencies.append(time.perf_counter() - t0)
        latencies.sort()
        median = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99)]
        print(
            f"\n{idle_count} idle connections opened and served in {opened_s:.2f} s "
            f"({threading.active_count() - threads_before} threads); normal client "
            f"300 calls: median {median * 1000:.3f} ms, p99 {p99 * 1000:.3f} ms, "
            f"max {latencies[-1] * 1000:.3f} ms"
        )
        assert latencies[-1] < 0.5
    finally:
        for dripper in drippers:
            dripper.close()
        for sock in idle:
            sock.close()
        if client is not None:
            client.close()
    assert wire.wait_for(lambda: server.connection_count == 0, 20)
    assert wire.wait_for(lambda: threading.active_count() <= threads_before + 1, 20)


def test_graceful_stop_finishes_calls_in_flight(wire: Any, make_server: Any, handler: Any) -> None:
    server = make_server()
    busy = wire.client_of(server)
    idle = wire.raw_connect(server)
    idle.sendall(wire.encode_call("add", wire.echo_thrift.Echo.add_args(a=1, b=1)))
    assert idle.recv(1000)
    replies: list[str] = []
    caller = threading.Thread(target=lambda: replies.append(busy.hold("in flight")))
    caller.start()
    assert handler.entered.wait(5)

    stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 10.0})
    stop_started = time.monotonic()
    stopper.start()

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):
            return True  # reset: it reached the backlog just as the listener shut
        return False

    try:
        assert wire.wait_for(refused, 5), "new connections still accepted during stop"
        # The idle connection is closed at once; the busy one is not.
        assert closed_within(wire, idle, 5.0) < 5.0
        assert stopper.is_alive()
        handler.release.set()
        caller.join(5)
        stopper.join(10)
        assert replies == ["in flight"]
        assert not stopper.is_alive()
        print(f"\nstop() returned {time.monotonic() - stop_started:.3f} s after it began")
        assert server.connection_count == 0
    finally:
        handler.release.set()
        idle.close()
        busy.close()


def test_stop_cuts_calls_still_running_after_the_grace_period(
    wire: Any, make_server: Any, handler: Any
) -> None:
    server = make_server()
    busy = wire.client_of(server)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            busy.hold("too slow")
        except (TTransportException, OSError) as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    try:
        assert handler.entered.wait(5)
        started = time.monotonic()
        stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 0.2})
        stopper.start()
        # After the grace period the connection is cut: the client sees it at once,
        # while the handler (a thread cannot be killed) still runs.
        assert wire.wait_for(lambda: bool(errors), 5)
        cut_after = time.monotonic() - started
        assert stopper.is_alive()
        handler.release.set()
        stopper.join(5)
        caller.join(5)
        assert not stopper.is_alive()
        print(f"\ncall cut {cut_after:.3f} s after stop(grace_s=0.2) began")
        assert 0.15 <= cut_after < 3.0
        assert len(errors) == 1
    finally:
        handler.release.set()
        busy.close()


def test_threads_and_file_descriptors_return_to_baseline(wire: Any, make_server: Any) -> None:
    server = make_server()
    threads_before = threading.active_count()
    fds_before = len(os.listdir("/proc/self/fd"))
    clients = [wire.client_of(server) for _ in range(50)]
    for client in clients:
        assert client.add(1, 1) == 2
    for client in clients:
        client.close()
    assert wire.wait_for(lambda: server.connection_count == 0)
    assert wire.wait_for(lambda: threading.active_count() == threads_before)
    assert wire.wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds_before)
