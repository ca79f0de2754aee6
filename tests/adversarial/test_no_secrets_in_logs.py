"""Logs: one structured access line per call, and never a secret.

A representative session runs against in-process servers with EVERY logger
captured at DEBUG (the root logger and ``auth_rpc.access``): logins (good,
wrong password, unknown user), refresh (and a reuse), client credentials
(good and wrong secret), validate, revoke, jwks; Posts calls with good,
garbage, expired and revoked tokens in the thrift, introspect and local
modes; and the HTTP endpoints ``/token`` (all three grants), ``/introspect``,
``/revoke``, JWKS and ``/healthz`` through ``requests``.

Then every captured record - message with its arguments, exception text and
stack - is searched for each password, client secret, access token, refresh
token, any 20-character piece of a token's signature, and the private key.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from auth_rpc.idl import auth_thrift, common_thrift, posts_thrift
from auth_rpc.serving.runner import JsonFormatter
from auth_rpc.serving.transport import open_client

PASSWORD = "correct horse battery staple 1"
WRONG_PASSWORD = "Tr0ub4dor&3 but wrong, long"
SIG_WINDOW = 20

ACCESS_LINE = re.compile(
    r"^call method=(?P<method>\w+) outcome=(?P<outcome>[\w+]+) "
    r"latency_ms=(?P<latency>\d+\.\d{3}) subject=(?P<subject>\S+) "
    r"request_id=(?P<rid>[0-9a-f]{8,})$"
)


def record_texts(records: list[logging.LogRecord]) -> list[str]:
    """Each record as text: message with its args, exception text, stack, raw args."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    as_json = JsonFormatter()  # --log-format json: searched too
    return [f"{formatter.format(r)}\n{as_json.format(r)}\n{r.exc_text or ''}\n{r.args!r}"
            for r in records]


def find_leaks(texts: list[str], needles: dict[str, str]) -> list[tuple[str, str]]:
    return [(what, text[:200]) for text in texts for needle, what in needles.items()
            if needle in text]


@contextlib.contextmanager
def thrift(service: Any, port: int) -> Iterator[Any]:
    client = open_client(service, "127.0.0.1", port)
    try:
        yield client
    finally:
        client.close()


def expect(exc_type: type[BaseException], fn: Callable[..., Any], *args: Any) -> Any:
    with pytest.raises(exc_type) as info:
        fn(*args)
    return info.value


