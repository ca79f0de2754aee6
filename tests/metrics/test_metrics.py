"""Metrics (Prometheus text format), scraped and parsed with prometheus_client's own parser.

Through the real entry points: the Auth service's HTTP port (``GET /metrics``),
an in-process Posts server with metrics, and ``posts-rpc serve --metrics-port``
as a process (one worker and pre-forked workers, whose shares must add up).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from auth_rpc.auth.keys import SigningKey
from auth_rpc.auth.server import AuthServer
from auth_rpc.idl import auth_thrift, common_thrift, posts_thrift
from auth_rpc.serving.metrics import (
    CONTENT_TYPE,
    LATENCY_BUCKETS_S,
    CallCounts,
    ServiceMetrics,
    SharedBoard,
)
from auth_rpc.serving.transport import open_client
from auth_rpc.testing import TokenFactory
from auth_rpc.verify.counts import REASONS, refusal_reason

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (sample name, labels); the parser refuses bad text."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def scrape(url: str) -> Samples:
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == CONTENT_TYPE
    return parse(resp.text)


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.05)


def settled(render: Callable[[], str], calls: float) -> Samples:
    """A scrape once ``calls`` calls are counted: a call is counted just after its reply
    is sent, so the client may see the reply before the count."""
    samples: Samples = {}

    def counted() -> bool:
        nonlocal samples
        samples = parse(render())
        return total(samples, "thrift_calls_total") >= calls

    _wait_for(counted, f"{calls} calls counted", timeout_s=10)
    return samples


# -- the Posts service in-process ---------------------------------------------------


def test_posts_calls_by_method_and_outcome_cache_and_refusals(
    make_posts_server: Callable[..., Any], token_factory: TokenFactory
) -> None:
    server = make_posts_server("jwks", metrics=True)
    token = token_factory.mint("alice", ("posts:read", "posts:write"))
    client = open_client(posts_thrift.Posts, "127.0.0.1", server.port)
    try:
        post = client.create_post(token, "counted", "")
        assert client.get_post(token, post.id) == post
        with pytest.raises(common_thrift.NotFound):
            client.get_post(token, post.id + 1000)
        with pytest.raises(common_thrift.Unauthenticated):
            client.list_posts("not-a-token", 0, 0)
        with pytest.raises(common_thrift.Unauthenticated):
            client.list_posts("", 0, 0)
        with pytest.raises(common_thrift.Unauthenticated):
            client.list_posts(token_factory.expired("alice", ("posts:read",)), 0, 0)
        with pytest.raises(common_thrift.Unauthenticated):
            client.list_posts(token_factory.forged("alice", ("posts:read",)), 0, 0)
        samples = settled(lambda: server.metrics.render().decode(), 7)
    finally:
        client.close()

    calls = "thrift_calls_total"
    assert value(samples, calls, method="create_post", outcome="ok") == 1
    assert value(samples, calls, method="get_post", outcome="ok") == 1
    assert value(samples, calls, method="get_post", outcome="NotFound") == 1
    assert value(samples, calls, method="list_posts", outcome="Unauthenticated") == 4
    assert total(samples, calls) == 7
    # The latency histogram: one observation per call, cumulative buckets ending at +Inf.
    count = "thrift_call_duration_seconds_count"
    assert value(samples, count, method="get_post") == 2
    assert value(samples, "thrift_call_duration_seconds_bucket", method="get_post", le="+Inf") == 2
    assert value(samples, "thrift_call_duration_seconds_sum", method="get_post") > 0
    # The same token three times: one miss, then hits (the forged one missed too).
    assert value(samples, "token_cache_hits_total") == 2
    assert value(samples, "token_cache_misses_total") >= 2
    refused = "token_checks_refused_total"
    assert value(samples, refused, reason="malformed") == 1
    assert value(samples, refused, reason="missing") == 1
    assert value(samples, refused, reason="expired") == 1
    assert value(samples, refused, reason="signature") == 1
    # Connections: one accepted, open while the client was.
    assert value(samples, "thrift_connections_total") == 1
    assert value(samples, "thrift_connections_open") == 1
    # The status list the verifier fetched for the token (jwks mode): its age.
    assert value(samples, "token_status_lists_held") == 1
    assert 0 <= value(samples, "token_status_list_age_seconds") < 60
    assert value(samples, "metrics_worker_processes") == 1


def test_posts_without_metrics_counts_nothing(
    make_posts_server: Callable[..., Any], token_factory: TokenFactory
) -> None:
    server = make_posts_server("jwks")
    assert server.metrics is None
    assert server.rpc.counts is None
    assert server.rpc.metrics_snapshot() == {}


def test_refused_connections_and_messages_are_counted(
    make_posts_server: Callable[..., Any],
) -> None:
    from auth_rpc.serving.rpc import ServerSettings

    server = make_posts_server("jwks", metrics=True,
                               settings=ServerSettings(max_connections_per_peer=1))
    first = open_client(posts_thrift.Posts, "127.0.0.1", server.port)
    try:
        # A health check (an undeclared method) and a second connection over the cap.
        reply = _raw_call(server.port, "__health_check__")
        assert reply  # answered (UNKNOWN_METHOD), not counted as a call
        samples = parse(server.metrics.render().decode())
    finally:
        first.close()
    assert value(samples, "thrift_connections_refused_total", reason="peer_limit") >= 1
    assert value(samples, "thrift_messages_refused_total", reason="unknown_method") == 0
    assert total(samples, "thrift_calls_total") == 0


def _call_bytes(method: str) -> bytes:
    """A strict binary-protocol CALL of ``method`` without arguments."""
    name = method.encode()
    return struct.pack("!iI", -2147418111, len(name)) + name + struct.pack("!i", 1) + b"\x00"


def _raw_call(port: int, method: str) -> bytes:
    """Send one call of ``method`` on a new connection; return what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_call_bytes(method))
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_unknown_methods_are_counted_without_their_names(
    make_posts_server: Callable[..., Any],
) -> None:
    server = make_posts_server("jwks", metrics=True)
    assert _raw_call(server.port, "__health_check__")
    assert _raw_call(server.port, "secret_method_NAME_7f3a")
    text = server.metrics.render().decode()
    samples = parse(text)
    assert value(samples, "thrift_messages_refused_total", reason="unknown_method") == 2
    assert "secret_method" not in text and "__health_check__" not in text
    assert total(samples, "thrift_calls_total") == 0


