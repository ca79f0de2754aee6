"""The public token guard on a service of the user's own, with its IDL outside the package.

``notes.thrift`` is written into ``tmp_path`` and includes the package's
``common.thrift``. It is served in-process (``serve_thrift``) and called by a
real thriftpy2 client over loopback, in two ways of loading it:

- ``load_idl``: the module uses the package's very exception classes;
- plain ``thriftpy2.load(..., include_dirs=[IDL_DIR])``: a second copy of
  ``common.thrift``'s classes; the guard maps errors by Thrift name, so the
  caller gets the same typed errors.

Then what class definition refuses: an unguarded or missing method, a token
argument the IDL lacks, a guarded method that does not declare the errors the
guard raises, malformed exceptions, the wrong number of arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import thriftpy2
from thriftpy2.thrift import TApplicationException

from auth_rpc.errors import (
    DependencyUnavailable,
    Forbidden,
    InvalidInput,
    NotFoundError,
    Throttled,
)
from auth_rpc.idl import IDL_DIR, common_thrift, load_idl
from auth_rpc.serving.rpc import RpcServer, current_call
from auth_rpc.serving.transport import open_client
from auth_rpc.testing import AUDIENCE, ISSUER, TokenFactory
from auth_rpc.verify import (
    GuardedHandler,
    Principal,
    public,
    public_methods,
    required_scopes,
    requires,
)
from auth_rpc.verify.verifiers import LocalVerifier

READ, WRITE = "notes:read", "notes:write"

GUARD_THROWS = """
    1: common.Unauthenticated unauthenticated,
    2: common.PermissionDenied permission_denied,
    3: common.Unavailable unavailable"""

NOTES_IDL = f"""
include "common.thrift"

struct Note {{
  1: i64 id
  2: string author
  3: string text
}}

// Containers of a common exception: load_idl replaces classes recursively.
struct Report {{
  1: list<map<string, common.NotFound>> failures
}}

