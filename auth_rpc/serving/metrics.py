"""Metrics: counted with plain integers on the hot path, exposed with ``prometheus_client``.

What each service counts (the names, types and labels are part of the
contract: docs/contract.md, "Metrics") is kept in ordinary Python objects
beside the code that counts: a listener's per-method outcome counts and
latency buckets (:class:`CallCounts`), a verifier's cache hits and refusals,
the HTTP app's requests. An increment is a dictionary or list item ``+= 1``
(about 0.1 µs; ``prometheus_client``'s ``labels(...).inc()`` costs 6.5 µs and
``Histogram.observe`` 3.7 µs), without a lock: under the GIL an increment of
an existing item runs between two of the interpreter's switch points (CPython
3.10 and later switch threads only at calls and backward jumps), so no update
is lost. New label values (a method's first call, an outcome's first time)
are added under a lock.

At scrape time :class:`ServiceMetrics` asks each *source* (a function
returning a :data:`Snapshot`) for its values and a ``prometheus_client``
collector turns them into metric families in the service's own
``CollectorRegistry`` (never the global one, so in-process test servers do
not collide), rendered by ``prometheus_client.generate_latest``.

Pre-forked workers (``--workers N``): each worker counts its own share, and
every worker publishes its snapshot (JSON, at most once a second, and at each
scrape it answers) into its slot of a :class:`SharedBoard`, an anonymous
shared memory block mapped before the fork. Whichever worker answers a scrape
reports the sum over every slot (its own share fresh, the others' at most a
second old), so a scrape always covers the whole service;
``metrics_worker_processes`` says how many processes it covers. A restarted
worker continues its predecessor's counters (it reads its slot first), so
counters never go back. Gauges are summed (open connections) or maximized
(status list age) over the workers.

Only fixed label values are ever exported: method names of the IDL, outcome
and exception names, reasons from fixed tables. Nothing a caller sends (a
user name, a token, an unknown method name, a path) becomes a label.
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
import threading
import time
import zlib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

__all__ = [
    "CONTENT_TYPE",
    "FAMILIES",
    "LATENCY_BUCKETS_S",
    "CallCounts",
    "Counts",
    "Family",
    "Histograms",
    "HttpCounts",
    "MetricsListener",
    "ServiceMetrics",
    "SharedBoard",
    "Snapshot",
    "metrics_app",
]

log = logging.getLogger("auth_rpc.serving.metrics")

#: The content type of a scrape's answer.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Upper bounds (seconds) of the latency histograms' buckets (``le``); +Inf follows.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: family name -> {label values (a tuple, in the family's label order) -> value}.
#: A histogram's value is its non-cumulative bucket counts (+Inf last) and then its sum.
Snapshot = dict[str, dict[tuple[str, ...], Any]]


@dataclass(frozen=True)
class Family:
    """What a metric family is: ``kind`` counter | gauge | histogram; how workers combine."""

    kind: str
    help: str
    labels: tuple[str, ...] = ()
    merge: str = "sum"  # gauges: "sum" or "max" over the workers


#: Every family a service may export. Counter names are given without ``_total``
#: (``prometheus_client`` appends it).
FAMILIES: dict[str, Family] = {
    "thrift_calls": Family(
        "counter", "Thrift calls served, by method and outcome (ok, the IDL exception's "
        "name, application_error, internal_error; +reply_failed when the reply was lost)",
        ("method", "outcome"),
    ),
    "thrift_call_duration_seconds": Family(
        "histogram", "Time from a call's decoded arguments to its reply sent", ("method",)
    ),
    "thrift_messages_refused": Family(
        "counter", "Thrift messages not run: unknown_method (also health checks), undecodable, "
        "wire_limit, busy", ("reason",),
    ),
    "thrift_connections": Family("counter", "Thrift connections accepted"),
    "thrift_connections_refused": Family(
        "counter", "Thrift connections refused or closed to make room: peer_limit, "
        "connection_limit, evicted_idle, no_thread", ("reason",),
    ),
    "thrift_connections_open": Family("gauge", "Thrift connections open now"),
    "token_cache_hits": Family("counter", "Token checks answered from the verified-token cache"),
    "token_cache_misses": Family("counter", "Token checks the cache could not answer"),
    "token_checks_refused": Family(
        "counter", "Access tokens refused, by reason (a fixed set)", ("reason",)
    ),
    "token_checks_unavailable": Family(
        "counter", "Token checks that could not be decided (a dependency down): refused closed"
    ),
    "token_status_list_age_seconds": Family(
        "gauge", "Time since the oldest Token Status List held was last confirmed by the "
        "issuer (calls fail closed past --status-max-age)", merge="max",
    ),
    "token_status_lists_held": Family("gauge", "Token Status Lists held", merge="max"),
    "http_requests": Family(
        "counter", "HTTP requests, by endpoint (other: no endpoint) and status code",
        ("endpoint", "status"),
    ),
    "http_request_duration_seconds": Family(
        "histogram", "Time to answer an HTTP request", ("endpoint",)
    ),
    "auth_throttled": Family(
        "counter", "Attempts refused by throttling: login_failures, login_concurrent, "
        "client_failures, client_concurrent, hashing_source_busy, hashing_busy", ("reason",),
    ),
    "metrics_worker_processes": Family(
        "gauge", "Processes whose counts this scrape adds up (--workers)"
    ),
}


class _MethodCounts:
    __slots__ = ("buckets", "outcomes", "sum_s")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum_s = 0.0


class Histograms:
    """Latency histograms keyed by one label value (a method, an endpoint): plain lists."""

    __slots__ = ("_lock", "by_key")

    def __init__(self) -> None:
        self.by_key: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def observe(self, key: str, seconds: float) -> None:
        row = self.by_key.get(key)
        if row is None:
            with self._lock:
                row = self.by_key.setdefault(key, [0] * (len(LATENCY_BUCKETS_S) + 2))
        row[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        row[-1] += seconds

    def snapshot(self) -> dict[tuple[str, ...], Any]:
        return {(key,): list(row) for key, row in list(self.by_key.items())}


class Counts:
    """Counters keyed by a tuple of label values; plain ints, new keys under a lock."""

    __slots__ = ("_lock", "by_key")

    def __init__(self) -> None:
        self.by_key: dict[Any, int] = {}
        self._lock = threading.Lock()

    def add(self, key: Any, n: int = 1) -> None:
        by_key = self.by_key
        try:
            by_key[key] += n
        except KeyError:
            with self._lock:
                by_key[key] = by_key.get(key, 0) + n

    def snapshot(self) -> dict[tuple[str, ...], Any]:
        return {
            (key if isinstance(key, tuple) else (key,)): n for key, n in list(self.by_key.items())
        }


class HttpCounts:
    """What an HTTP app counts: requests by endpoint and status, latency by endpoint.

    ``endpoint`` must come from a fixed set (the app's routes, ``other``).
    """

    __slots__ = ("latency", "requests")

    def __init__(self) -> None:
        self.requests = Counts()
        self.latency = Histograms()

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.add((endpoint, str(status)))
        self.latency.observe(endpoint, seconds)

    def snapshot(self) -> Snapshot:
        return {
            "http_requests": self.requests.snapshot(),
            "http_request_duration_seconds": self.latency.snapshot(),
        }


class CallCounts:
    """What one Thrift listener counts (:class:`auth_rpc.serving.rpc.RpcServer`).

    :meth:`record` runs once per call, in the access-log hook: the method's
    outcome count, a latency bucket found by ``bisect`` and the latency sum.
    ``method`` is always a method of the service (unknown ones are refused
    before a call starts) and ``outcome`` one of a fixed set.
    """

    __slots__ = ("_lock", "connections", "methods", "open", "refused", "refused_messages")

    def __init__(self) -> None:
        self.methods: dict[str, _MethodCounts] = {}
        self.refused_messages = Counts()
        self.refused = Counts()  # connections refused, by reason
        self.connections = 0  # accepted (under the listener's lock)
        self.open = 0  # open now (under the listener's lock)
        self._lock = threading.Lock()

    def record(self, method: str, outcome: str, seconds: float) -> None:
        counts = self.methods.get(method)
        if counts is None:
            with self._lock:
                counts = self.methods.setdefault(method, _MethodCounts())
        outcomes = counts.outcomes
        try:
            outcomes[outcome] += 1
        except KeyError:
            with self._lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
        counts.buckets[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        counts.sum_s += seconds

    def snapshot(self) -> Snapshot:
        calls: dict[tuple[str, ...], Any] = {}
        latency: dict[tuple[str, ...], Any] = {}
        for method, counts in list(self.methods.items()):
            calls[(method, "ok")] = 0
            for outcome, n in list(counts.outcomes.items()):
                calls[(method, outcome)] = n
            latency[(method,)] = [*counts.buckets, counts.sum_s]
        return {
            "thrift_calls": calls,
            "thrift_call_duration_seconds": latency,
            "thrift_messages_refused": self.refused_messages.snapshot(),
            "thrift_connections": {(): self.connections},
            "thrift_connections_refused": self.refused.snapshot(),
            "thrift_connections_open": {(): self.open},
        }


def merge(into: Snapshot, other: Snapshot, *, gauges: bool = True) -> Snapshot:
    """Add ``other`` to ``into`` (counters and histograms summed; gauges by their rule).

    ``gauges=False`` leaves ``other``'s gauges out (a restarted worker's
    predecessor: its connections are gone). Unknown families are ignored.
    """
    for name, series in other.items():
        family = FAMILIES.get(name)
        if family is None:
            continue
        if family.kind == "gauge" and not gauges:
            continue
        target = into.setdefault(name, {})
        for key, value in series.items():
            old = target.get(key)
            if old is None:
                target[key] = list(value) if isinstance(value, list) else value
            elif family.kind == "histogram":
                target[key] = [a + b for a, b in zip(old, value, strict=True)]
            elif family.kind == "gauge" and family.merge == "max":
                target[key] = max(old, value)
            else:
                target[key] = old + value
    return into


def _encode(snapshot: Snapshot) -> bytes:
    rows = {name: [[*key, value] for key, value in series.items()]
            for name, series in snapshot.items()}
    return json.dumps(rows, separators=(",", ":")).encode()


def _decode(data: bytes) -> Snapshot:
    raw = json.loads(data)
    out: Snapshot = {}
    for name, rows in raw.items():
        family = FAMILIES.get(name)
        if family is None:
            continue
        width = len(family.labels)
        out[name] = {tuple(row[:width]): row[width] for row in rows if len(row) == width + 1}
    return out


class SharedBoard:
    """Snapshots of pre-forked workers in an anonymous shared memory block, a slot each.

    Made before the fork (the mapping is shared with every child). A slot
    holds a header (a sequence number, odd while a write is in progress; the
    length; a CRC-32) and the snapshot's JSON. Each worker writes only its own
    slot; any process reads every slot, retrying a read that races a write.
    """

    _HEADER = struct.Struct("=QQI")

    def __init__(self, slots: int, *, slot_bytes: int = 256 * 1024) -> None:
        if slots < 1 or slot_bytes <= self._HEADER.size:
            raise ValueError("a board needs at least one slot of some bytes")
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._map = mmap.mmap(-1, slots * slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS
        self._write_lock = threading.Lock()
        self._too_big_logged = False

    def write(self, slot: int, snapshot: Snapshot) -> None:
        data = _encode(snapshot)
        room = self.slot_bytes - self._HEADER.size
        if len(data) > room:
            if not self._too_big_logged:
                self._too_big_logged = True
                log.error("metrics snapshot of %d bytes does not fit its slot", len(data))
            return
        base = slot * self.slot_bytes
        with self._write_lock:
            seq = self._HEADER.unpack_from(self._map, base)[0]
            seq += 1 if seq % 2 == 0 else 0
            self._HEADER.pack_into(self._map, base, seq, 0, 0)  # odd: being written
            start = base + self._HEADER.size
            self._map[start : start + len(data)] = data
            self._HEADER.pack_into(self._map, base, seq + 1, len(data), zlib.crc32(data))

    def read(self, slot: int) -> Snapshot | None:
        """The slot's snapshot; ``None`` if it never was written (or stays torn)."""
        base = slot * self.slot_bytes
        for _ in range(100):
            seq, length, crc = self._HEADER.unpack_from(self._map, base)
            if seq == 0:
                return None
            if seq % 2 == 0 and 0 < length <= self.slot_bytes - self._HEADER.size:
                start = base + self._HEADER.size
                data = bytes(self._map[start : start + length])
                if self._HEADER.unpack_from(self._map, base)[0] == seq and zlib.crc32(data) == crc:
                    try:
                        return _decode(data)
                    except (ValueError, TypeError, AttributeError):
                        return None
            time.sleep(0.0005)
        return None

    def close(self) -> None:
        self._map.close()