# -- the Auth service's HTTP port ---------------------------------------------------


def test_auth_metrics_endpoint(
    auth_server: AuthServer, auth_client: Any, make_user: Callable[..., None]
) -> None:
    make_user("carol", "a long password")
    pair = auth_client.login("carol", "a long password", "")
    with pytest.raises(common_thrift.Unauthenticated):
        auth_client.login("carol", "not the password", "")
    assert auth_client.validate(pair.access_token).subject == "carol"
    with pytest.raises(common_thrift.Unauthenticated):
        auth_client.validate(pair.access_token[:-4] + "AAAA")  # the signature spoilt
    auth_client.revoke(pair.access_token)
    with pytest.raises(common_thrift.Unauthenticated):
        auth_client.validate(pair.access_token)
    # Throttling: failures of one name past the limit (5) are refused without a check.
    for _ in range(6):
        with pytest.raises((common_thrift.Unauthenticated, common_thrift.RateLimited)):
            auth_client.login("carol", "still not it", "")
    resp = requests.post(
        f"{auth_server.http_url}/token",
        data={"grant_type": "password", "username": "carol", "password": "x"},
        timeout=10,
    )
    assert resp.status_code in (400, 429)
    assert requests.get(f"{auth_server.http_url}/statuslists/987654", timeout=10).status_code == 404

    samples = settled(lambda: requests.get(auth_server.metrics_url, timeout=10).text, 12)
    calls = "thrift_calls_total"
    assert value(samples, calls, method="login", outcome="ok") == 1
    assert value(samples, calls, method="validate", outcome="ok") == 1
    assert value(samples, calls, method="validate", outcome="Unauthenticated") == 2
    assert value(samples, calls, method="revoke", outcome="ok") == 1
    assert value(samples, calls, method="login", outcome="RateLimited") >= 1
    refused = "token_checks_refused_total"
    assert value(samples, refused, reason="signature") == 1
    assert value(samples, refused, reason="revoked") == 1
    assert value(samples, "auth_throttled_total", reason="login_failures") >= 2
    requests_ = "http_requests_total"
    assert value(samples, requests_, endpoint="/token", status=str(resp.status_code)) == 1
    assert value(samples, requests_, endpoint="/statuslists/{id}", status="404") == 1
    assert value(samples, "http_request_duration_seconds_count", endpoint="/token") == 1
    # The scrape itself is counted once answered: the next scrape shows it.
    again = scrape(auth_server.metrics_url)
    assert value(again, requests_, endpoint="/metrics", status="200") >= 1


def test_auth_without_metrics(make_auth_server: Callable[..., AuthServer]) -> None:
    server = make_auth_server(metrics=False)
    resp = requests.get(server.metrics_url, timeout=10)
    assert resp.status_code == 404