service Notes {{
  Note create_note(1: string token, 2: string text)
    throws ({GUARD_THROWS},
            4: common.InvalidArgument invalid_argument,
            5: common.RateLimited rate_limited)

  // The token is not the first argument.
  Note get_note(1: i64 id, 2: string token)
    throws ({GUARD_THROWS},
            4: common.NotFound not_found)

  string health()
    throws (1: common.Unavailable unavailable)
}}
"""


def write_idl(directory: Path, text: str, name: str = "notes.thrift") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def make_handler_cls(module: Any) -> type[GuardedHandler]:
    """A complete handler of ``module.Notes`` (one class per loaded module)."""

    class NotesHandler(GuardedHandler, service=module.Notes):
        def __init__(self, verifier: Any) -> None:
            super().__init__(verifier)
            self.notes: dict[int, Any] = {}
            self.subjects: list[str] = []
            self.healthy = True

        @requires(WRITE)
        def create_note(self, principal: Principal, text: Any) -> Any:
            if not text:
                raise InvalidInput("text", "must not be empty")
            if text == "slow down":
                raise Throttled("too many notes", retry_after_ms=1500)
            note = module.Note(id=len(self.notes) + 1, author=principal.subject, text=text)
            self.notes[note.id] = note
            return note

        @requires(READ, WRITE)
        def get_note(self, principal: Principal, id: Any) -> Any:
            call = current_call()
            self.subjects.append(call.subject if call else "")
            if id == 999:
                # RateLimited is not declared by get_note: a handler bug.
                raise Throttled("not declared here", retry_after_ms=1)
            note = self.notes.get(id)
            if note is None:
                raise NotFoundError("no such note")
            if note.author != principal.subject:
                raise Forbidden("not your note")
            return note

        @public
        def health(self) -> str:
            if not self.healthy:
                raise DependencyUnavailable("database unreachable")
            return "ok"

    return NotesHandler


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
def tokens() -> TokenFactory:
    """Mints tokens with a key of its own (no Auth server needed)."""
    return TokenFactory(key=TokenFactory.new_key("EdDSA"), issuer=ISSUER, audience=AUDIENCE)


@pytest.fixture
def verifier(tokens: TokenFactory) -> Iterator[LocalVerifier]:
    v = LocalVerifier(
        public_key_pem=tokens.key.public_pem(),
        algorithms=[tokens.key.alg],
        issuer=ISSUER,
        audience=AUDIENCE,
        cache_ttl_s=0,
        status_list="off",  # tokens of a key of its own, without Token Status Lists
    )
    yield v
    v.close()


@pytest.fixture
def idl_path(tmp_path: Path) -> Path:
    return write_idl(tmp_path / "my-service" / "idl", NOTES_IDL)


LOADERS: dict[str, Callable[[Path], Any]] = {
    "load_idl": lambda path: load_idl(path),
    # A module name of its own: thriftpy2's cache (by name, else by path)
    # must not hand back the module load_idl completed.
    "plain": lambda path: thriftpy2.load(
        str(path), module_name="plain_notes_thrift", include_dirs=[str(IDL_DIR)]
    ),
}


@pytest.fixture(params=list(LOADERS))
def notes(request: pytest.FixtureRequest, idl_path: Path) -> Any:
    """The loaded ``notes.thrift`` module, one way or the other."""
    module = LOADERS[request.param](idl_path)
    if request.param == "plain":
        # What makes this case matter: a second copy of common.thrift's classes.
        assert module.common.Unauthenticated is not common_thrift.Unauthenticated
    return module


Connect = Callable[..., Any]


@pytest.fixture
def connect(serve_thrift: Callable[..., RpcServer]) -> Iterator[Connect]:
    """``connect(module, handler)``: serve it on port 0 and return a loopback client."""
    clients: list[Any] = []

    def _connect(module: Any, handler: Any) -> Any:
        server = serve_thrift(module.Notes, handler)
        client = open_client(module.Notes, "127.0.0.1", server.port, timeout_s=10)
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        client.close()


# -- load_idl: the very classes of the package ---------------------------------------


def test_load_idl_uses_the_package_exception_classes(idl_path: Path) -> None:
    module = load_idl(idl_path)
    assert module.common is common_thrift
    assert module.common.Unauthenticated is common_thrift.Unauthenticated
    for method in module.Notes.thrift_services:
        spec = getattr(module.Notes, f"{method}_result").thrift_spec
        for entry in spec.values():
            if entry[1] != "success":
                assert entry[2] is getattr(common_thrift, entry[2].__name__), (method, entry)
    failures = module.Report.thrift_spec[1]
    assert failures[2][1][1][1] is common_thrift.NotFound  # list<map<string, NotFound>>
    assert module.__thrift_meta__["includes"] == [common_thrift]


def test_load_idl_of_a_package_file_is_the_package_module() -> None:
    assert load_idl(IDL_DIR / "common.thrift") is common_thrift


def test_load_idl_searches_the_users_directories_first(tmp_path: Path) -> None:
    # A common.thrift of the user's own, in an include directory, wins over the package's.
    write_idl(tmp_path / "mine", "exception Unauthenticated { 1: string message }\n"
              "exception Teapot { 1: string message }\n", name="common.thrift")
    path = write_idl(tmp_path / "svc", 'include "common.thrift"\n'
                     "service S { void ping() throws (1: common.Teapot teapot) }\n")
    module = load_idl(path, module_name="mine_thrift", include_dirs=[tmp_path / "mine"])
    assert module.common is not common_thrift
    assert module.common.Teapot.__name__ == "Teapot"


# -- the typed errors reach the caller, whichever way the IDL was loaded --------------


def test_bad_tokens_are_typed_unauthenticated_and_the_connection_stays(
    notes: Any,
    verifier: LocalVerifier,
    tokens: TokenFactory,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    handler = make_handler_cls(notes)(verifier)
    client = connect(notes, handler)
    created = client.create_note(tokens.mint("alice", [WRITE]), "hello")
    assert created.author == "alice"

    # Signed by another key claiming the real key's kid: only the signature is wrong.
    forger = TokenFactory(
        key=TokenFactory.new_key("EdDSA", kid=tokens.key.kid), issuer=ISSUER, audience=AUDIENCE
    )
    bad = {
        "missing": None,
        "empty": "",
        "garbage": "not-a-jwt",
        "oversized": "a" * 10_000,
        "expired": tokens.expired("alice", [READ, WRITE]),
        "forged": forger.mint("alice", [READ, WRITE]),
        "wrong-audience": tokens.mint("alice", [READ, WRITE], audience="another-service"),
    }
    for token in bad.values():
        with pytest.raises(notes.common.Unauthenticated):
            client.create_note(token, "sneaky")
        with pytest.raises(notes.common.Unauthenticated):
            client.get_note(created.id, token)  # the token is the second argument
    assert list(handler.notes) == [created.id]  # nothing written

    # Same connection, still usable.
    assert client.get_note(created.id, tokens.mint("alice", [READ])) == created
    assert handler.subjects[-1] == "alice"  # recorded for the access log
    for token in [*forger.minted, *tokens.minted]:
        assert token not in caplog.text


def test_a_token_without_the_scope_is_typed_permission_denied(
    notes: Any, verifier: LocalVerifier, tokens: TokenFactory, connect: Connect
) -> None:
    handler = make_handler_cls(notes)(verifier)
    client = connect(notes, handler)
    for scopes in ([], [READ], ["notes:readwrite", "openid"]):
        with pytest.raises(notes.common.PermissionDenied) as info:
            client.create_note(tokens.mint("alice", scopes), "x")
        assert "notes:write" in info.value.message
    with pytest.raises(notes.common.PermissionDenied):
        client.get_note(1, tokens.mint("alice", ["posts:read"]))
    assert handler.notes == {}
    # Either declared scope suffices.
    note = client.create_note(tokens.mint("alice", [WRITE]), "x")
    assert client.get_note(note.id, tokens.mint("alice", [WRITE])) == note


def test_a_verifier_that_cannot_decide_gives_typed_unavailable(
    notes: Any, tokens: TokenFactory, connect: Connect
) -> None:
    asked: list[str] = []

    class Down:
        def verify(self, token: str) -> Principal:
            asked.append("x")
            raise DependencyUnavailable("auth service unreachable")

        def close(self) -> None:
            pass

    handler = make_handler_cls(notes)(Down())
    client = connect(notes, handler)
    token = tokens.mint("alice", [READ, WRITE])
    with pytest.raises(notes.common.Unavailable):
        client.create_note(token, "x")
    with pytest.raises(notes.common.Unavailable):
        client.get_note(1, token)
    with pytest.raises(notes.common.Unauthenticated):
        client.get_note(1, None)  # refused before the verifier is asked
    assert len(asked) == 2
    assert client.health() == "ok"  # the connection is still usable
    assert handler.notes == {}


def test_handler_errors_are_mapped_to_the_declared_exceptions(
    notes: Any, verifier: LocalVerifier, tokens: TokenFactory, connect: Connect
) -> None:
    client = connect(notes, make_handler_cls(notes)(verifier))
    alice = tokens.mint("alice", [READ, WRITE])
    with pytest.raises(notes.common.InvalidArgument) as invalid:
        client.create_note(alice, "")
    assert invalid.value.message == "text: must not be empty"
    with pytest.raises(notes.common.RateLimited) as limited:
        client.create_note(alice, "slow down")
    assert limited.value.retry_after_ms == 1500
    with pytest.raises(notes.common.NotFound):
        client.get_note(42, alice)
    note = client.create_note(alice, "mine")
    with pytest.raises(notes.common.PermissionDenied):
        client.get_note(note.id, tokens.mint("bob", [READ]))


def test_an_undeclared_internal_error_is_a_logged_refusal_without_the_token(
    notes: Any,
    verifier: LocalVerifier,
    tokens: TokenFactory,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    client = connect(notes, make_handler_cls(notes)(verifier))
    token = tokens.mint("alice", [READ])
    with pytest.raises(TApplicationException) as info:
        client.get_note(999, token)  # raises Throttled; get_note declares no RateLimited
    assert info.value.type == TApplicationException.INTERNAL_ERROR
    bugs = [r.getMessage() for r in caplog.records if r.name == "auth_rpc.verify.guard"]
    assert len(bugs) == 1
    assert "handler bug" in bugs[0] and "NotesHandler.get_note" in bugs[0]
    assert "Throttled" in bugs[0] and "RateLimited" in bugs[0]
    assert token not in caplog.text
    assert client.health() == "ok"  # the connection is still usable


def test_public_methods_take_no_token_and_map_errors(
    notes: Any, verifier: LocalVerifier, connect: Connect
) -> None:
    cls = make_handler_cls(notes)
    assert public_methods(cls) == {"health"}
    assert required_scopes(cls.health) is None
    assert required_scopes(cls.get_note) == {READ, WRITE}
    handler = cls(verifier)
    client = connect(notes, handler)
    assert client.health() == "ok"
    handler.healthy = False
    with pytest.raises(notes.common.Unavailable):
        client.health()


# -- calling the handler directly -----------------------------------------------------


def test_the_token_may_be_passed_by_keyword(
    idl_path: Path, verifier: LocalVerifier, tokens: TokenFactory
) -> None:
    notes = load_idl(idl_path)
    handler: Any = make_handler_cls(notes)(verifier)
    note = handler.create_note(text="kw", token=tokens.mint("alice", [WRITE]))
    assert handler.get_note(id=note.id, token=tokens.mint("alice", [READ])) == note
    assert handler.get_note(note.id, token=tokens.mint("alice", [READ])) == note
    with pytest.raises(common_thrift.Unauthenticated):
        handler.get_note(id=note.id)


def test_non_string_tokens_and_subjectless_principals_are_refused(idl_path: Path) -> None:
    notes = load_idl(idl_path)
    asked: list[Any] = []

    class NoSubject:
        def verify(self, token: str) -> Principal:
            asked.append(token)
            return Principal(subject="", scopes=frozenset({READ, WRITE}), expires_at=2**40,
                             token_id="j", client_id="c")

        def close(self) -> None:
            pass

    handler: Any = make_handler_cls(notes)(NoSubject())
    for token in (b"bytes", 7, ["a"], "a" * 8193):
        with pytest.raises(common_thrift.Unauthenticated):
            handler.create_note(token, "x")
    assert asked == []  # refused before the verifier
    with pytest.raises(common_thrift.Unauthenticated, match="subject"):
        handler.create_note("any-token", "x")
    assert handler.notes == {}


def test_a_decorated_method_outside_a_guarded_handler_refuses() -> None:
    class NotAHandler:
        @requires(READ)
        def get(self, principal: Principal) -> str:
            return "secret"

    with pytest.raises(TypeError, match="GuardedHandler"):
        NotAHandler().get("any-token")


# -- what class definition refuses ------------------------------------------------------


def _methods(module: Any, **overrides: Any) -> dict[str, Any]:
    """The methods of a complete handler of ``module.Notes``, some replaced (None: removed)."""
    cls = make_handler_cls(module)

    def original(name: str) -> Any:
        return vars(cls)[name].__rpc_guard__.func

    methods = {
        "create_note": requires(WRITE)(original("create_note")),
        "get_note": requires(READ)(original("get_note")),
        "health": public(original("health")),
    }
    methods.update(overrides)
    return {name: m for name, m in methods.items() if m is not None}


def _define(module: Any, methods: dict[str, Any]) -> type:
    return type("Handler", (GuardedHandler,), methods, service=module.Notes)


def test_a_complete_handler_class_is_accepted(idl_path: Path) -> None:
    notes = load_idl(idl_path)
    assert _define(notes, _methods(notes)).thrift_service is notes.Notes


def test_every_unguarded_or_missing_method_is_named(idl_path: Path) -> None:
    notes = load_idl(idl_path)

    def get_note(self: Any, principal: Any, id: Any) -> None:
        return None

    with pytest.raises(TypeError) as info:
        _define(notes, _methods(notes, create_note=None, get_note=get_note))
    message = str(info.value)
    assert "create_note: not implemented" in message
    assert "get_note: not guarded" in message
    assert "health" not in message  # declared @public: a decision, not an omission


def test_a_public_method_does_not_excuse_another_unguarded_one(idl_path: Path) -> None:
    notes = load_idl(idl_path)

    def health(self: Any) -> str:
        return "ok"

    with pytest.raises(TypeError, match=r"health: not guarded.*@public"):
        _define(notes, _methods(notes, health=health))


def test_the_named_token_argument_must_be_in_the_idl(idl_path: Path) -> None:
    notes = load_idl(idl_path)

    def get_note(self: Any, principal: Any, id: Any) -> None:
        return None

    with pytest.raises(TypeError, match="get_note: the IDL has no `string access_token` argument"):
        _define(notes, _methods(notes, get_note=requires(READ, token="access_token")(get_note)))


def test_a_token_argument_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    path = write_idl(tmp_path, 'include "common.thrift"\n'
                     f"service Notes {{ void f(1: i64 token) throws ({GUARD_THROWS}) }}\n")
    notes = load_idl(path)
    with pytest.raises(TypeError, match="f: the IDL has no `string token` argument"):
        _define(notes, {"f": requires(READ)(lambda self, principal: None)})


def test_the_wrong_number_of_arguments_is_refused(idl_path: Path) -> None:
    notes = load_idl(idl_path)

    def get_note(self: Any, principal: Any) -> None:  # id forgotten
        return None

    def health(self: Any, extra: Any) -> None:
        return None

    with pytest.raises(TypeError) as info:
        _define(notes, _methods(notes, get_note=requires(READ)(get_note),
                                health=public(health)))
    assert "get_note: takes 0 arguments after the principal, the IDL declares 1" in str(info.value)
    assert "health: takes 1 arguments after self, the IDL declares 0" in str(info.value)


@pytest.mark.parametrize("left_out", ["Unauthenticated", "PermissionDenied", "Unavailable"])
def test_a_guarded_method_must_declare_what_the_guard_raises(
    tmp_path: Path, left_out: str
) -> None:
    throws = ", ".join(
        f"{i}: common.{name} e{i}"
        for i, name in enumerate(["Unauthenticated", "PermissionDenied", "Unavailable"], 1)
        if name != left_out
    )
    path = write_idl(tmp_path, f'include "common.thrift"\n'
                     f"service Notes {{ void f(1: string token) throws ({throws}) }}\n")
    notes = load_idl(path)
    with pytest.raises(TypeError, match=f"f: does not declare {left_out} "):
        _define(notes, {"f": requires(READ)(lambda self, principal: None)})


def test_exceptions_are_resolved_by_name_and_fields_in_any_idl(tmp_path: Path) -> None:
    # No common.thrift at all: the service's own exceptions of the same names.
    own = """
