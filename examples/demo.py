"""The demo behind ``make demo``: token authentication on Thrift services, end to end.

It runs the real commands (``auth-rpc``, ``posts-rpc``) as separate processes
on free ports with a temporary data directory, then drives them with the
client library (``client.Session``) the way an application would:

1. make two users and two service clients (``auth-rpc add-user`` /
   ``add-client``): ``reporting`` and the Posts service's own client, given the
   permission to introspect tokens (``--introspect``);
2. start the Auth service and three Posts instances sharing one store: one
   checks tokens locally with the Auth service's JWKS, one asks ``Auth.validate``
   over Thrift on every call (cache off), one asks the RFC 7662 introspection
   endpoint on every call (cache off) as the Posts service's client;
3. log in, create and list posts; show what is refused and why;
4. log out, and see the thrift-mode instance refuse the old token at once, and
   the jwks-mode instance (which checks tokens locally) within about a second:
   it reads the token's bit in the Auth service's Token Status List, which it
   fetches again every second;
5. call Posts service-to-service with OAuth client credentials.

Every process is stopped with SIGTERM at the end (exit 0 expected); the demo
exits 0 only if every step behaved as described.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import requests

from auth_rpc.idl import common_thrift
from client import Session, connect_posts

ALICE, BOB = ("alice", "correct horse battery staple"), ("bob", "tr0ub4dor&3 is too short?")


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(text: str) -> None:
    print(f"   {text}", flush=True)


def expect_refusal(what: str, exc_type: type[Exception], call: Any) -> None:
    """Run ``call``; it must raise ``exc_type`` (the demo fails otherwise)."""
    try:
        call()
    except exc_type as exc:
        show(f"{what}: refused with {type(exc).__name__}: {exc.message}")  # type: ignore[attr-defined]
        return
    raise SystemExit(f"demo failed: {what} was not refused with {exc_type.__name__}")


class Processes:
    """Starts servers, reads their ready lines, stops them all with SIGTERM."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen[str], IO[str]]] = []

    def run(self, *args: str, stdin: str = "") -> str:
        done = subprocess.run(  # noqa: S603  # our own commands
            [sys.executable, "-m", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            raise SystemExit(f"demo failed: {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def start(self, name: str, *args: str) -> dict[str, str]:
        log = (self.workdir / f"{name}.log").open("w")
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=log, text=True
        )
        self.running.append((name, proc, log))
        assert proc.stdout is not None
        ready = proc.stdout.readline().strip()  # the server prints it once it listens
        if not ready:
            raise SystemExit(f"demo failed: {name} did not start; see {log.name}")
        show(ready)
        return dict(part.split("=", 1) for part in ready.split() if "=" in part)

    def stop_all(self) -> bool:
        clean = True
        for name, proc, log in reversed(self.running):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            log.close()
            clean &= code == 0
            show(f"{name} stopped (exit {code})")
        self.running.clear()
        return clean


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="auth-rpc-demo-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    with workspace() as work:
        procs = Processes(work)
        try:
            ok = demo(work, procs)
        finally:
            say("Stopping every process with SIGTERM")
            clean = procs.stop_all()
    if not clean:
        print("demo failed: a server did not exit 0", file=sys.stderr)
        return 1
    print("\nDemo finished: every step behaved as expected.")
    return 0 if ok else 1


def demo(work: Path, procs: Processes) -> bool:
    auth_data, posts_data = work / "auth", work / "posts"

    say("Users and service clients, made with the auth-rpc command")
    for name, password in (ALICE, BOB):
        show(
            procs.run(
                "auth_rpc.auth.cli",
                "add-user",
                name,
                "--data-dir",
                str(auth_data),
                "--password-stdin",
                stdin=password + "\n",
            ).strip()
        )
    out = procs.run(
        "auth_rpc.auth.cli",
        "add-client",
        "reporting",
        "--data-dir",
        str(auth_data),
        "--scope",
        "posts:read",
    )
    reporting_secret = out.strip().splitlines()[-1]
    show("client 'reporting' registered with scope 'posts:read' (its secret is kept in memory)")
    # The Posts service's own client: it only introspects, so it needs no scope,
    # but the permission (without it, /introspect answers 403).
    out = procs.run(
        "auth_rpc.auth.cli",
        "add-client",
        "posts-service",
        "--data-dir",
        str(auth_data),
        "--scope",
        "",
        "--introspect",
    )
    secret_file = work / "posts-service-secret.txt"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(out.strip().splitlines()[-1] + "\n")
    show("client 'posts-service' registered, may introspect tokens (its secret in a 0600 file)")

    say("Starting the Auth service and three Posts instances on free ports")
    auth = procs.start(
        "auth-rpc",
        "auth_rpc.auth.cli",
        "serve",
        "--data-dir",
        str(auth_data),
        "--port",
        "0",
        "--http-port",
        "0",
    )
    issuer, http = auth["issuer"], auth["http"]
    common = [
        "--data-dir",
        str(posts_data),
        "--port",
        "0",
        "--issuer",
        issuer,
        "--audience",
        "posts",
    ]
    jwks_posts = procs.start(
        "posts-rpc (jwks)",
        "posts_rpc.cli",
        "serve",
        *common,
        "--verify",
        "jwks",
        "--jwks-url",
        f"{http}/.well-known/jwks.json",
    )
    thrift_posts = procs.start(
        "posts-rpc (thrift)",
        "posts_rpc.cli",
        "serve",
        *common,
        "--verify",
        "thrift",
        "--auth-addr",
        auth["thrift"],
        "--cache-ttl",
        "0",
    )
    introspect_posts = procs.start(
        "posts-rpc (introspect)",
        "posts_rpc.cli",
        "serve",
        *common,
        "--verify",
        "introspect",
        "--introspect-url",
        f"{http}/introspect",
        "--client-id",
        "posts-service",
        "--client-secret-file",
        str(secret_file),
        "--cache-ttl",
        "0",
    )
    auth_addr, jwks_addr, thrift_addr = auth["thrift"], jwks_posts["thrift"], thrift_posts["thrift"]
    introspect_addr = introspect_posts["thrift"]

    say("alice logs in; the session attaches her token to every call by itself")
    alice = Session.login(auth_addr, *ALICE)
    claims = alice.validate()
    show(f"logged in as {claims.subject} with scopes {sorted(claims.scopes)}")
    posts = alice.posts(jwks_addr)
    first = posts.create_post(title="Hello, Thrift", body="Tokens are checked on every call.")
    posts.create_post(title="Second post", body="Pages are keyset-paginated, newest first.")
    page = posts.list_posts(limit=10)
    for post in page.posts:
        show(f"#{post.id:<3} {post.author:<6} {post.title}")

    say("What gets refused")
    with connect_posts(*_hostport(jwks_addr)) as raw:
        expect_refusal(
            "a call with no token", common_thrift.Unauthenticated, lambda: raw.list_posts("", 10, 0)
        )
        token = alice.access_token()
        header, payload, signature = token.split(".")
        tampered = f"{header}.{_edit_claims(payload, sub='bob')}.{signature}"
        expect_refusal(
            "a token whose payload says sub=bob",
            common_thrift.Unauthenticated,
            lambda: raw.list_posts(tampered, 10, 0),
        )
    bob = Session.login(auth_addr, *BOB)
    expect_refusal(
        "bob deleting alice's post",
        common_thrift.PermissionDenied,
        lambda: bob.posts(jwks_addr).delete_post(post_id=first.id),
    )
    expect_refusal(
        "a title of 201 characters",
        common_thrift.InvalidArgument,
        lambda: posts.create_post(title="x" * 201, body=""),
    )

    say("alice logs out: her refresh and access tokens are revoked")
    old_token = alice.access_token()
    alice.logout()
    logged_out = time.monotonic()
    for mode, addr in (("thrift", thrift_addr), ("introspect", introspect_addr)):
        with connect_posts(*_hostport(addr)) as raw:
            expect_refusal(
                f"the old access token at the {mode}-mode instance",
                common_thrift.Unauthenticated,
                lambda raw=raw: raw.list_posts(old_token, 10, 0),
            )
    with connect_posts(*_hostport(jwks_addr)) as raw:
        # It verifies locally, cached answer and all, but reads the token's bit in the
        # Auth service's status list on every call, and fetches the list every second.
        while True:
            try:
                raw.list_posts(old_token, 10, 0)
            except common_thrift.Unauthenticated as exc:
                show(
                    f"the old access token at the jwks-mode instance: refused with "
                    f"Unauthenticated: {exc.message} ({time.monotonic() - logged_out:.1f} s "
                    f"after the logout: its status list bit)"
                )
                break
            if time.monotonic() - logged_out > 10:
                raise SystemExit("demo failed: the jwks-mode instance still accepts the token")
            time.sleep(0.05)

    say("A service calls Posts with OAuth client credentials")
    service = Session.for_client(auth_addr, "reporting", reporting_secret, scope="posts:read")
    report = service.posts(thrift_addr).list_posts(limit=100)
    show(f"'reporting' read {len(report.posts)} posts through the thrift-mode instance")
    expect_refusal(
        "'reporting' creating a post (it has posts:read only)",
        common_thrift.PermissionDenied,
        lambda: service.posts(thrift_addr).create_post(title="nope", body=""),
    )
    # Introspection tells a token's subject and scopes: only a client given the
    # permission may ask (the Posts service's own client above), not 'reporting'.
    answer = requests.post(
        f"{http}/introspect",
        data={"token": service.access_token()},
        auth=("reporting", reporting_secret),
        timeout=10,
    )
    if answer.status_code != 403:
        raise SystemExit(f"demo failed: 'reporting' introspected (HTTP {answer.status_code})")
    show(
        f"'reporting' introspecting a token: refused with HTTP 403 {answer.json()['error']}: "
        f"{answer.json()['error_description']}"
    )
    bob.logout()
    service.logout()
    return True


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def _edit_claims(segment: str, **changes: str) -> str:
    import base64

    padded = segment + "=" * (-len(segment) % 4)
    claims = json.loads(base64.urlsafe_b64decode(padded))
    claims.update(changes)
    raw = json.dumps(claims, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


if __name__ == "__main__":
    sys.exit(main())
