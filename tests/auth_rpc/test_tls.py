"""TLS on both Auth listeners (Thrift and HTTP), mutual TLS, and a Posts verifier over HTTPS."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from auth_rpc.auth.server import HttpListener
from auth_rpc.idl import auth_thrift, posts_thrift
from auth_rpc.serving.rpc import ServerSettings, TLSServerConfig
from auth_rpc.serving.tls_front import PEER_IDENTITY_KEY
from auth_rpc.serving.transport import TLSClientConfig, open_client

PASSWORD = "a password for TLS tests"


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    ca = trustme.CA()
    other_ca = trustme.CA()
    files: dict[str, str] = {}

    def write(name: str, blob: Any) -> None:
        path = tmp_path / name
        blob.write_to_path(str(path))
        files[name] = str(path)

    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("posts.internal", common_name="posts-service")
    stranger = other_ca.issue_cert("posts.internal", common_name="stranger")
    write("ca.pem", ca.cert_pem)
    write("other-ca.pem", other_ca.cert_pem)
    write("server.pem", server.cert_chain_pems[0])
    write("server.key", server.private_key_pem)
    write("client.pem", client.cert_chain_pems[0])
    write("client.key", client.private_key_pem)
    write("stranger.pem", stranger.cert_chain_pems[0])
    write("stranger.key", stranger.private_key_pem)
    return files


def _settings(pki: dict[str, str], *, mutual: bool = False) -> ServerSettings:
    ca = pki["ca.pem"] if mutual else None
    return ServerSettings(
        tls=TLSServerConfig(pki["server.pem"], pki["server.key"], ca), handshake_timeout_s=1.0
    )


def test_thrift_and_http_over_tls(make_auth_server: Any, pki: dict[str, str]) -> None:
    auth = make_auth_server(settings=_settings(pki))
    auth.service.add_user("alice", PASSWORD, ["posts:read"])
    tls = TLSClientConfig(ca_file=pki["ca.pem"])
    with contextlib.closing(open_client(auth_thrift.Auth, "127.0.0.1", auth.port, tls=tls)) as c:
        token = c.login("alice", PASSWORD).access_token
        assert c.validate(token).subject == "alice"
    assert auth.http_url.startswith("https://")
    meta = requests.get(
        f"{auth.http_url}/.well-known/oauth-authorization-server", verify=pki["ca.pem"], timeout=5
    ).json()
    assert meta["jwks_uri"].startswith("https://") and meta["token_endpoint"].startswith("https")
    r = requests.post(
        f"{auth.http_url}/token",
        data={"grant_type": "password", "username": "alice", "password": PASSWORD},
        verify=pki["ca.pem"],
        timeout=5,
    )
    assert r.status_code == 200, r.text
    # Plain HTTP to the TLS port gets nothing useful; an untrusted CA or a wrong name is refused.
    with pytest.raises(requests.RequestException):
        requests.get(f"http://127.0.0.1:{auth.http_port}/healthz", timeout=5)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{auth.http_url}/healthz", verify=pki["other-ca.pem"], timeout=5)
    with pytest.raises(ssl.SSLError):
        open_client(
            auth_thrift.Auth,
            "127.0.0.1",
            auth.port,
            tls=TLSClientConfig(ca_file=pki["ca.pem"], server_hostname="auth.example"),
        )


def test_posts_jwks_mode_over_https(
    make_auth_server: Any, make_posts_server: Any, pki: dict[str, str], token_factory: Any
) -> None:
    auth = make_auth_server(settings=_settings(pki))
    with requests.Session() as session:
        session.trust_env = False  # else REQUESTS_CA_BUNDLE overrides session.verify
        session.verify = pki["ca.pem"]
        posts = make_posts_server("jwks", auth=auth, session=session)
        from auth_rpc.testing import TokenFactory

        factory = TokenFactory.for_auth_server(auth, scopes=("posts:read",))
        with contextlib.closing(open_client(posts_thrift.Posts, "127.0.0.1", posts.port)) as c:
            assert c.list_posts(factory.mint(), 1, 0).posts == []
        posts.stop()


def _echo_identity(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    body = json.dumps(
        {"identity": environ.get(PEER_IDENTITY_KEY), "scheme": environ["wsgi.url_scheme"]}
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def test_mutual_tls_on_http_gives_the_app_the_client_identity(pki: dict[str, str]) -> None:
    tls = TLSServerConfig(pki["server.pem"], pki["server.key"], pki["ca.pem"])
    listener = HttpListener(_echo_identity, tls=tls).start()
    try:
        ok = requests.get(
            listener.url,
            verify=pki["ca.pem"],
            cert=(pki["client.pem"], pki["client.key"]),
            timeout=5,
        )
        assert ok.json() == {"identity": "posts-service", "scheme": "https"}
        for cert in (None, (pki["stranger.pem"], pki["stranger.key"])):
            with pytest.raises(requests.RequestException):
                requests.get(listener.url, verify=pki["ca.pem"], cert=cert, timeout=5)
    finally:
        listener.stop()


def test_mutual_tls_on_thrift(make_auth_server: Any, pki: dict[str, str]) -> None:
    auth = make_auth_server(settings=_settings(pki, mutual=True))
    with_cert = TLSClientConfig(
        ca_file=pki["ca.pem"], cert_file=pki["client.pem"], key_file=pki["client.key"]
    )
    with contextlib.closing(
        open_client(auth_thrift.Auth, "127.0.0.1", auth.port, tls=with_cert)
    ) as c:
        assert json.loads(c.jwks())["keys"]
    with pytest.raises((ssl.SSLError, OSError, Exception)):  # refused during or after handshake
        c2 = open_client(
            auth_thrift.Auth, "127.0.0.1", auth.port, tls=TLSClientConfig(ca_file=pki["ca.pem"])
        )
        try:
            c2.jwks()
        finally:
            c2.close()


def test_a_silent_client_does_not_block_the_https_listener(
    make_auth_server: Any, pki: dict[str, str]
) -> None:
    auth = make_auth_server(settings=_settings(pki))
    silent = [socket.create_connection(("127.0.0.1", auth.http_port)) for _ in range(5)]
    try:
        started = time.perf_counter()
        r = requests.get(f"{auth.http_url}/healthz", verify=pki["ca.pem"], timeout=5)
        elapsed = time.perf_counter() - started
        print(f"healthz over TLS with 5 silent clients: {elapsed * 1000:.1f} ms")
        assert r.status_code == 200 and elapsed < 2.0
    finally:
        for s in silent:
            s.close()


def _start(*args: str) -> tuple[Any, str]:
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline()


def test_commands_with_mutual_tls_end_to_end(tmp_path: Path, pki: dict[str, str]) -> None:
    """auth-rpc serve and posts-rpc serve (jwks over mutual-TLS HTTPS), driven by their flags."""
    import re
    import signal
    import subprocess
    import sys

    data = tmp_path / "auth"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "auth_rpc.auth.cli",
            "add-user",
            "alice",
            "--data-dir",
            str(data),
            "--password-stdin",
        ],
        input=PASSWORD + "\n",
        text=True,
        check=True,
        capture_output=True,
    )
    tls_flags = ["--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"]]
    auth, ready = _start(
        "auth_rpc.auth.cli",
        "serve",
        "--data-dir",
        str(data),
        "--port",
        "0",
        "--http-port",
        "0",
        *tls_flags,
        "--tls-client-ca",
        pki["ca.pem"],
    )
    procs = [auth]
    try:
        m = re.search(r"thrift=[\d.]+:(\d+) http=(\S+) issuer=(\S+)", ready)
        assert m and m[2].startswith("https://"), ready
        posts, posts_ready = _start(
            "posts_rpc.cli",
            "serve",
            "--data-dir",
            str(tmp_path / "posts"),
            "--port",
            "0",
            "--verify",
            "jwks",
            "--jwks-url",
            f"{m[2]}/.well-known/jwks.json",
            "--issuer",
            m[3],
            "--auth-tls-ca",
            pki["ca.pem"],
            "--auth-tls-cert",
            pki["client.pem"],
            "--auth-tls-key",
            pki["client.key"],
            *tls_flags,
        )
        procs.append(posts)
        pm = re.search(r"thrift=[\d.]+:(\d+)", posts_ready)
        assert pm and "tls=on" in posts_ready, posts_ready
        client_tls = TLSClientConfig(
            ca_file=pki["ca.pem"], cert_file=pki["client.pem"], key_file=pki["client.key"]
        )
        with contextlib.closing(
            open_client(auth_thrift.Auth, "127.0.0.1", int(m[1]), tls=client_tls)
        ) as c:
            token = c.login("alice", PASSWORD).access_token
        with contextlib.closing(
            open_client(
                posts_thrift.Posts,
                "127.0.0.1",
                int(pm[1]),
                tls=TLSClientConfig(ca_file=pki["ca.pem"]),
            )
        ) as p:
            assert p.create_post(token, "over TLS", "").author == "alice"
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
