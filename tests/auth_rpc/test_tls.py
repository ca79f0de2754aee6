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


def _listening_sockets() -> set[tuple[str, str]]:
    """The listening sockets of this process: ("tcp", port) and ("unix", path)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = fd.readlink().name
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found: set[tuple[str, str]] = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(("tcp", str(int(fields[1].rsplit(":", 1)[1], 16))))
    for line in Path("/proc/self/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & 0x10000 and fields[6] in inodes:  # __SO_ACCEPTCON
            found.add(("unix", fields[7] if len(fields) > 7 else ""))
    return found


def _established_local_ports(remote_port: int) -> list[int]:
    """Local ports of this process's established loopback connections to ``remote_port``."""
    ports = []
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == remote_port:
            ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _plain_get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_mutual_tls_http_cannot_be_bypassed_nor_its_identity_forged(
    pki: dict[str, str],
) -> None:
    """The app listens on nothing but the public TLS port; a third party gets no identity.

    Before, waitress listened on a loopback TCP port (plain HTTP to it skipped
    mutual TLS), and the front handed the client identity over keyed by the
    source port of its loopback connection, which a connection from 127.0.0.2
    could reuse.
    """
    before = _listening_sockets()
    tls = TLSServerConfig(pki["server.pem"], pki["server.key"], pki["ca.pem"])
    listener = HttpListener(_echo_identity, tls=tls).start()
    ctx = ssl.create_default_context(cafile=pki["ca.pem"])
    ctx.load_cert_chain(pki["client.pem"], pki["client.key"])
    try:
        new = _listening_sockets() - before
        with ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", listener.port), timeout=5),
            server_hostname="127.0.0.1",
        ) as legit:  # a live mutual-TLS connection, kept open while others try
            legit.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while b'"}' not in reply:  # the head and the body may come apart
                reply += legit.recv(65536) or b'"}'
            assert b'"identity": "posts-service"' in reply, reply
            answers = {}
            for kind, port in sorted(new - {("tcp", str(listener.port))}):
                if kind != "tcp":
                    continue
                with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as plain:
                    answers[f"plain to :{port}"] = _plain_get(plain)
                for source_port in _established_local_ports(int(port)):
                    with socket.socket() as forged:
                        forged.settimeout(5)
                        forged.bind(("127.0.0.2", source_port))
                        forged.connect(("127.0.0.1", int(port)))
                        answers[f"127.0.0.2:{source_port} to :{port}"] = _plain_get(forged)
        print(f"\nlistening sockets added by the listener: {sorted(new)}; answers: {answers}")
        assert not any(b"posts-service" in answer for answer in answers.values()), answers
        assert not any(b"200 OK" in answer for answer in answers.values()), answers
        # Nothing but the public port: no loopback port, no UNIX socket to reach the app.
        assert new == {("tcp", str(listener.port))}
    finally:
        listener.stop()


def test_plain_http_requests_carry_no_identity(pki: dict[str, str]) -> None:
    """Without TLS nothing sets the identity keys, whatever the request's headers say."""
    listener = HttpListener(_echo_identity).start()
    try:
        r = requests.get(
            listener.url,
            headers={"Auth-Rpc.Peer-Identity": "posts-service", "X-Forwarded-Proto": "https"},
            timeout=5,
        )
        assert r.json() == {"identity": None, "scheme": "http"}
    finally:
        listener.stop()


def test_introspection_over_mutual_tls_checks_the_server_and_presents_the_client(
    make_auth_server: Any, pki: dict[str, str]
) -> None:
    """The introspect verifier's own connection pool (not requests): CA, hostname, client cert."""
    from auth_rpc.errors import DependencyUnavailable
    from auth_rpc.testing import TokenFactory
    from auth_rpc.verify.verifiers import IntrospectionVerifier

    auth = make_auth_server(settings=_settings(pki, mutual=True))
    secret = auth.service.add_client("posts-intro", (), introspect=True)
    token = TokenFactory.for_auth_server(auth, scopes=("posts:read",)).mint()
    with_cert = TLSClientConfig(
        ca_file=pki["ca.pem"], cert_file=pki["client.pem"], key_file=pki["client.key"]
    )

    def verifier(tls: Any) -> IntrospectionVerifier:
        return IntrospectionVerifier(
            introspect_url=f"{auth.http_url}/introspect", client_id="posts-intro",
            client_secret=secret, issuer=auth.service.settings.issuer,
            audience=auth.service.settings.audience, tls=tls,
            timeout_s=2.0, cache_ttl_s=0,
        )

    good = verifier(with_cert)
    try:
        for _ in range(3):  # kept alive: the handshake is not paid again
            assert "posts:read" in good.verify(token).scopes
    finally:
        good.close()
    refused = [
        TLSClientConfig(ca_file=pki["ca.pem"]),  # no client certificate
        TLSClientConfig(ca_file=pki["other-ca.pem"], cert_file=pki["client.pem"],
                        key_file=pki["client.key"]),  # the server's CA is not trusted
        TLSClientConfig(ca_file=pki["ca.pem"], cert_file=pki["client.pem"],
                        key_file=pki["client.key"], server_hostname="auth.example"),  # wrong name
        TLSClientConfig(ca_file=pki["ca.pem"], cert_file=pki["stranger.pem"],
                        key_file=pki["stranger.key"]),  # a certificate of another CA
        None,  # the default CA bundle does not know this CA
    ]
    for tls in refused:
        v = verifier(tls)
        try:
            with pytest.raises(DependencyUnavailable, match="unreachable"):
                v.verify(token)
        finally:
            v.close()
