"""``posts-rpc serve`` as a real process (ready line, a call, clean stop on a signal); usage."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from thriftpy2.transport import TTransportException

from auth_rpc.idl import common_thrift, posts_thrift
from auth_rpc.serving.transport import TLSClientConfig, open_client
from posts_rpc import cli

from _http_stub import QuietHandler, StubServer

Mint = Callable[..., str]

READY = re.compile(r"^posts-rpc ready: thrift=127\.0\.0\.1:(\d+) verify=(\w+) ")


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """One line of the process's standard output, waiting at most ``timeout_s``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise AssertionError(f"no output within {timeout_s} s")
    return proc.stdout.readline()


@pytest.fixture
def secret_file(tmp_path: Path, hs256_secret: bytes) -> Path:
    path = tmp_path / "hs256.secret"
    path.write_bytes(hs256_secret)
    path.chmod(0o600)
    return path


@pytest.fixture
def serve(
    tmp_path: Path, secret_file: Path, issuer_audience: tuple[str, str]
) -> Iterator[Callable[..., tuple[subprocess.Popen[str], int]]]:
    procs: list[subprocess.Popen[str]] = []
    issuer, audience = issuer_audience

    def _serve(
        *extra: str, verify: tuple[str, ...] = ()
    ) -> tuple[subprocess.Popen[str], int]:
        verify = verify or ("--verify", "local", "--hs256-secret-file", str(secret_file))
        if "--status-list" not in extra:  # tokens minted here carry no Status List entry
            extra = (*extra, "--status-list", "off")
        cmd = [
            sys.executable, "-m", "posts_rpc.cli", "serve",
            "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1", "--port", "0",
            *verify, "--issuer", issuer, "--audience", audience, "--log-level", "WARNING",
            *extra,
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        procs.append(proc)
        line = _read_line(proc, 60)
        match = READY.match(line)
        assert match, f"unexpected first line {line!r}"
        assert match.group(2) == verify[1]
        return proc, int(match.group(1))

    yield _serve
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_ready_call_and_clean_stop(
    serve: Callable[..., tuple[subprocess.Popen[str], int]], mint: Mint, sig: signal.Signals
) -> None:
    proc, port = serve()
    client = open_client(posts_thrift.Posts, "127.0.0.1", port, timeout_s=10)
    try:
        post = client.create_post(mint("alice"), "from the CLI test", "hello")
        assert client.get_post(mint("bob", "posts:read"), post.id) == post
        with pytest.raises(common_thrift.Unauthenticated):
            client.list_posts("garbage", 0, 0)
    finally:
        client.close()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == ""  # exactly one line: the ready line, read above
    assert mint("alice") not in err


def test_posts_survive_a_restart(
    serve: Callable[..., tuple[subprocess.Popen[str], int]], mint: Mint
) -> None:
    proc, port = serve()
    client = open_client(posts_thrift.Posts, "127.0.0.1", port, timeout_s=10)
    try:
        post = client.create_post(mint(), "durable", "")
    finally:
        client.close()
    proc.terminate()
    proc.communicate(timeout=30)
    proc, port = serve()
    client = open_client(posts_thrift.Posts, "127.0.0.1", port, timeout_s=10)
    try:
        assert client.get_post(mint(), post.id) == post
    finally:
        client.close()
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_framed_listener(
    serve: Callable[..., tuple[subprocess.Popen[str], int]], mint: Mint
) -> None:
    proc, port = serve("--framed")
    client = open_client(posts_thrift.Posts, "127.0.0.1", port, framed=True, timeout_s=10)
    try:
        assert client.list_posts(mint(), 0, 0).posts == []
    finally:
        client.close()
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_tls_listener_with_client_certificates(
    serve: Callable[..., tuple[subprocess.Popen[str], int]], mint: Mint, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("client.example")
    files = {
        "ca": ca.cert_pem,
        "cert": server_cert.cert_chain_pems[0],
        "key": server_cert.private_key_pem,
        "client": client_cert.private_key_and_cert_chain_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / f"{name}.pem"))
    pem = {name: str(tmp_path / f"{name}.pem") for name in files}
    proc, port = serve(
        "--tls-cert", pem["cert"], "--tls-key", pem["key"], "--tls-client-ca", pem["ca"]
    )
    tls = TLSClientConfig(ca_file=pem["ca"], cert_file=pem["client"])
    client = open_client(posts_thrift.Posts, "127.0.0.1", port, tls=tls, timeout_s=10)
    try:
        assert client.list_posts(mint(), 0, 0).posts == []
    finally:
        client.close()
    # No client certificate: the handshake (TLS 1.2) or the first call (TLS 1.3) fails.
    with pytest.raises((OSError, TTransportException)):
        anonymous = open_client(
            posts_thrift.Posts, "127.0.0.1", port, tls=TLSClientConfig(ca_file=pem["ca"])
        )
        try:
            anonymous.list_posts(mint(), 0, 0)
        finally:
            anonymous.close()
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.fixture
def https_jwks(tmp_path: Path) -> Iterator[tuple[str, str, Ed25519PrivateKey]]:
    """A JWK Set served over HTTPS from this process: (URL, CA file, signing key)."""
    key = Ed25519PrivateKey.generate()
    jwk = json.loads(OKPAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="test-ed25519", use="sig", alg="EdDSA")
    body = json.dumps({"keys": [jwk]}).encode()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            self.reply(200, body)

    ca = trustme.CA()
    ca_file = tmp_path / "jwks-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    with StubServer(Handler, tls=ctx) as http:
        yield f"{http.url}/jwks.json", str(ca_file), key


def test_jwks_mode_over_https_with_auth_tls_ca(
    serve: Callable[..., tuple[subprocess.Popen[str], int]],
    mint: Mint,
    https_jwks: tuple[str, str, Ed25519PrivateKey],
) -> None:
    url, ca_file, key = https_jwks
    proc, port = serve(verify=("--verify", "jwks", "--jwks-url", url, "--auth-tls-ca", ca_file))
    client = open_client(posts_thrift.Posts, "127.0.0.1", port, timeout_s=10)
    try:
        token = mint("alice", key=key, alg="EdDSA", headers={"kid": "test-ed25519"})
        post = client.create_post(token, "via JWKS", "")
        assert post.author == "alice"
        with pytest.raises(common_thrift.Unauthenticated):
            client.get_post(mint("alice"), post.id)  # HS256: not a key of the set
    finally:
        client.close()
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_status_list_flags_reach_the_verifier(tmp_path: Path, secret_file: Path) -> None:
    parser = cli._parser()

    def verifier(*flags: str) -> Any:
        args = parser.parse_args([
            "serve", "--data-dir", str(tmp_path), "--verify", "local",
            "--hs256-secret-file", str(secret_file), "--issuer", "https://issuer.test", *flags,
        ])
        cli._check_args(parser, args)
        built, session = cli._verifier(args)
        assert session is None
        built.close()
        return built

    default = verifier()
    assert default.status_list == "required"
    checker = default.status_checker
    assert (checker.uri_prefix, checker.max_age_s, checker.refresh_max_s) == (
        "https://issuer.test/statuslists/", 60.0, 1.0
    )
    chosen = verifier(
        "--status-list", "if-present", "--status-list-prefix", "https://lists.test/sl/",
        "--status-max-age", "30", "--status-refresh", "2",
    )
    assert chosen.status_list == "if-present"
    checker = chosen.status_checker
    assert (checker.uri_prefix, checker.max_age_s, checker.refresh_max_s) == (
        "https://lists.test/sl/", 30.0, 2.0
    )
    assert verifier("--status-list", "off").status_checker is None


def test_an_issuer_without_status_lists_needs_the_opt_out(
    tmp_path: Path, secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "serve", "--data-dir", str(tmp_path / "d"), "--port", "0", "--verify", "local",
        "--hs256-secret-file", str(secret_file), "--issuer", "urn:example:issuer",
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--status-list-prefix URL, or --status-list off" in err
    parser = cli._parser()
    for extra in (["--status-list", "off"], ["--status-list-prefix", "https://lists.test/"]):
        cli._check_args(parser, parser.parse_args(base + extra))  # accepted


def test_short_hs256_secret_refuses_to_start(
    tmp_path: Path, issuer_audience: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"too short")
    issuer, audience = issuer_audience
    code = cli.main([
        "serve", "--data-dir", str(tmp_path / "d"), "--port", "0", "--verify", "local",
        "--hs256-secret-file", str(short), "--issuer", issuer, "--audience", audience,
    ])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("posts-rpc: error:")
    assert "too short" not in err  # never the secret itself


BASE = ["serve", "--data-dir", "/nonexistent", "--port", "0", "--issuer", "https://i.test"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--verify", "local"],
         "--verify local needs --public-key FILE, --jwks-file FILE or --hs256-secret-file"),
        (["--verify", "local", "--public-key", "a", "--hs256-secret-file", "b"],
         "not allowed with"),
        (["--verify", "local", "--hs256-secret-file", "s", "--jwks-url", "http://x/"],
         "--jwks-url does not apply to --verify local"),
        (["--verify", "jwks"], "--verify jwks needs --jwks-url"),
        (["--verify", "jwks", "--jwks-url", "http://x/", "--auth-addr", "h:1"],
         "--auth-addr does not apply to --verify jwks"),
        (["--verify", "introspect", "--introspect-url", "http://x/", "--client-id", "c"],
         "--verify introspect needs --client-secret-file"),
        (["--verify", "introspect", "--client-id", "c", "--client-secret-file", "f"],
         "--verify introspect needs --introspect-url"),
        (["--verify", "thrift"], "--verify thrift needs --auth-addr"),
        (["--verify", "thrift", "--auth-addr", "nohostport"], "--auth-addr: expected HOST:PORT"),
        (["--verify", "thrift", "--auth-addr", "h:1", "--status-list", "off"],
         "--status-list does not apply to --verify thrift"),
        (["--verify", "introspect", "--introspect-url", "http://x/", "--client-id", "c",
          "--client-secret-file", "f", "--status-max-age", "5"],
         "--status-max-age does not apply to --verify introspect"),
        (["--verify", "jwks", "--jwks-url", "http://x/", "--status-refresh", "0"],
         "--status-refresh must be between"),
        (["--verify", "jwks", "--jwks-url", "http://x/", "--status-max-age", "1"],
         "--status-max-age must be longer than --status-refresh"),
        (["--verify", "jwks", "--jwks-url", "http://x/", "--auth-framed"],
         "--auth-framed does not apply"),
        (["--verify", "thrift", "--auth-addr", "h:1", "--cache-ttl", "-1"], "--cache-ttl"),
        (["--verify", "thrift", "--auth-addr", "h:1", "--cache-ttl", "nan"], "--cache-ttl"),
        (["--verify", "thrift", "--auth-addr", "h:1", "--tls-cert", "c.pem"], "go together"),
        (["--verify", "thrift", "--auth-addr", "h:1", "--tls-client-ca", "ca.pem"],
         "--tls-client-ca needs"),
        (["--verify", "ldap"], "invalid choice"),
        (["--verify", "thrift", "--auth-addr", "h:1", "--proxy-protocol-from", "haproxy"],
         "'haproxy' is not an IP address or network"),
        (["--verify", "thrift", "--auth-addr", "h:1", "--proxy-protocol-from", "10.0.0.0/33"],
         "'10.0.0.0/33' is not an IP address or network"),
    ],
)
def test_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(BASE + args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_issuer_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--data-dir", "d", "--verify", "thrift", "--auth-addr", "h:1"])
    assert info.value.code == 2
    assert "--issuer" in capsys.readouterr().err


def test_no_flag_switches_the_token_check_off(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out.lower()
    assert "--verify" in help_text
    for word in ("unsafe", "skip", "no-auth", "insecure", "benchmark"):
        assert word not in help_text


def test_log_format_json_one_object_per_line_with_access_fields(
    serve: Callable[..., tuple[subprocess.Popen[str], int]], mint: Mint
) -> None:
    proc, port = serve("--log-format", "json", "--log-level", "INFO")
    alice = mint("alice")
    client = open_client(posts_thrift.Posts, "127.0.0.1", port, timeout_s=10)
    try:
        post = client.create_post(alice, "json logs", "hello")
        with pytest.raises(common_thrift.Unauthenticated):
            client.get_post("garbage", post.id)
    finally:
        client.close()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines()]  # every line is one object
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    calls = [r for r in records if r["logger"] == "auth_rpc.access"]
    by_method = {r["method"]: r for r in calls}
    assert set(by_method) == {"create_post", "get_post"}, calls
    assert by_method["create_post"]["outcome"] == "ok"
    assert by_method["create_post"]["subject"] == "alice"
    assert by_method["get_post"]["outcome"] == "Unauthenticated"
    assert by_method["get_post"]["subject"] == "-"
    for r in calls:
        assert re.fullmatch(r"[0-9a-f]{16}", r["request_id"])
        assert isinstance(r["latency_ms"], float) and r["latency_ms"] >= 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"])
    assert alice not in err and alice.rsplit(".", 1)[1][:20] not in err


def test_a_port_in_use_is_one_line_naming_the_address(
    tmp_path: Path, secret_file: Path, issuer_audience: tuple[str, str]
) -> None:
    """Not ``[Errno 98] Address already in use``: which address, in words (issue 15)."""
    import socket

    issuer, audience = issuer_audience
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(  # the real command; fixed arguments
            [sys.executable, "-m", "posts_rpc.cli", "serve", "--data-dir", str(tmp_path / "d"),
             "--port", str(port), "--verify", "local", "--hs256-secret-file", str(secret_file),
             "--status-list", "off", "--issuer", issuer, "--audience", audience],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 1
    assert done.stdout == ""  # never ready
    assert done.stderr.splitlines()[-1] == (
        f"posts-rpc: error: cannot listen on 127.0.0.1:{port}: address already in use"
    ), done.stderr
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr
