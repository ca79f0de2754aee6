"""Durability: SIGKILL both services in the middle of a write load, restart, check.

``auth-rpc serve`` and ``posts-rpc serve`` (``--verify thrift``) run as real
processes on temporary data dirs. Client threads create posts, rotate refresh
tokens and revoke tokens, recording every operation the server ACKNOWLEDGED
(a reply arrived). After ``KILL_AFTER`` acknowledgements (not after a sleep)
both processes get SIGKILL at once. They are restarted on the same data dirs,
and then:

- every acknowledged post is there with its exact author, title and body;
  every post listed is complete (title, author, a body we sent) and ids
  decrease down the pages (newest first) - nothing half-written;
- every acknowledged revocation holds: the access token is refused by
  ``validate``, a revoked refresh token by ``refresh``;
- every acknowledged rotation holds: the newest acknowledged access token still
  validates, the newest refresh token still rotates (unless a rotation of it
  was in flight at the kill - then it was either used or not, both fine), and
  every older refresh token is refused (checked last, since presenting one
  revokes the family);
- both SQLite databases pass ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.thrift import TClient
from thriftpy2.transport import TCyBufferedTransportFactory, TSocket

from auth_rpc.idl import auth_thrift, common_thrift, posts_thrift
from auth_rpc.serving.transport import open_client

ISSUER = "http://auth.test"
PASSWORD = "a password long enough"
KILL_AFTER = 300  # acknowledged operations before SIGKILL
POSTERS = 2
ROTATORS = 2
REVOKERS = 2
LOAD_DEADLINE_S = 10.0


@dataclass
class Ledger:
    """What the clients saw acknowledged, shared by the load threads."""

    kill_after: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    enough: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    # Set just before the SIGKILL (stop only after it): a call the kill breaks may wake
    # its thread before the main thread gets to set ``stop``; an error after this is set
    # is the kill's doing, not a bug.
    killing: threading.Event = field(default_factory=threading.Event)
    acks: int = 0
    posts: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # id -> author,title,body
    attempted_posts: set[tuple[str, str]] = field(default_factory=set)
    revoked_access: list[str] = field(default_factory=list)
    revoked_refresh: list[str] = field(default_factory=list)
    # per rotator: refresh tokens in order (index 0 from login), the newest access
    # token, and whether a rotation was in flight (sent, no answer) at the kill.
    chains: dict[int, list[str]] = field(default_factory=dict)
    newest_access: dict[int, str] = field(default_factory=dict)
    in_flight: dict[int, bool] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def ack(self) -> None:
        with self.lock:
            self.acks += 1
            if self.acks >= self.kill_after:
                self.enough.set()


_SOURCES = itertools.count(1)


def _auth_from_own_address(port: int) -> Any:
    """An Auth client connecting from an address of its own (127.0.2.N): each thread is
    a client of its own, and the Auth service admits few password checks per address."""
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=30, source_address=(f"127.0.2.{next(_SOURCES)}", 0)
    )
    trans = TCyBufferedTransportFactory().get_transport(TSocket(sock=sock))
    return TClient(auth_thrift.Auth, TCyBinaryProtocolFactory().get_protocol(trans))


def _login(port: int, user: str, stop: threading.Event) -> Any:
    """A token pair for ``user``, or ``None`` if the load ends (``stop``) first.

    Should the service be saturated (RateLimited: hashing admission) or refuse
    under load (Unavailable: fail closed), like any client: wait as told
    (``retry_after_ms``, else briefly) and ask again. Nothing is acknowledged
    until a pair arrives. A broken connection (the kill) raises, as any call does.
    """
    deadline = time.monotonic() + 60
    with contextlib.closing(_auth_from_own_address(port)) as auth:
        while True:
            try:
                return auth.login(user, PASSWORD)
            except (common_thrift.RateLimited, common_thrift.Unavailable) as exc:
                if time.monotonic() > deadline:
                    raise
                retry_after_ms = getattr(exc, "retry_after_ms", None) or 100
            if stop.wait(retry_after_ms / 1000):
                return None


def poster(ledger: Ledger, auth_port: int, posts_port: int, n: int) -> None:
    user = f"writer{n}"
    posts = None
    i = 0
    try:
        pair = _login(auth_port, user, ledger.stop)
        if pair is None:
            return  # the load ended first: nothing attempted
        token = pair.access_token
        posts = open_client(posts_thrift.Posts, "127.0.0.1", posts_port)
        while not ledger.stop.is_set():
            title, body = f"post {n}-{i}", f"body of {n}-{i} " + "x" * (i % 50) + " é✓"
            with ledger.lock:
                ledger.attempted_posts.add((title, body))
            try:
                post = posts.create_post(token, title, body)
            except common_thrift.Unavailable:
                # A refusal under load (Auth.validate or the disk slow on a busy
                # machine): fail closed, nothing acknowledged. Not a durability
                # question; go on.
                i += 1
                continue
            with ledger.lock:
                ledger.posts[post.id] = (user, title, body)
            ledger.ack()
            i += 1
    except Exception as exc:  # the kill: the connection breaks
        if not ledger.killing.is_set():
            ledger.errors.append(f"{user}: {type(exc).__name__}: {exc}")
    finally:
        if posts is not None:
            posts.close()


def rotator(ledger: Ledger, auth_port: int, n: int) -> None:
    auth = None
    try:
        # The login too may meet the load (retried in _login) or the kill (raises, like
        # any call here): nothing of this chain is acknowledged until the pair arrives.
        pair = _login(auth_port, "rotor", ledger.stop)
        if pair is None:
            return  # the load ended first: no chain
        with ledger.lock:
            ledger.chains[n] = [pair.refresh_token]
            ledger.newest_access[n] = pair.access_token
            ledger.in_flight[n] = False
        auth = open_client(auth_thrift.Auth, "127.0.0.1", auth_port)
        while not ledger.stop.is_set():
            ledger.in_flight[n] = True
            try:
                new = auth.refresh(ledger.chains[n][-1])
            except common_thrift.Unavailable:
                return  # refused under load; its outcome counts as in flight (either is fine)
            with ledger.lock:
                ledger.chains[n].append(new.refresh_token)
                ledger.newest_access[n] = new.access_token
                ledger.in_flight[n] = False
            ledger.ack()
    except Exception as exc:  # the kill: the connection breaks
        if not ledger.killing.is_set():
            ledger.errors.append(f"rotator {n}: {type(exc).__name__}: {exc}")
    finally:
        if auth is not None:
            auth.close()


def revoker(ledger: Ledger, auth_port: int) -> None:
    auth = None
    i = 0
    try:
        auth = _auth_from_own_address(auth_port)
        while not ledger.stop.is_set():
            try:
                pair = auth.login("victim", PASSWORD)
            except (common_thrift.Unavailable, common_thrift.RateLimited):
                continue  # refused under load (nothing to check)
            try:
                # i odd: the refresh token (the family, and its access token)
                auth.revoke(pair.refresh_token if i % 2 else pair.access_token)
            except common_thrift.Unavailable:
                continue  # refused under load: not acknowledged, nothing to check
            with ledger.lock:
                if i % 2:
                    ledger.revoked_refresh.append(pair.refresh_token)
                ledger.revoked_access.append(pair.access_token)
            ledger.ack()
            i += 1
    except Exception as exc:  # the kill: the connection breaks
        if not ledger.killing.is_set():
            ledger.errors.append(f"revoker: {type(exc).__name__}: {exc}")
    finally:
        if auth is not None:
            auth.close()


def integrity(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        result: str = conn.execute("PRAGMA integrity_check").fetchone()[0]
        return result


def test_sigkill_mid_load_loses_nothing_acknowledged(
    tmp_path: Path, spawn: Callable[..., Any]
) -> None:
    from auth_rpc.auth.service import AuthService, AuthSettings

    started = time.monotonic()
    auth_dir, posts_dir = tmp_path / "auth", tmp_path / "posts"
    users = [f"writer{n}" for n in range(POSTERS)] + ["rotor", "victim", "checker"]
    with AuthService.open(AuthSettings(data_dir=auth_dir, issuer=ISSUER)) as admin:
        for user in users:
            admin.add_user(user, PASSWORD, ["posts:read", "posts:write"])

    auth = spawn("auth", auth_dir, issuer=ISSUER)
    posts = spawn("posts", posts_dir, issuer=ISSUER, auth_port=auth.port)
    ledger = Ledger(kill_after=KILL_AFTER)
    threads = [threading.Thread(target=poster, args=(ledger, auth.port, posts.port, n))
               for n in range(POSTERS)]
    threads += [threading.Thread(target=rotator, args=(ledger, auth.port, n))
                for n in range(ROTATORS)]
    threads += [threading.Thread(target=revoker, args=(ledger, auth.port))
                for _ in range(REVOKERS)]
    for t in threads:
        t.start()
    reached = ledger.enough.wait(timeout=LOAD_DEADLINE_S)
    # Kill both at once, mid-load: the threads have calls in flight right now.
    ledger.killing.set()
    auth.proc.kill()
    posts.proc.kill()
    ledger.stop.set()
    auth.proc.wait(timeout=10)
    posts.proc.wait(timeout=10)
    for t in threads:
        t.join(timeout=10)
    assert reached, f"only {ledger.acks} operations acknowledged in {LOAD_DEADLINE_S} s"
    assert not any(t.is_alive() for t in threads)
    assert not ledger.errors, ledger.errors  # only the kill may break a client
    killed_at = ledger.acks

    # The files as the kill left them (opening replays the WAL, as a restart would).
    assert integrity(auth_dir / "auth.sqlite3") == "ok"
    assert integrity(posts_dir / "posts.db") == "ok"

    auth = spawn("auth", auth_dir, issuer=ISSUER)
    posts = spawn("posts", posts_dir, issuer=ISSUER, auth_port=auth.port)
    with contextlib.ExitStack() as stack:
        a = open_client(auth_thrift.Auth, "127.0.0.1", auth.port)
        stack.callback(a.close)
        p = open_client(posts_thrift.Posts, "127.0.0.1", posts.port)
        stack.callback(p.close)
        token = a.login("checker", PASSWORD).access_token

        # Posts: every acknowledged one, exactly.
        for post_id, (author, title, body) in ledger.posts.items():
            got = p.get_post(token, post_id)
            assert (got.author, got.title, got.body) == (author, title, body), post_id
        # Nothing half-written: walk every page, newest first.
        listed: list[Any] = []
        before = 0
        while True:
            page = p.list_posts(token, 100, before)
            listed.extend(page.posts)
            if not page.next_before_id:
                break
            before = page.next_before_id
        ids = [post.id for post in listed]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
        assert set(ledger.posts) <= set(ids)
        for post in listed:
            assert post.title and post.author and post.created_at > 0
            assert (post.title, post.body) in ledger.attempted_posts, post.id
        unacked_posts = len(ids) - len(ledger.posts)

        # Revocations.
        for access in ledger.revoked_access:
            try:
                a.validate(access)
            except common_thrift.Unauthenticated:
                continue
            raise AssertionError("an acknowledged revocation was lost")
        for refresh in ledger.revoked_refresh:
            try:
                a.refresh(refresh)
            except common_thrift.Unauthenticated:
                continue
            raise AssertionError("an acknowledged refresh-token revocation was lost")

        # Rotations: newest first (presenting an old token revokes the family).
        newest_ok = 0
        for n, chain in ledger.chains.items():
            assert a.validate(ledger.newest_access[n]).subject == "rotor"
            try:
                a.refresh(chain[-1])
                newest_ok += 1
            except common_thrift.Unauthenticated:
                # Only possible if a rotation of it reached the server unacknowledged.
                assert ledger.in_flight[n], f"chain {n}: the newest refresh token was lost"
            for old in chain[:-1]:
                try:
                    a.refresh(old)
                except common_thrift.Unauthenticated:
                    continue
                raise AssertionError(f"chain {n}: a rotated-out refresh token works again")
        rotations = sum(len(chain) - 1 for chain in ledger.chains.values())

    assert posts.terminate() == 0
    assert auth.terminate() == 0
    assert integrity(auth_dir / "auth.sqlite3") == "ok"
    assert integrity(posts_dir / "posts.db") == "ok"
    elapsed = time.monotonic() - started
    print(
        f"\n[durability] killed after {killed_at} acknowledged operations: "
        f"{len(ledger.posts)} posts (+{unacked_posts} committed but unacknowledged), "
        f"{rotations} rotations in {len(ledger.chains)} chains "
        f"(newest token still rotates in {newest_ok}), "
        f"{len(ledger.revoked_access)} access + {len(ledger.revoked_refresh)} refresh "
        f"revocations; all present after restart; integrity ok; {elapsed:.1f} s"
    )
