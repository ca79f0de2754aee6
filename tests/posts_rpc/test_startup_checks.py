"""``posts-rpc serve`` checks what its verifier depends on before it says ready.

Through the real command against a real Auth server started in-process: a
refused introspection client is one error line and exit 1 (it used to report
ready and refuse every call with ``Unavailable``); an unreachable endpoint is
a warning and the service starts; a ``--jwks-url`` answering something that
is not a JWK Set is an error.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from auth_rpc.auth.server import AuthServer
from auth_rpc.serving.runner import bind_socket

Run = Callable[..., subprocess.Popen[str]]


def _first_line(proc: subprocess.Popen[str], timeout_s: float = 60) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise AssertionError(f"no output within {timeout_s} s")
    return proc.stdout.readline()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    procs: list[subprocess.Popen[str]] = []

    def _run(*args: str) -> subprocess.Popen[str]:
        cmd = [
            sys.executable, "-m", "posts_rpc.cli", "serve",
            "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1", "--port", "0",
            "--issuer", "https://issuer.test", "--log-level", "INFO", *args,
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        procs.append(proc)
        return proc

    yield _run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _secret_file(tmp_path: Path, secret: str) -> str:
    path = tmp_path / "client.secret"
    path.write_text(secret)
    path.chmod(0o600)
    return str(path)


def _introspect(auth_server: AuthServer, client_id: str, secret_file: str) -> tuple[str, ...]:
    return (
        "--verify", "introspect", "--introspect-url", auth_server.introspect_url,
        "--client-id", client_id, "--client-secret-file", secret_file,
    )


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out, err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_wrong_client_secret_exits_with_one_clear_line(
    run: Run, tmp_path: Path, auth_server: AuthServer,
    make_client: Callable[..., str], workers: str,
) -> None:
    secret = make_client("posts-introspector", introspect=True)
    wrong = secret[:-2] + ("AA" if not secret.endswith("AA") else "BB")
    proc = run(*_introspect(auth_server, "posts-introspector", _secret_file(tmp_path, wrong)),
               "--workers", workers)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert out == ""  # never ready
    errors = [line for line in err.splitlines() if line.startswith("posts-rpc: error:")]
    assert len(errors) == 1, err
    assert "refused the client credentials of posts-introspector (HTTP 401)" in errors[0]
    assert wrong not in err and secret not in err


def test_client_without_introspect_permission_exits(
    run: Run, tmp_path: Path, auth_server: AuthServer, make_client: Callable[..., str]
) -> None:
    secret = make_client("posts-plain")  # no --introspect permission
    proc = run(*_introspect(auth_server, "posts-plain", _secret_file(tmp_path, secret)))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert "(HTTP 403): register it with auth-rpc add-client ID --introspect" in err
    assert secret not in err


def test_right_credentials_start(
    run: Run, tmp_path: Path, auth_server: AuthServer, make_client: Callable[..., str]
) -> None:
    secret = make_client("posts-ok", introspect=True)
    proc = run(*_introspect(auth_server, "posts-ok", _secret_file(tmp_path, secret)))
    assert _first_line(proc).startswith("posts-rpc ready: ")
    _, err = _stop(proc)
    assert "introspection credentials accepted" in err
    assert secret not in err


def _closed_port_url(path: str) -> str:
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}{path}"


def test_unreachable_introspection_endpoint_warns_and_starts(
    run: Run, tmp_path: Path
) -> None:
    proc = run(
        "--verify", "introspect", "--introspect-url", _closed_port_url("/introspect"),
        "--client-id", "c", "--client-secret-file", _secret_file(tmp_path, "s" * 43),
    )
    assert _first_line(proc).startswith("posts-rpc ready: ")
    _, err = _stop(proc)
    assert "WARNING" in err and "cannot check the introspection credentials" in err


def test_jwks_url_that_is_not_a_jwk_set_exits(run: Run, auth_server: AuthServer) -> None:
    # The metadata document: JSON from the real Auth server, but no "keys".
    url = auth_server.http_url + "/.well-known/oauth-authorization-server"
    proc = run("--verify", "jwks", "--jwks-url", url, "--status-list", "off")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert out == ""
    assert f"posts-rpc: error: --jwks-url {url} does not answer a JWK Set (not a JWK Set)" in err


def test_jwks_url_answering_404_exits(run: Run, auth_server: AuthServer) -> None:
    url = auth_server.http_url + "/no-such-jwks.json"
    proc = run("--verify", "jwks", "--jwks-url", url, "--status-list", "off", "--workers", "2")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert "does not answer a JWK Set (HTTP 404)" in err


def test_jwks_real_and_unreachable(run: Run, auth_server: AuthServer) -> None:
    proc = run("--verify", "jwks", "--jwks-url", auth_server.jwks_url, "--status-list", "off")
    assert _first_line(proc).startswith("posts-rpc ready: ")
    _, err = _stop(proc)
    assert "signing keys from the JWK Set" in err
    proc = run("--verify", "jwks", "--jwks-url", _closed_port_url("/jwks.json"),
               "--status-list", "off")
    assert _first_line(proc).startswith("posts-rpc ready: ")
    _, err = _stop(proc)
    assert "WARNING" in err and "unreachable at start" in err