def test_scrapes_never_show_user_names_tokens_or_paths(
    auth_server: AuthServer,
    auth_client: Any,
    make_user: Callable[..., None],
    make_posts_server: Callable[..., Any],
    token_factory: TokenFactory,
) -> None:
    """An attacker's inputs (names, passwords, tokens, paths, method names) never reach a scrape."""
    marker = "Zq9SECRETxk"
    name = f"user.{marker}.name"
    password = f"pass {marker} word"
    make_user(name, password)
    pair = auth_client.login(name, password, "")
    secrets_seen = [marker, name, password, pair.access_token, pair.refresh_token]
    # Unknown names, wrong passwords, garbage and real tokens, over Thrift and HTTP.
    for attempt in range(3):
        with pytest.raises((common_thrift.Unauthenticated, common_thrift.RateLimited,
                            common_thrift.InvalidArgument)):
            auth_client.login(f"nobody{attempt}{marker}", f"{marker}-{attempt}", "")
    bad_token = f"eyJ{marker}.eyJ{marker}.{marker}"
    with pytest.raises(common_thrift.Unauthenticated):
        auth_client.validate(bad_token)
    forged = token_factory.forged(name, ("posts:read",))
    secrets_seen.append(forged)
    with pytest.raises(common_thrift.Unauthenticated):
        auth_client.validate(forged)
    http = auth_server.http_url
    requests.post(f"{http}/token", data={"grant_type": "password", "username": name,
                                         "password": password}, timeout=10)
    requests.post(f"{http}/token", data={"grant_type": "refresh_token",
                                         "refresh_token": pair.refresh_token}, timeout=10)
    requests.get(f"{http}/{marker}/{pair.access_token}", timeout=10)
    requests.get(f"{http}/statuslists/{marker}", timeout=10)
    requests.get(f"{http}/metrics?{marker}={pair.access_token}", timeout=10)
    requests.get(f"{http}/metrics", headers={"Authorization": f"Bearer {pair.access_token}"},
                 timeout=10)
    _raw_call(auth_server.port, f"m_{marker}")

    posts = make_posts_server("jwks", metrics=True)
    client = open_client(posts_thrift.Posts, "127.0.0.1", posts.port)
    try:
        user_token = token_factory.mint(name, ("posts:read", "posts:write"))
        secrets_seen.append(user_token)
        client.create_post(user_token, f"title {marker}", f"body {marker}")
        for token in (bad_token, forged, user_token + marker):
            with pytest.raises(common_thrift.Unauthenticated):
                client.list_posts(token, 0, 0)
    finally:
        client.close()
    _raw_call(posts.port, f"m_{marker}")

    texts = [requests.get(auth_server.metrics_url, timeout=10).text,
             posts.metrics.render().decode()]
    for text in texts:
        parse(text)  # well formed
        for secret in secrets_seen:
            assert secret not in text
        assert marker.lower() not in text.lower()


# -- counting: exact under threads; refusal reasons a fixed set ---------------------


def test_counts_lose_nothing_under_threads() -> None:
    counts = CallCounts()
    per_thread, threads = 20_000, 8

    def work() -> None:
        for i in range(per_thread):
            counts.record("get_post", "ok" if i % 2 else "NotFound", 0.001)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    snap = counts.snapshot()
    calls = snap["thrift_calls"]
    assert calls[("get_post", "ok")] + calls[("get_post", "NotFound")] == per_thread * threads
    histogram = snap["thrift_call_duration_seconds"][("get_post",)]
    assert sum(histogram[:-1]) == per_thread * threads
    assert histogram[LATENCY_BUCKETS_S.index(0.001)] == per_thread * threads


def test_refusal_reasons_are_a_fixed_set() -> None:
    assert refusal_reason("token expired") == "expired"
    assert refusal_reason("invalid exp claim") == "claims"
    assert refusal_reason("token lacks the jti claim") == "claims"
    # Anything else (a remote verifier's message) is "other", never the text itself.
    assert refusal_reason("alice's token eyJhbGciOi is bad") == "other"
    for message in ("missing token", "token revoked", "wrong audience", "x" * 100):
        assert refusal_reason(message) in REASONS


# -- pre-forked workers: a scrape covers every worker -------------------------------


