"""``auth-rpc serve --log-format json``: one JSON object per line, access lines as fields.

Through the real command: Thrift calls (login, a wrong password, client_token)
and HTTP requests (a password grant, JWKS) each give one access record with
their fields; no password, client secret or token appears in the output.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from auth_rpc.idl import auth_thrift, common_thrift
from auth_rpc.serving.transport import open_client

READY = re.compile(r"^auth-rpc ready: thrift=[\d.]+:(?P<port>\d+) http=(?P<http>\S+) ")
PASSWORD = "a long enough password"


def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own command, fixed arguments
        [sys.executable, "-m", "auth_rpc.auth.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )


def test_json_log_lines(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    added = _run("add-user", "alice", "--data-dir", data, "--password-stdin", stdin=PASSWORD)
    assert added.returncode == 0, added.stderr
    made = _run("add-client", "reporting", "--data-dir", data, "--scope", "posts:read")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "auth_rpc.auth.cli", "serve", "--port", "0", "--http-port", "0",
         "--data-dir", data, "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        match = READY.match(proc.stdout.readline())  # blocks until ready
        assert match, proc.stdout
        with contextlib.closing(
            open_client(auth_thrift.Auth, "127.0.0.1", int(match["port"]))
        ) as client:
            pair = client.login("alice", PASSWORD)
            with pytest.raises(common_thrift.Unauthenticated):
                client.login("alice", PASSWORD + "x")
            service = client.client_token("reporting", secret, "posts:read")
        http = match["http"]
        got = requests.post(f"{http}/token", timeout=10, data={
            "grant_type": "password", "username": "alice", "password": PASSWORD})
        assert got.status_code == 200
        assert requests.get(f"{http}/.well-known/jwks.json", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines()]  # every line is one object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    calls = [r for r in records if r["logger"] == "auth_rpc.access"]
    assert [(r["method"], r["outcome"]) for r in calls] == [
        ("login", "ok"), ("login", "Unauthenticated"), ("client_token", "ok")]
    assert all(re.fullmatch(r"[0-9a-f]{16}", r["request_id"]) for r in calls)
    assert all(isinstance(r["latency_ms"], float) for r in calls)
    https = [r for r in records if r["logger"] == "auth_rpc.access.http"]
    assert [(r["method"], r["path"], r["status"], r["subject"]) for r in https] == [
        ("POST", "/token", 200, "alice"), ("GET", "/.well-known/jwks.json", 200, "-")]
    for needle in (PASSWORD, secret, pair.access_token, pair.refresh_token,
                   service.access_token, got.json()["access_token"]):
        assert needle not in err
        assert needle[-20:] not in err
