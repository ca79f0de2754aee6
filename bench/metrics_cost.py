"""Benchmark: what the metrics cost per call.

Usage: ``python -m bench.metrics_cost [--calls 20000] [--rounds 5] [--no-pin]``

1. In process: one call's counting (:meth:`CallCounts.record`: outcome count,
   latency bucket by ``bisect``, sum), against the same with
   ``prometheus_client``'s ``Counter.labels(...).inc()`` and
   ``Histogram.labels(...).observe()``; the verifier's cache-hit counter; and
   one scrape (``ServiceMetrics.render``) of a Posts-sized set of series.
2. Server CPU per call: two ``posts-rpc serve`` processes (local HS256
   verifier, cache on), one without metrics and one with ``--metrics-port 0``,
   each loaded in turn by this process over one connection with ``get_post``
   calls of one token (the cache-hit path, the cheapest call, where a fixed
   cost shows most). The server's user+sys CPU (``/proc``) over ``--calls``
   calls, per call; rounds alternate between the two servers; the median and
   the spread are printed. By default the servers are pinned to CPU 0 and this
   process to CPU 1.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from auth_rpc.auth.keys import SigningKey
from auth_rpc.idl import posts_thrift
from auth_rpc.serving.metrics import LATENCY_BUCKETS_S, CallCounts, ServiceMetrics
from auth_rpc.serving.transport import open_client
from auth_rpc.testing import TokenFactory
from bench.procs import cpu_seconds

METHODS = ("create_post", "get_post", "list_posts", "update_post", "delete_post")
OUTCOMES = ("ok", "Unauthenticated", "PermissionDenied", "InvalidArgument", "NotFound")


def _per_call_ns(stmt: str, setup_globals: dict[str, object], number: int = 200_000) -> float:
    timer = timeit.Timer(stmt, globals=setup_globals)
    return min(timer.repeat(repeat=5, number=number)) / number * 1e9


def in_process() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    counts = CallCounts()
    registry = CollectorRegistry()
    counter = Counter("c", "c", ["method", "outcome"], registry=registry)
    histogram = Histogram("h", "h", ["method"], buckets=LATENCY_BUCKETS_S, registry=registry)

    class Holder:
        cache_hits = 0

    holder = Holder()
    env = {"counts": counts, "counter": counter, "histogram": histogram, "holder": holder}
    ours = _per_call_ns('counts.record("get_post", "ok", 0.00042)', env)
    theirs = _per_call_ns(
        'counter.labels("get_post", "ok").inc(); histogram.labels("get_post").observe(0.00042)',
        env, number=50_000,
    )
    hit = _per_call_ns("holder.cache_hits += 1", env)
    print("per call, in process (best of 5):")
    print(f"  CallCounts.record (count + bucket + sum)      {ours:8.0f} ns")
    print(f"  prometheus_client labels().inc + observe      {theirs:8.0f} ns")
    print(f"  verifier cache-hit counter (attribute += 1)   {hit:8.0f} ns")

    metrics = ServiceMetrics()
    full = CallCounts()
    for method in METHODS:
        for outcome in OUTCOMES:
            full.record(method, outcome, 0.001)
    metrics.add_source(full.snapshot)
    started = time.perf_counter()
    rounds = 200
    for _ in range(rounds):
        text = metrics.render()
    took = (time.perf_counter() - started) / rounds
    print(f"  one scrape of {len(text.splitlines())} lines (render)         {took * 1e6:8.0f} µs")


def _serve(
    data: Path, secret: Path, metrics: bool, cpu: int | None
) -> tuple[subprocess.Popen[str], int]:
    cmd = [
        sys.executable, "-m", "posts_rpc.cli", "serve", "--data-dir", str(data), "--port", "0",
        "--verify", "local", "--hs256-secret-file", str(secret), "--issuer", "urn:bench",
        "--status-list", "off", "--log-level", "WARNING",
    ]
    if metrics:
        cmd += ["--metrics-port", "0"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"thrift=127\.0\.0\.1:(\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(match[1])


def server_cpu(calls: int, rounds: int, pin: bool) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu_id = cpus[0] if pin and len(cpus) > 1 else None
    if server_cpu_id is not None:
        os.sched_setaffinity(0, {cpus[1]})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        secret = work / "secret"
        secret.write_bytes(os.urandom(32))
        secret.chmod(0o600)
        factory = TokenFactory(
            key=SigningKey.hs256(secret.read_bytes()), issuer="urn:bench", audience="posts",
            scopes=("posts:read", "posts:write"),
        )
        token = factory.mint("alice", ttl_s=3600)
        servers = {}
        try:
            for label, on in (("off", False), ("on", True)):
                servers[label] = _serve(work / label, secret, on, server_cpu_id)
            clients = {}
            post_ids = {}
            for label, (_, port) in servers.items():
                client = open_client(posts_thrift.Posts, "127.0.0.1", port, timeout_s=30)
                clients[label] = client
                post_ids[label] = client.create_post(token, "bench", "body").id
                for _ in range(2000):  # warm-up
                    client.get_post(token, post_ids[label])
            results: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(rounds):
                for label in ("off", "on"):
                    proc, _ = servers[label]
                    client, post_id = clients[label], post_ids[label]
                    before = cpu_seconds(proc.pid)
                    for _ in range(calls):
                        client.get_post(token, post_id)
                    # The last reply is sent before its call is counted: let it finish.
                    time.sleep(0.05)
                    results[label].append((cpu_seconds(proc.pid) - before) / calls * 1e6)
            for client in clients.values():
                client.close()
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=30)
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(f"server CPU per get_post call (cache hit), {calls} calls x {rounds} rounds,"
          f" {'pinned' if server_cpu_id is not None else 'not pinned'}:")
    for label, values in results.items():
        print(f"  metrics {label:3}: median {statistics.median(values):6.1f} µs "
              f"(min {min(values):6.1f}, max {max(values):6.1f})")
    print(f"  difference: {on - off:+.1f} µs per call ({(on - off) / off * 100:+.1f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    in_process()
    server_cpu(args.calls, args.rounds, not args.no_pin)


if __name__ == "__main__":
    main()