def test_session_logs_no_secret_and_one_access_line_per_call(
    caplog: pytest.LogCaptureFixture,
    auth_server: Any,
    make_user: Callable[..., None],
    make_client: Callable[..., str],
    make_posts_server: Callable[..., Any],
    token_factory: Any,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="auth_rpc.access")
    make_user("alice", PASSWORD)
    service_secret = make_client("reporter", ["posts:read"])
    intro_secret = make_client("posts-intro", (), introspect=True)
    secrets_: list[str] = [PASSWORD, WRONG_PASSWORD, service_secret, intro_secret]
    tokens: list[str] = []
    thrift_calls: dict[str, int] = {}

    def count(method: str, n: int = 1) -> None:
        thrift_calls[method] = thrift_calls.get(method, 0) + n

    servers = {
        "thrift": make_posts_server("thrift", cache_ttl_s=0),
        "introspect": make_posts_server(
            "introspect", cache_ttl_s=0, client_id="posts-intro", client_secret=intro_secret,
            timeout_s=10,  # each introspection costs an argon2id check: slow on a busy box
        ),
        "local": make_posts_server("local", cache_ttl_s=0),
    }

    # -- Auth over Thrift ------------------------------------------------------
    with thrift(auth_thrift.Auth, auth_server.port) as auth:
        first = auth.login("alice", PASSWORD)
        second = auth.login("alice", PASSWORD)
        count("login", 2)
        expect(common_thrift.Unauthenticated, auth.login, "alice", WRONG_PASSWORD)
        expect(common_thrift.Unauthenticated, auth.login, "mallory", WRONG_PASSWORD)
        expect(common_thrift.Unauthenticated, auth.login, "alice", PASSWORD + "x")
        count("login", 3)
        rotated = auth.refresh(first.refresh_token)
        count("refresh")
        expect(common_thrift.Unauthenticated, auth.refresh, first.refresh_token)  # reuse
        count("refresh")
        service_pair = auth.client_token("reporter", service_secret, "")
        count("client_token")
        expect(common_thrift.Unauthenticated, auth.client_token, "reporter",
               service_secret[::-1], "")
        count("client_token")
        assert auth.validate(second.access_token).subject == "alice"
        expect(common_thrift.Unauthenticated, auth.validate, first.access_token)  # family gone
        count("validate", 2)
        auth.jwks()
        count("jwks")
        doomed = auth.login("alice", PASSWORD)
        count("login")
        auth.revoke(doomed.access_token)
        auth.revoke(doomed.refresh_token)
        count("revoke", 2)
        tokens += [first.access_token, first.refresh_token, second.access_token,
                   second.refresh_token, rotated.access_token, rotated.refresh_token,
                   service_pair.access_token, doomed.access_token, doomed.refresh_token]

    # -- Posts, good and bad tokens, three modes --------------------------------
    expired = token_factory.expired()
    garbage = second.access_token[:-8] + "AAAAAAAA"
    tokens += [expired, garbage]
    posts_calls = 0
    for mode, server in servers.items():
        with thrift(posts_thrift.Posts, server.port) as posts:
            post = posts.create_post(second.access_token, f"hello {mode}", "secret-free body")
            posts.get_post(second.access_token, post.id)
            posts.list_posts(second.access_token, 10, 0)
            expect(common_thrift.NotFound, posts.get_post, second.access_token, 10**9)
            # Revoked tokens: only the remote modes ask Auth (local mode cannot know).
            revoked = [doomed.access_token, first.access_token] if mode != "local" else [
                garbage, expired]
            for bad in (garbage, expired, *revoked, second.refresh_token):
                expect(common_thrift.Unauthenticated, posts.list_posts, bad, 10, 0)
            expect(common_thrift.PermissionDenied, posts.create_post,
                   service_pair.access_token, "no", "scope")
            posts_calls += 10
    count("create_post", 2 * len(servers))
    count("get_post", 2 * len(servers))
    count("list_posts", 6 * len(servers))

    # -- HTTP ------------------------------------------------------------------
    base = auth_server.http_url.rstrip("/")
    with requests.Session() as http:
        r = http.post(f"{base}/token", data={"grant_type": "password", "username": "alice",
                                              "password": PASSWORD}, timeout=10)
        assert r.status_code == 200, r.text
        http_pair = r.json()
        r = http.post(f"{base}/token", data={"grant_type": "password", "username": "alice",
                                              "password": WRONG_PASSWORD}, timeout=10)
        assert r.status_code in (400, 401)
        r = http.post(f"{base}/token", data={"grant_type": "refresh_token",
                                              "refresh_token": http_pair["refresh_token"]},
                      timeout=10)
        assert r.status_code == 200, r.text
        http_rotated = r.json()
        r = http.post(f"{base}/token", data={"grant_type": "client_credentials"},
                      auth=("reporter", service_secret), timeout=10)
        assert r.status_code == 200, r.text
        http_client_tok = r.json()["access_token"]
        r = http.post(f"{base}/token", data={"grant_type": "client_credentials"},
                      auth=("reporter", WRONG_PASSWORD), timeout=10)
        assert r.status_code == 401
        r = http.post(f"{base}/introspect", data={"token": http_rotated["access_token"]},
                      auth=("posts-intro", intro_secret), timeout=10)
        assert r.status_code == 200 and r.json()["active"] is True
        r = http.post(f"{base}/introspect", data={"token": garbage},
                      auth=("posts-intro", intro_secret), timeout=10)
        assert r.status_code == 200 and r.json()["active"] is False
        r = http.post(f"{base}/introspect", data={"token": http_rotated["access_token"]},
                      auth=("posts-intro", WRONG_PASSWORD), timeout=10)
        assert r.status_code == 401
        r = http.post(f"{base}/revoke", data={"token": http_rotated["refresh_token"]},
                      auth=("posts-intro", intro_secret), timeout=10)
        assert r.status_code == 200, r.text
        assert http.get(f"{base}/.well-known/jwks.json", timeout=10).status_code == 200
        assert http.get(f"{base}/healthz", timeout=10).status_code == 200
        tokens += [http_pair["access_token"], http_pair["refresh_token"],
                   http_rotated["access_token"], http_rotated["refresh_token"], http_client_tok]

    # -- search everything that was logged --------------------------------------
    key = auth_server.service.signing_key()
    pem_lines = [line for line in key.private_pem().decode().splitlines()
                 if line and not line.startswith("-----")]
    texts = record_texts(caplog.records)
    assert len(texts) > 50
    needles: dict[str, str] = {}
    for s in secrets_:
        needles[s] = "a password or client secret"
    for t in tokens:
        needles[t] = "a token"
        if t.count(".") == 2:
            sig = t.rsplit(".", 1)[1]
            for i in range(len(sig) - SIG_WINDOW + 1):
                needles[sig[i:i + SIG_WINDOW]] = "20 characters of a token signature"
        else:
            for i in range(len(t) - SIG_WINDOW + 1):
                needles[t[i:i + SIG_WINDOW]] = "20 characters of a refresh token"
    for line in pem_lines:
        needles[line] = "a line of the private key"
    needles["PRIVATE KEY"] = "a private key PEM"
    leaks = find_leaks(texts, needles)
    assert not leaks, leaks[:5]
    # The search itself works: a signature piece hidden in a record's args is found.
    planted = logging.makeLogRecord({"name": "plant", "msg": "oops %s",
                                     "args": (f"..{second.access_token.rsplit('.', 1)[1][5:30]}",)})
    assert find_leaks(record_texts([planted]), needles)

    # -- one structured access line per Thrift call ------------------------------
    access = [r for r in caplog.records if r.name == "auth_rpc.access"]
    parsed = []
    for record in access:
        match = ACCESS_LINE.match(record.getMessage())
        assert match, record.getMessage()
        parsed.append(match)
    seen: dict[str, int] = {}
    for m in parsed:
        seen[m["method"]] = seen.get(m["method"], 0) + 1
    for method, n in thrift_calls.items():
        if method == "validate":  # the thrift-mode verifier calls Auth.validate too
            assert seen.get(method, 0) >= n
        else:
            assert seen.get(method, 0) == n, (method, seen)
    request_ids = [m["rid"] for m in parsed]
    assert len(set(request_ids)) == len(request_ids)
    posts_lines = [m for m in parsed if m["method"] in ("create_post", "get_post", "list_posts")]
    assert {m["subject"] for m in posts_lines if m["outcome"] == "ok"} == {"alice"}
    assert {m["outcome"] for m in posts_lines} >= {"ok", "Unauthenticated", "NotFound"}
    assert all(m["subject"] == "-" for m in posts_lines if m["outcome"] == "Unauthenticated")
    assert all(float(m["latency"]) >= 0 for m in parsed)
    print(f"\n[logs] {len(caplog.records)} records searched for {len(needles)} secret strings: "
          f"no leak; {len(parsed)} access lines, per method {dict(sorted(seen.items()))}")