exception Unauthenticated { 1: string message }
exception PermissionDenied { 1: string message }
exception Unavailable { 1: string message }
exception RateLimited { 1: string message }
service Notes {
  void f(1: string token)
    throws (1: Unauthenticated a, 2: PermissionDenied b, 3: Unavailable c)
  void g(1: string token)
    throws (1: Unauthenticated a, 2: PermissionDenied b, 3: Unavailable c, 4: RateLimited d)
}
"""
    notes = load_idl(write_idl(tmp_path, own, "own.thrift"))
    with pytest.raises(TypeError) as info:
        _define(notes, {"f": requires(READ)(lambda self, principal: None),
                        "g": requires(READ)(lambda self, principal: None)})
    assert str(info.value).endswith(
        "g: its exception RateLimited has no field `i64 retry_after_ms`"
    )
    assert "f:" not in str(info.value)


def test_a_guard_exception_without_a_message_is_refused(tmp_path: Path) -> None:
    own = """
exception Unauthenticated { 1: string reason }
exception PermissionDenied { 1: string message }
exception Unavailable { 1: string message }
service Notes {
  void f(1: string token) throws (1: Unauthenticated a, 2: PermissionDenied b, 3: Unavailable c)
}
"""
    notes = load_idl(write_idl(tmp_path, own, "own.thrift"))
    with pytest.raises(TypeError, match="f: its exception Unauthenticated has no field "
                                        "`string message`"):
        _define(notes, {"f": requires(READ)(lambda self, principal: None)})


def test_plain_thriftpy2_load_is_checked_the_same(idl_path: Path) -> None:
    notes = LOADERS["plain"](idl_path)

    def get_note(self: Any, principal: Any, id: Any) -> None:
        return None

    with pytest.raises(TypeError, match="get_note: not guarded"):
        _define(notes, _methods(notes, get_note=get_note))


def test_declarations_cannot_be_stacked() -> None:
    def f(self: Any) -> None:
        return None

    with pytest.raises(ValueError, match="already declared"):
        requires(READ)(public(f))
    with pytest.raises(ValueError, match="already declared"):
        public(requires(READ)(f))


@pytest.mark.parametrize("token", ["", "two words", 7])
def test_requires_needs_a_token_argument_name(token: Any) -> None:
    with pytest.raises(ValueError):
        requires(READ, token=token)