def test_board_adds_up_workers_and_a_restart_continues() -> None:
    board = SharedBoard(2)
    try:
        counts = [CallCounts(), CallCounts()]
        workers = [ServiceMetrics(board=board, slot=i) for i in range(2)]
        for metrics, c in zip(workers, counts, strict=True):
            metrics.add_source(c.snapshot)
        counts[0].record("get_post", "ok", 0.002)
        counts[1].record("get_post", "ok", 0.002)
        counts[1].record("get_post", "ok", 0.002)
        workers[1].publish()
        samples = parse(workers[0].render().decode())
        assert value(samples, "thrift_calls_total", method="get_post", outcome="ok") == 3
        assert value(samples, "metrics_worker_processes") == 2
        # Worker 1 dies and is replaced: its counts continue, they never go back.
        replacement = ServiceMetrics(board=board, slot=1)
        fresh = CallCounts()
        replacement.add_source(fresh.snapshot)
        fresh.record("get_post", "ok", 0.002)
        samples = parse(replacement.render().decode())
        assert value(samples, "thrift_calls_total", method="get_post", outcome="ok") == 4
    finally:
        board.close()


@contextlib.contextmanager
def _serve(*args: str, log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert proc.stdout is not None
            yield proc, proc.stdout.readline()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)


@pytest.mark.parametrize("workers", [1, 3])
def test_posts_rpc_serve_metrics_port(tmp_path: Path, workers: int) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    factory = TokenFactory(
        key=SigningKey.hs256(secret.read_bytes()), issuer="urn:t", audience="posts",
        scopes=("posts:read", "posts:write"),
    )
    with _serve(
        "posts_rpc.cli", "serve", "--data-dir", str(tmp_path / "posts"), "--port", "0",
        "--verify", "local", "--hs256-secret-file", str(secret), "--issuer", "urn:t",
        "--status-list", "off", "--workers", str(workers), "--metrics-port", "0",
        "--log-level", "WARNING", log=tmp_path / "stderr",
    ) as (proc, ready):
        match = re.search(r"thrift=127\.0\.0\.1:(\d+) .* metrics=(http://127\.0\.0\.1:\d+/metrics)",
                          ready)
        assert match, ready
        port, url = int(match[1]), match[2]
        token = factory.mint("alice")
        # Calls on many connections: with workers, the kernel spreads them.
        clients = [open_client(posts_thrift.Posts, "127.0.0.1", port) for _ in range(12)]
        try:
            for c in clients:
                c.create_post(token, "t", "")
                with pytest.raises(common_thrift.Unauthenticated):
                    c.list_posts("garbage", 0, 0)
        finally:
            for c in clients:
                c.close()
        # Other workers publish at least once a second: poll until every share is in.
        def complete() -> bool:
            s = scrape(url)
            return (
                value(s, "metrics_worker_processes") == workers
                and value(s, "thrift_calls_total", method="create_post", outcome="ok") == 12
                and value(s, "token_checks_refused_total", reason="malformed") == 12
            )

        _wait_for(complete, "every worker's share in a scrape")
        samples = scrape(url)
        assert value(samples, "thrift_calls_total", method="list_posts",
                     outcome="Unauthenticated") == 12
        assert value(samples, "thrift_connections_total") == 12
        # Every check is a hit or a miss; the token repeated hits in the worker that knows it.
        hits = value(samples, "token_cache_hits_total")
        assert hits + value(samples, "token_cache_misses_total") == 24
        assert hits >= 12 - workers
        assert requests.get(url.replace("/metrics", "/other"), timeout=10).status_code == 404
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 0, (tmp_path / "stderr").read_text()


def test_auth_rpc_serve_workers_metrics(tmp_path: Path) -> None:
    data = tmp_path / "auth"
    subprocess.run(
        [sys.executable, "-m", "auth_rpc.auth.cli", "add-user", "alice", "--data-dir", str(data),
         "--password-stdin"],
        input="a long password\n", text=True, check=True, capture_output=True,
    )
    with _serve(
        "auth_rpc.auth.cli", "serve", "--data-dir", str(data), "--port", "0", "--http-port", "0",
        "--workers", "2", "--log-level", "WARNING", log=tmp_path / "stderr",
    ) as (_, ready):
        match = re.search(r"thrift=[\d.]+:(\d+) http=(\S+)", ready)
        assert match, ready
        for _ in range(6):
            client = open_client(auth_thrift.Auth, "127.0.0.1", int(match[1]))
            try:
                with pytest.raises(common_thrift.Unauthenticated):
                    client.validate("garbage")
            finally:
                client.close()
        url = f"{match[2]}/metrics"

        def complete() -> bool:
            s = scrape(url)
            return (
                value(s, "metrics_worker_processes") == 2
                and value(s, "thrift_calls_total", method="validate",
                          outcome="Unauthenticated") == 6
            )

        _wait_for(complete, "both workers' shares in a scrape")
        samples = scrape(url)
        assert value(samples, "token_checks_refused_total", reason="malformed") == 6
