"""The session with a service of the user's own: an IDL loaded outside the package.

``notes.thrift`` is written into ``tmp_path`` and loaded with plain
``thriftpy2.load``, so its ``common`` module (and every exception class in it)
is its own, not ``auth_rpc.idl.common_thrift``. A hand-written handler checks
the tokens itself with a :class:`auth_rpc.verify.LocalVerifier` against the
Auth server's key, and raises the service's own exception classes.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import thriftpy2

from auth_rpc.errors import TokenRejected
from auth_rpc.idl import IDL_DIR, common_thrift
from auth_rpc.testing import AUDIENCE, ISSUER
from auth_rpc.verify import LocalVerifier
from client import (
    ConnectionLost,
    Session,
    TransportError,
    Unauthenticated,
    is_common_error,
)

NOTES_IDL = """\
include "common.thrift"

struct Note {
  1: i64 id
  2: string text
  3: string author
}

service Notes {
  Note get_note(1: string token, 2: i64 note_id)
    throws (1: common.Unauthenticated unauthenticated,
            2: common.NotFound not_found)

  // Not safe to repeat, whatever its name says.
  i64 get_and_increment(1: string token, 2: i64 counter_id)
    throws (1: common.Unauthenticated unauthenticated)

  // The token need not come first: it is found by name.
  Note put_note(1: i64 note_id, 2: string text, 3: string token)
    throws (1: common.Unauthenticated unauthenticated)

  // Another name for the token argument (token_arg="access_token").
  string whoami(1: string access_token)
    throws (1: common.Unauthenticated unauthenticated)

  // No token at all: called as it is.
  string version()
}
"""


@pytest.fixture
def notes_thrift(tmp_path: Path) -> ModuleType:
    path = tmp_path / "idl" / "notes.thrift"
    path.parent.mkdir()
    path.write_text(NOTES_IDL)
    module: ModuleType = thriftpy2.load(
        str(path), module_name="notes_thrift", include_dirs=[str(IDL_DIR)]
    )
    # Its own common module: the project's classes would not match.
    assert module.common.Unauthenticated is not common_thrift.Unauthenticated
    assert not issubclass(module.common.Unauthenticated, common_thrift.Unauthenticated)
    return module


class NotesHandler:
    """Notes, checking each token; counts its calls as ``(method, outcome)``.

    ``revoke(token)`` refuses that token from now on (by its ``jti``);
    ``refuse_all`` refuses every token. Tokens are never recorded.
    """

    def __init__(self, module: ModuleType, verifier: LocalVerifier) -> None:
        self._module = module
        self._verifier = verifier
        self._lock = threading.Lock()
        self._revoked: set[str] = set()
        self._notes: dict[int, tuple[str, str]] = {}
        self._counters: dict[int, int] = {}
        self.refuse_all = False
        self.calls: list[tuple[str, str]] = []

    def revoke(self, token: str) -> None:
        with self._lock:
            self._revoked.add(self._verifier.verify(token).token_id)

    def count(self, method: str) -> int:
        with self._lock:
            return sum(1 for name, _ in self.calls if name == method)

    def _record(self, method: str, outcome: str) -> None:
        with self._lock:
            self.calls.append((method, outcome))

    def _subject(self, method: str, token: str) -> str:
        refusal = None
        try:
            principal = self._verifier.verify(token)
        except TokenRejected as exc:
            refusal = exc.message
        else:
            with self._lock:
                if self.refuse_all or principal.token_id in self._revoked:
                    refusal = "token refused"
        if refusal is not None:
            self._record(method, "Unauthenticated")
            raise self._module.common.Unauthenticated(message=refusal)
        return principal.subject

    def get_note(self, token: str, note_id: int) -> Any:
        author = self._subject("get_note", token)
        with self._lock:
            found = self._notes.get(note_id)
        if found is None:
            self._record("get_note", "NotFound")
            raise self._module.common.NotFound(message=f"no note {note_id}")
        self._record("get_note", "ok")
        return self._module.Note(id=note_id, text=found[0], author=found[1] or author)

    def get_and_increment(self, token: str, counter_id: int) -> int:
        self._subject("get_and_increment", token)
        with self._lock:
            value = self._counters.get(counter_id, 0) + 1
            self._counters[counter_id] = value
        self._record("get_and_increment", "ok")
        return value

    def put_note(self, note_id: int, text: str, token: str) -> Any:
        author = self._subject("put_note", token)
        with self._lock:
            self._notes[note_id] = (text, author)
        self._record("put_note", "ok")
        return self._module.Note(id=note_id, text=text, author=author)

    def whoami(self, access_token: str) -> str:
        subject = self._subject("whoami", access_token)
        self._record("whoami", "ok")
        return subject

    def version(self) -> str:
        self._record("version", "ok")
        return "1"


@pytest.fixture
def notes_server(
    notes_thrift: ModuleType, auth_server: Any, serve_thrift: Callable[..., Any]
) -> Iterator[Any]:
    """A Notes server (``.handler``: the :class:`NotesHandler`) trusting ``auth_server``."""
    verifier = LocalVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        public_key_pem=auth_server.service.signing_key().public_pem(),
        cache_ttl_s=0,
        status_list_prefix=auth_server.service.status_list_prefix,
    )
    handler = NotesHandler(notes_thrift, verifier)
    server = serve_thrift(notes_thrift.Notes, handler)
    server.handler = handler
    yield server
    verifier.close()


@pytest.fixture
def session(make_session: Callable[..., Session]) -> Iterator[Session]:
    session = make_session("alice")
    yield session
    session.close()


def _addr(port: int) -> str:
    return f"127.0.0.1:{port}"


# --------------------------------------------------------------------------- tokens


def test_methods_without_the_token_whatever_its_position(
    notes_thrift: ModuleType, notes_server: Any, session: Session
) -> None:
    with session.client(notes_thrift.Notes, _addr(notes_server.port)) as notes:
        assert notes.put_note(7, "hello").author == "alice"  # token last, filled in
        assert notes.get_note(note_id=7).text == "hello"
        assert notes.version() == "1"  # no token argument: called as it is
        with pytest.raises(notes_thrift.common.NotFound):
            notes.get_note(8)
        with pytest.raises(TypeError, match="unexpected keyword"):
            notes.get_note(token="x")
    with session.client(
        notes_thrift.Notes, _addr(notes_server.port), token_arg="access_token"
    ) as notes:
        assert notes.whoami() == "alice"


def test_a_refused_token_is_renewed_once_and_the_call_retried(
    notes_thrift: ModuleType, notes_server: Any, session: Session, auth_calls: Any
) -> None:
    handler = notes_server.handler
    notes = session.client(notes_thrift.Notes, _addr(notes_server.port))
    assert notes.get_and_increment(counter_id=1) == 1
    refused = session.tokens.access_token
    handler.revoke(refused)

    # Not safe to repeat, yet retried: the refusal says it was not done.
    assert notes.get_and_increment(counter_id=1) == 2
    assert handler.calls[1:] == [
        ("get_and_increment", "Unauthenticated"),
        ("get_and_increment", "ok"),
    ]
    assert auth_calls.count("refresh") == 1  # renewed once
    assert session.tokens.access_token != refused
    assert notes.connections_opened == 1  # a refusal leaves the connection usable


def test_a_retry_refused_too_raises_the_services_own_unauthenticated(
    notes_thrift: ModuleType, notes_server: Any, session: Session, auth_calls: Any
) -> None:
    handler = notes_server.handler
    handler.refuse_all = True
    notes = session.client(notes_thrift.Notes, _addr(notes_server.port))
    with pytest.raises(notes_thrift.common.Unauthenticated) as caught:
        notes.get_note(1)
    assert type(caught.value) is notes_thrift.common.Unauthenticated  # unchanged
    assert not isinstance(caught.value, Unauthenticated)  # not the project's class
    assert is_common_error(caught.value, "Unauthenticated")
    assert handler.calls == [("get_note", "Unauthenticated")] * 2  # one retry, no loop
    assert auth_calls.count("refresh") == 1  # one renewal

    with pytest.raises(notes_thrift.common.Unauthenticated):
        notes.put_note(1, "x")
    assert handler.count("put_note") == 2
    assert auth_calls.count("refresh") == 2


def test_is_common_error_goes_by_name_and_fields(
    notes_thrift: ModuleType, tmp_path: Path
) -> None:
    ours = notes_thrift.common.Unauthenticated(message="no")
    assert is_common_error(ours, "Unauthenticated")
    assert is_common_error(common_thrift.Unauthenticated(message="no"), "Unauthenticated")
    assert is_common_error(notes_thrift.common.RateLimited(message="slow"), "RateLimited")
    assert is_common_error(ours, "PermissionDenied", "Unauthenticated")
    assert not is_common_error(ours, "PermissionDenied")
    assert not is_common_error(ValueError("Unauthenticated"), "Unauthenticated")

    # Same name, other fields: not the common exception.
    other = tmp_path / "other.thrift"
    other.write_text(
        "exception Unauthenticated { 1: i32 code }\n"
        "exception RateLimited { 1: string message }\n"
    )
    lookalike = thriftpy2.load(str(other), module_name="other_thrift")
    assert not is_common_error(lookalike.Unauthenticated(code=1), "Unauthenticated")
    assert not is_common_error(lookalike.RateLimited(message="m"), "RateLimited")
    with pytest.raises(ValueError, match=r"common\.thrift"):
        is_common_error(ours, "Unauthorised")


# --------------------------------------------------------------------------- lost connections


def test_a_lost_reply_is_not_retried_unless_declared_safe(
    notes_thrift: ModuleType,
    notes_server: Any,
    session: Session,
    drop_reply_proxy: Callable[..., Any],
) -> None:
    handler = notes_server.handler
    proxy = drop_reply_proxy(notes_server.port, drops=2)
    notes = session.client(notes_thrift.Notes, _addr(proxy.port))
    assert notes.safe_to_repeat == frozenset()
    with pytest.raises(ConnectionLost, match="may or may not"):
        notes.get_and_increment(counter_id=1)
    assert handler.count("get_and_increment") == 1  # it was done, once
    # No guessing from the name either: get_note was not declared safe.
    handler.put_note(5, "five", session.access_token())
    with pytest.raises(ConnectionLost):
        notes.get_note(5)
    assert handler.count("get_note") == 1
    # The next call goes out on a new connection; the counter shows one run.
    assert notes.get_and_increment(counter_id=1) == 2
    assert notes.connections_opened == 3


def test_a_lost_reply_of_a_method_declared_safe_is_retried_once(
    notes_thrift: ModuleType,
    notes_server: Any,
    session: Session,
    drop_reply_proxy: Callable[..., Any],
) -> None:
    handler = notes_server.handler
    proxy = drop_reply_proxy(notes_server.port, drops=1)
    notes = session.client(
        notes_thrift.Notes,
        _addr(proxy.port),
        safe_to_repeat={"get_and_increment", "get_note"},
    )
    # The caller said so: the first run's reply was lost, the retry's arrives.
    assert notes.get_and_increment(counter_id=1) == 2
    assert handler.count("get_and_increment") == 2
    assert notes.connections_opened == 2


def test_a_method_declared_safe_is_retried_once_only(
    notes_thrift: ModuleType,
    notes_server: Any,
    session: Session,
    drop_reply_proxy: Callable[..., Any],
) -> None:
    handler = notes_server.handler
    proxy = drop_reply_proxy(notes_server.port, drops=5)
    notes = session.client(
        notes_thrift.Notes, _addr(proxy.port), safe_to_repeat=["get_and_increment"]
    )
    with pytest.raises(TransportError) as caught:
        notes.get_and_increment(counter_id=1)
    assert not isinstance(caught.value, ConnectionLost)  # safe to repeat: no doubt to report
    assert handler.count("get_and_increment") == 2  # once, and one retry


def test_a_request_that_never_left_is_retried_once_whatever_the_method(
    notes_thrift: ModuleType,
    notes_server: Any,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = notes_server.handler
    notes = session.client(notes_thrift.Notes, _addr(notes_server.port))
    assert notes.get_and_increment(counter_id=1) == 1
    (conn,) = notes._pool._idle
    original = conn.call

    def call_on_a_socket_shut_for_writing(method: str, arguments: dict[str, Any]) -> Any:
        # After the pool's staleness check: the send fails (EPIPE) before
        # any byte of the request leaves.
        conn._client._iprot.trans.sock.shutdown(socket.SHUT_WR)
        return original(method, arguments)

    monkeypatch.setattr(conn, "call", call_on_a_socket_shut_for_writing)
    with caplog.at_level(logging.INFO, logger="client.session"):
        assert notes.get_and_increment(counter_id=1) == 2
    assert "retrying get_and_increment once" in caplog.text
    assert handler.count("get_and_increment") == 2  # the failed attempt never arrived
    assert notes.connections_opened == 2


# --------------------------------------------------------------------------- construction


def test_declared_names_are_checked_against_the_service(
    notes_thrift: ModuleType, notes_server: Any, session: Session
) -> None:
    addr = _addr(notes_server.port)
    with pytest.raises(ValueError, match="get_notes"):
        session.client(notes_thrift.Notes, addr, safe_to_repeat={"get_note", "get_notes"})
    with pytest.raises(TypeError, match="not a string"):
        session.client(notes_thrift.Notes, addr, safe_to_repeat="get_note")
    with pytest.raises(ValueError, match="tokn"):
        session.client(notes_thrift.Notes, addr, token_arg="tokn")
    with pytest.raises(ValueError, match="HOST:PORT"):
        session.client(notes_thrift.Notes, "127.0.0.1")  # no default port but Posts'
    assert session.posts("127.0.0.1").safe_to_repeat == {"get_post", "list_posts"}
    assert session.posts("127.0.0.1", safe_to_repeat=()).safe_to_repeat == frozenset()
    assert session.client(
        notes_thrift.Notes, addr, safe_to_repeat=("get_note",)
    ).safe_to_repeat == {"get_note"}