HTTP_LINE = re.compile(
    r"^http method=(?P<method>[A-Z?]+) path=(?P<path>\S+) status=(?P<status>\d{3}) "
    r"latency_ms=(?P<latency>\d+\.\d{3}) client=(?P<client>\S+) subject=(?P<subject>\S+) "
    r"peer=(?P<peer>\S+)$"
)


def test_http_access_log_one_line_per_request_and_no_secret(
    caplog: pytest.LogCaptureFixture,
    auth_server: Any,
    make_user: Callable[..., None],
    make_client: Callable[..., str],
) -> None:
    """Regression: the Auth HTTP side logged nothing per request.

    Each request gives one line (method, path without query, status, latency,
    authenticated client or subject, peer); credentials in the body, the
    query string, the Authorization header or the path never reach any log.
    """
    caplog.set_level(logging.DEBUG)
    make_user("alice", PASSWORD)
    service_secret = make_client("reporter", ["posts:read"])
    intro_secret = make_client("posts-intro", (), introspect=True)
    base = auth_server.http_url.rstrip("/")
    expected: list[tuple[str, str, int, str, str]] = []  # method, path, status, client, subject

    with requests.Session() as http:
        def post(path: str, status: int, client: str, subject: str, **kw: Any) -> Any:
            r = http.post(f"{base}{path}", timeout=10, **kw)
            assert r.status_code == status, r.text
            expected.append(("POST", path, status, client, subject))
            return r

        good = post("/token", 200, "-", "alice",
                    data={"grant_type": "password", "username": "alice", "password": PASSWORD})
        pair = good.json()
        post("/token", 400, "-", "-",
             data={"grant_type": "password", "username": "alice", "password": WRONG_PASSWORD})
        rotated = post("/token", 200, "-", "-", data={
            "grant_type": "refresh_token", "refresh_token": pair["refresh_token"]}).json()
        client_tok = post("/token", 200, "reporter", "-", data={
            "grant_type": "client_credentials"}, auth=("reporter", service_secret)).json()
        post("/token", 401, "-", "-", data={"grant_type": "client_credentials"},
             auth=("reporter", WRONG_PASSWORD))
        post("/introspect", 200, "posts-intro", "-", data={"token": rotated["access_token"]},
             auth=("posts-intro", intro_secret))
        post("/introspect", 401, "-", "-", data={"token": rotated["access_token"]},
             headers={"Authorization": f"Bearer {rotated['access_token']}"})
        post("/revoke", 200, "posts-intro", "-", data={"token": rotated["refresh_token"]},
             auth=("posts-intro", intro_secret))
        # Credentials in the query string are refused, and the query is never logged.
        post("/token?password=" + PASSWORD.replace(" ", "+") + "&token="
             + client_tok["access_token"], 400, "-", "-", data={"grant_type": "password"})
        expected[-1] = ("POST", "/token", 400, "-", "-")
        # A token in the path: not an endpoint, logged as "?".
        r = http.get(f"{base}/{pair['access_token']}", timeout=10)
        assert r.status_code == 404
        expected.append(("GET", "?", 404, "-", "-"))
        r = http.get(f"{base}/introspect/{intro_secret}", timeout=10)
        assert r.status_code == 404
        expected.append(("GET", "?", 404, "-", "-"))
        r = http.get(f"{base}/healthz?debug=1", timeout=10)
        assert r.status_code == 200
        expected.append(("GET", "/healthz", 200, "-", "-"))
        r = http.get(f"{base}/.well-known/jwks.json", timeout=10)
        assert r.status_code == 200
        expected.append(("GET", "/.well-known/jwks.json", 200, "-", "-"))

    lines = [r.getMessage() for r in caplog.records if r.name == "auth_rpc.access.http"]
    parsed = [HTTP_LINE.match(line) for line in lines]
    assert all(parsed), lines
    got = [(m["method"], m["path"], int(m["status"]), m["client"], m["subject"])
           for m in parsed if m]
    assert got == expected
    assert all(m["peer"] == "127.0.0.1" for m in parsed if m)
    assert all(float(m["latency"]) >= 0 for m in parsed if m)

    needles: dict[str, str] = {}
    for s in (PASSWORD, WRONG_PASSWORD, service_secret, intro_secret,
              PASSWORD.replace(" ", "+")):
        needles[s] = "a password or client secret"
    for t in (pair["access_token"], pair["refresh_token"], rotated["access_token"],
              rotated["refresh_token"], client_tok["access_token"]):
        needles[t] = "a token"
        piece = t.rsplit(".", 1)[1] if t.count(".") == 2 else t
        for i in range(len(piece) - SIG_WINDOW + 1):
            needles[piece[i:i + SIG_WINDOW]] = "20 characters of a token"
    for word in ("Bearer", "Basic ", "Authorization"):
        needles[word] = "a header"
    # The test's own HTTP client (urllib3) logs its request lines: not the server's.
    server_records = [r for r in caplog.records if not r.name.startswith(("urllib3", "requests"))]
    leaks = find_leaks(record_texts(server_records), needles)
    assert not leaks, leaks[:5]
    # The search itself works: the client's own debug line quotes the query's password.
    assert find_leaks(record_texts(caplog.records), needles)
    print(f"\n[http access log] {len(lines)} lines for {len(expected)} requests, e.g. {lines[0]!r}")