class _Collector:
    """The ``prometheus_client`` collector of a :class:`ServiceMetrics` (families at scrape)."""

    def __init__(self, owner: ServiceMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        snapshot = self._owner.scrape_snapshot()
        for name, family in FAMILIES.items():
            series = snapshot.get(name)
            if series is None:
                continue
            yield _family(name, family, series)


def _family(name: str, family: Family, series: dict[tuple[str, ...], Any]) -> Metric:
    labels = list(family.labels)
    rows = sorted(series.items())
    if family.kind == "counter":
        counter = CounterMetricFamily(name, family.help, labels=labels)
        for key, value in rows:
            counter.add_metric(list(key), value)
        return counter
    if family.kind == "gauge":
        gauge = GaugeMetricFamily(name, family.help, labels=labels)
        for key, value in rows:
            gauge.add_metric(list(key), value)
        return gauge
    histogram = HistogramMetricFamily(name, family.help, labels=labels)
    for key, value in rows:
        counts, total = value[:-1], value[-1]
        cumulative, buckets = 0, []
        for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        histogram.add_metric(list(key), buckets, total)
    return histogram


class ServiceMetrics:
    """The metrics of one service instance: its sources, its registry, its exposition.

    ``add_source(fn)``: ``fn()`` returns a :data:`Snapshot` at each scrape
    (it must not block). :meth:`render` gives the text exposition format.
    With a :class:`SharedBoard` and ``slot`` (a pre-forked worker), the
    scrape covers every worker (module docstring) and :meth:`start_publishing`
    keeps this worker's slot at most ``interval_s`` old.
    """

    def __init__(self, *, board: SharedBoard | None = None, slot: int = 0) -> None:
        if board is not None and not 0 <= slot < board.slots:
            raise ValueError("slot out of range")
        self.registry = CollectorRegistry(auto_describe=False)
        self._sources: list[Callable[[], Snapshot]] = []
        self._board = board
        self._slot = slot
        # A restarted worker continues the counters of the one it replaces.
        self._base: Snapshot = {}
        if board is not None:
            previous = board.read(slot)
            if previous is not None:
                merge(self._base, previous, gauges=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._publish_lock = threading.Lock()
        self.registry.register(_Collector(self))

    def add_source(self, source: Callable[[], Snapshot]) -> None:
        self._sources.append(source)

    def local_snapshot(self) -> Snapshot:
        """This process's counts (with a restarted worker's inheritance)."""
        out: Snapshot = {}
        merge(out, self._base)
        for source in list(self._sources):
            try:
                merge(out, source())
            except Exception:  # a failing source must not fail the scrape of the others
                log.exception("a metrics source failed")
        return out

    def publish(self) -> Snapshot:
        """Write this worker's snapshot to its slot (no-op without a board); returns it."""
        snapshot = self.local_snapshot()
        if self._board is not None:
            with self._publish_lock:
                self._board.write(self._slot, snapshot)
        return snapshot

    def scrape_snapshot(self) -> Snapshot:
        """What a scrape reports: this process's counts, or every worker's summed."""
        own = self.publish()
        board = self._board
        processes = 1
        if board is not None:
            total: Snapshot = {}
            processes = 0
            for slot in range(board.slots):
                found = own if slot == self._slot else board.read(slot)
                if found is not None:
                    merge(total, found)
                    processes += 1
            own = total
        own["metrics_worker_processes"] = {(): processes}
        return own

    def render(self) -> bytes:
        """The text exposition format (``prometheus_client.generate_latest``)."""
        return generate_latest(self.registry)

    def start_publishing(self, interval_s: float = 1.0) -> None:
        """Publish this worker's snapshot every ``interval_s`` from a thread (with a board)."""
        if self._board is None or self._thread is not None:
            return
        self.publish()  # at once: a restarted worker replaces its predecessor's gauges

        def run() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.publish()
                except Exception:
                    log.exception("publishing metrics failed")

        self._thread = threading.Thread(target=run, name="metrics-publish", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing, after a last publication (a stopping worker's final counts)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._board is not None:
            try:
                self.publish()
            except Exception:
                log.exception("publishing metrics failed")


def metrics_app(metrics: ServiceMetrics) -> Callable[..., Iterable[bytes]]:
    """A WSGI app answering ``GET /metrics`` (and ``HEAD``) with the exposition; 404 else."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Sequence[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain"),
                                             ("Content-Length", "10")])
            return [b"not found\n"]
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"),
                                                      ("Content-Length", "0")])
            return [b""]
        body = metrics.render()
        start_response("200 OK", [
            ("Content-Type", CONTENT_TYPE),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ])
        return [b""] if method == "HEAD" else [body]

    return app


class MetricsListener:
    """``GET /metrics`` on a listening socket of its own (``posts-rpc serve --metrics-port``).

    Plain HTTP served by waitress (:class:`~auth_rpc.serving.httpd.HttpServer`,
    with small limits) from a background thread. It answers anyone who can
    connect: bind it to an address only the monitoring system reaches.
    """

    def __init__(self, metrics: ServiceMetrics, sock: Any) -> None:
        from auth_rpc.serving.httpd import HttpLimits, HttpServer

        self.port = int(sock.getsockname()[1])
        self._server = HttpServer(
            metrics_app(metrics),
            sock=sock,
            public=(str(sock.getsockname()[0]), self.port),
            threads=2,
            limits=HttpLimits(connection_limit=64, per_peer_limit=16),
        )
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> MetricsListener:
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._server.run()
        except OSError:
            if not self._closing:
                log.exception("metrics listener stopped")

    def stop(self) -> None:
        self._closing = True
        self._server.close()
        if self._thread is not None:
            self._thread.join(10)
