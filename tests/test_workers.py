"""``--workers N``: pre-forked processes sharing the listening sockets, supervised."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from thriftpy2.transport import TTransportException

from auth_rpc.auth.keys import SigningKey
from auth_rpc.idl import auth_thrift, posts_thrift
from auth_rpc.serving.transport import open_client
from auth_rpc.testing import TokenFactory
from posts_rpc.server import DB_FILE_NAME


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _wait_for(condition: object, what: str, timeout_s: float = 30.0) -> None:
    """Poll a condition with a deadline (a process table changes asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.05)


@contextlib.contextmanager
def serve(*args: str, log: Path | None = None) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start a server command; its stderr goes to ``log`` if given (a busy
    server's access log would fill an unread pipe and block it)."""
    with contextlib.ExitStack() as stack:
        stderr = stack.enter_context(log.open("w")) if log is not None else subprocess.PIPE
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        try:
            assert proc.stdout is not None
            yield proc, proc.stdout.readline()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)


def test_posts_workers_share_the_socket_restart_and_stop(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    factory = TokenFactory(
        key=SigningKey.hs256(secret.read_bytes()), issuer="urn:t", audience="posts",
        scopes=("posts:read", "posts:write"),
    )
    with serve(
        "posts_rpc.cli", "serve", "--data-dir", str(tmp_path / "posts"), "--port", "0",
        "--verify", "local", "--hs256-secret-file", str(secret), "--issuer", "urn:t",
        "--status-list", "off",  # tokens of an issuer without Token Status Lists
        "--workers", "2",
    ) as (proc, ready):
        port = int(re.search(r"thrift=[\d.]+:(\d+)", ready)[1])  # type: ignore[index]
        assert "workers=2" in ready
        _wait_for(lambda: len(_children(proc.pid)) == 2, "two workers")
        clients = [open_client(posts_thrift.Posts, "127.0.0.1", port) for _ in range(8)]
        try:
            token = factory.mint("alice")
            ids = {c.create_post(token, f"post {i}", "").id for i, c in enumerate(clients)}
            assert len(ids) == 8, "every worker writes the one shared store"
            assert len(clients[0].list_posts(token, 100, 0).posts) == 8
        finally:
            for c in clients:
                c.close()

        victim = sorted(_children(proc.pid))[0]
        os.kill(victim, signal.SIGKILL)
        _wait_for(
            lambda: victim not in _children(proc.pid) and len(_children(proc.pid)) == 2,
            "a replacement worker",
        )
        with contextlib.closing(open_client(posts_thrift.Posts, "127.0.0.1", port)) as c:
            assert len(c.list_posts(token, 100, 0).posts) == 8

        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
        # The supervisor said how the worker stopped, by the signal's name.
        assert re.search(
            r"worker [01] stopped with signal 9 \(SIGKILL\); starting a new one", err
        ), err


def test_auth_workers_serve_thrift_and_http(tmp_path: Path) -> None:
    data = tmp_path / "auth"
    subprocess.run(
        [sys.executable, "-m", "auth_rpc.auth.cli", "add-user", "alice", "--data-dir", str(data),
         "--password-stdin"],
        input="a long password\n", text=True, check=True, capture_output=True,
    )
    with serve(
        "auth_rpc.auth.cli", "serve", "--data-dir", str(data), "--port", "0", "--http-port", "0",
        "--workers", "2",
    ) as (proc, ready):
        match = re.search(r"thrift=[\d.]+:(\d+) http=(\S+)", ready)
        assert match, ready
        _wait_for(lambda: len(_children(proc.pid)) == 2, "two workers")
        kids = set()
        for _ in range(4):
            with contextlib.closing(
                open_client(auth_thrift.Auth, "127.0.0.1", int(match[1]))
            ) as c:
                pair = c.login("alice", "a long password")
                kids.add(TokenFactory.kid_of(pair.access_token))
                assert c.validate(pair.access_token).subject == "alice"
        assert len(kids) == 1, "every worker signs with the one key made before forking"
        assert requests.get(f"{match[2]}/healthz", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err


def _posts_under_load(
    port: int, token: str, stop: threading.Event, errors: list[BaseException]
) -> None:
    """Writes and page reads in a loop, as a serving posts-rpc sees them.

    A connection to a worker that the test kills is reset: the loop then
    reconnects (to a surviving or replacement worker). Anything else is an error.
    """
    i = 0
    while not stop.is_set():
        try:
            with contextlib.closing(open_client(posts_thrift.Posts, "127.0.0.1", port)) as c:
                while not stop.is_set():
                    c.create_post(token, f"load {i}", "")
                    c.list_posts(token, 20, 0)
                    i += 1
        except (ConnectionResetError, BrokenPipeError, TTransportException):
            continue
        except BaseException as exc:  # reported by the test
            errors.append(exc)
            return


def _read_from_another_process(db: Path) -> None:
    """What an operator's ``sqlite3 DATA/posts.db 'select count(*) from posts'`` does."""
    subprocess.run(
        [sys.executable, "-c",
         "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
         "print(c.execute('select count(*) from posts').fetchone()[0]); c.close()",
         str(db)],
        check=True, capture_output=True, timeout=60,
    )


def test_a_second_reader_of_the_posts_database_crashes_nothing(tmp_path: Path) -> None:
    """Regression: the page cache dropped SQLite's lock on ``posts.db-shm``.

    The next process to open the database then truncated the file and the
    serving posts-rpc died of SIGBUS on its next read of the mapping; with
    ``--workers`` a restarted worker killed the others the same way.
    """
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    factory = TokenFactory(
        key=SigningKey.hs256(secret.read_bytes()), issuer="urn:t", audience="posts",
        scopes=("posts:read", "posts:write"),
    )
    token = factory.mint("alice")
    data = tmp_path / "posts"
    with serve(
        "posts_rpc.cli", "serve", "--data-dir", str(data), "--port", "0",
        "--verify", "local", "--hs256-secret-file", str(secret), "--issuer", "urn:t",
        "--status-list", "off",  # tokens of an issuer without Token Status Lists
        "--workers", "2", log=tmp_path / "posts.log",
    ) as (proc, ready):
        port = int(re.search(r"thrift=[\d.]+:(\d+)", ready)[1])  # type: ignore[index]
        _wait_for(lambda: len(_children(proc.pid)) == 2, "two workers")
        with contextlib.closing(open_client(posts_thrift.Posts, "127.0.0.1", port)) as c:
            c.list_posts(token, 1, 0)  # the database exists once a worker has served
        db = data / DB_FILE_NAME
        stop, errors = threading.Event(), []
        load = [
            threading.Thread(target=_posts_under_load, args=(port, token, stop, errors))
            for _ in range(4)
        ]
        for t in load:
            t.start()
        try:
            workers = _children(proc.pid)
            for _ in range(10):
                _read_from_another_process(db)
            # A restarted worker is also a second process opening the database.
            os.kill(sorted(workers)[0], signal.SIGKILL)
            _wait_for(lambda: len(_children(proc.pid)) == 2, "a replacement worker")
            survivor = sorted(workers)[1]
            for _ in range(10):
                _read_from_another_process(db)
            assert survivor in _children(proc.pid), "a worker died while another process read"
            assert proc.poll() is None
        finally:
            stop.set()
            for t in load:
                t.join(timeout=60)
        assert not errors, errors
        with contextlib.closing(open_client(posts_thrift.Posts, "127.0.0.1", port)) as c:
            assert c.list_posts(token, 1, 0).posts
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        err = (tmp_path / "posts.log").read_text()
        assert proc.returncode == 0, err[-3000:]
        restarts = [line for line in err.splitlines() if "starting a new one" in line]
        assert len(restarts) == 1, restarts  # the worker the test killed, no other


def _posts_serve_args(tmp_path: Path, *extra: str) -> list[str]:
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_bytes(os.urandom(32))
    return [
        sys.executable, "-m", "posts_rpc.cli", "serve", "--data-dir", str(tmp_path / "posts"),
        "--verify", "local", "--hs256-secret-file", str(secret), "--issuer", "urn:t",
        "--status-list", "off", *extra,
    ]


def test_a_corrupt_posts_database_is_one_error_line_before_any_worker(tmp_path: Path) -> None:
    """Regression: with --workers the ready line came first, then every worker's traceback."""
    (tmp_path / "posts").mkdir(mode=0o700)
    (tmp_path / "posts" / DB_FILE_NAME).write_bytes(b"this is not an SQLite database" * 200)
    proc = subprocess.run(
        _posts_serve_args(tmp_path, "--port", "0", "--workers", "2"),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "ready" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("posts-rpc: error:")]
    assert len(errors) == 1, proc.stderr
    assert "file is not a database" in errors[0]  # SQLite's own words, not just "unavailable"
    assert "Traceback" not in proc.stderr


def test_address_in_use_names_the_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            _posts_serve_args(tmp_path, "--port", str(port)),
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 1
    assert f"127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr, proc.stderr


_SIGTERM_DURING_START = """
import os, signal, sys
from auth_rpc.serving.runner import run_workers

parent = os.getpid()

def start_child():
    # As a service manager stopping the whole process group does, just while
    # a worker is starting (opening its store): both processes get SIGTERM.
    os.kill(parent, signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    return lambda: None

sys.exit(run_workers(1, "ready", start_child))
"""


def test_sigterm_while_a_worker_starts_is_a_clean_stop() -> None:
    """Regression: a worker ran with the default SIGTERM action until it had started.

    A SIGTERM in that window killed it (-15) and the supervisor exited 1 (a
    failed stop under systemd). The signals are now blocked across fork and
    handled from the child's first instruction.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_DURING_START], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ready"


def test_workers_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    """Regression: kill -9 of posts-rpc left its workers serving and holding the port."""
    with serve(*_posts_serve_args(tmp_path, "--port", "0", "--workers", "2")[2:],
               log=tmp_path / "posts.log") as (proc, ready):
        port = int(re.search(r"thrift=[\d.]+:(\d+)", ready)[1])  # type: ignore[index]
        _wait_for(lambda: len(_children(proc.pid)) == 2, "two workers")
        workers = _children(proc.pid)
        proc.kill()
        proc.wait(timeout=60)
        _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and
                                  "zombie" not in _state(pid) for pid in workers),
                  "the workers to stop")
    with socket.socket() as again:  # the port is free again
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def _state(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "gone"
    return next((line for line in status.splitlines() if line.startswith("State:")), "").lower()


def _auth_from(source: str, port: int) -> Any:
    """A Thrift client of Auth whose connection comes from ``source`` (any 127.x.y.z)."""
    from thriftpy2.protocol import TCyBinaryProtocolFactory
    from thriftpy2.thrift import TClient
    from thriftpy2.transport import TCyBufferedTransportFactory, TSocket

    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    trans = TCyBufferedTransportFactory().get_transport(TSocket(sock=sock))
    return TClient(auth_thrift.Auth, TCyBinaryProtocolFactory().get_protocol(trans))


def _try_login(source: str, port: int, username: str, password: str) -> str:
    """``ok``, ``checked`` (Unauthenticated: the password was checked) or ``refused: MESSAGE``."""
    from auth_rpc.idl import common_thrift

    client = _auth_from(source, port)
    try:
        client.login(username, password)
        return "ok"
    except common_thrift.Unauthenticated:
        return "checked"
    except common_thrift.RateLimited as exc:
        return f"refused: {exc.message}"
    finally:
        client.close()


def test_auth_workers_check_at_most_five_passwords_of_a_user_in_all(tmp_path: Path) -> None:
    """Regression: with --workers N the throttle admitted 5 x N guesses.

    The in-flight limit was per process and each process wrote its count over
    the shared one. A parallel burst of wrong passwords for one user (20
    connections from 20 addresses, spread over both workers) now gets at most
    5 passwords checked in all - counted by the answers (``Unauthenticated``
    only once a password was checked), by the workers' "login failed" log
    lines and by the shared streak - and every later attempt is ``RateLimited``.
    """
    data = tmp_path / "auth"
    subprocess.run(
        [sys.executable, "-m", "auth_rpc.auth.cli", "add-user", "alice", "--data-dir", str(data),
         "--password-stdin"],
        input="a long password\n", text=True, check=True, capture_output=True,
    )
    log = tmp_path / "auth.log"
    with serve(
        "auth_rpc.auth.cli", "serve", "--data-dir", str(data), "--port", "0", "--http-port", "0",
        "--workers", "2", log=log,
    ) as (proc, ready):
        port = int(re.search(r"thrift=[\d.]+:(\d+)", ready)[1])  # type: ignore[index]
        _wait_for(lambda: len(_children(proc.pid)) == 2, "two workers")
        burst = 20
        barrier = threading.Barrier(burst)
        answers: list[str] = []

        def guess(i: int) -> None:
            barrier.wait(timeout=60)
            answers.append(_try_login(f"127.0.0.{10 + i}", port, "alice", f"wrong guess {i}"))

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(burst)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        in_burst = answers.count("checked")
        assert len(answers) == burst and "ok" not in answers, answers
        # Then one guess at a time until the throttle says so (at most 5 in all).
        checked = in_burst
        deadline = time.monotonic() + 60
        while True:
            answer = _try_login("127.0.0.99", port, "alice", "one more wrong guess")
            if answer == "checked":
                checked += 1
            elif "too many failed" in answer:
                break
            assert time.monotonic() < deadline, answer
            assert checked <= 5, (checked, answers)
        later = [_try_login("127.0.0.98", port, "alice", "a long password") for _ in range(3)]
        proc.send_signal(signal.SIGTERM)
        _, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
    logged = sum("login failed" in line for line in log.read_text().splitlines())
    import sqlite3

    with contextlib.closing(sqlite3.connect(data / "auth.sqlite3")) as conn:
        streak = conn.execute(
            "SELECT failures FROM throttle_streaks WHERE kind = 'logins' AND key = 'alice'"
        ).fetchone()
    print(f"\n[--workers 2] burst of {burst}: {in_burst} passwords checked "
          f"({len(answers) - in_burst} refused at once: "
          f"{sorted(set(a for a in answers if a != 'checked'))}); {checked} checked in all, "
          f"{logged} 'login failed' lines, shared streak {streak}")
    assert in_burst <= 5 and checked == 5 == logged, (in_burst, checked, logged)
    assert streak == (5,)
    assert all(a.startswith("refused: too many failed logins") for a in later), later
