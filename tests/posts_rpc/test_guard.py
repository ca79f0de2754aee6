"""THE GUARD TEST: every method of ``service Posts``, walked from the IDL, refuses bad tokens.

The methods and their arguments come from ``posts_thrift.Posts`` (its
``thrift_services`` and each ``<method>_args.thrift_spec``), so a method added
to the IDL is tried here without anyone editing this file. For each: a
missing (``None``), empty, garbage, expired, wrongly signed, wrong-audience
and wrong-issuer token gets ``Unauthenticated``; a valid token without the
method's scope gets ``PermissionDenied``; a verifier that cannot decide
(the Auth service is down) gets ``Unavailable``. And nothing is written.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from thriftpy2.thrift import TType

from auth_rpc.errors import DependencyUnavailable
from auth_rpc.idl import common_thrift, posts_thrift
from auth_rpc.serving.transport import open_client
from auth_rpc.verify.guard import GuardedHandler, required_scopes, requires
from auth_rpc.verify.principal import Principal
from auth_rpc.verify.verifiers import ThriftVerifier
from posts_rpc.guard import SCOPE_ADMIN, SCOPE_READ, SCOPE_WRITE
from posts_rpc.handler import PostsHandler
from posts_rpc.server import PostsServer
from posts_rpc.store import PostRow

Mint = Callable[..., str]

ISSUER_PLACEHOLDER = "https://auth.posts.test"
ALL_SCOPES = frozenset({SCOPE_READ, SCOPE_WRITE, SCOPE_ADMIN})
METHODS: list[str] = list(posts_thrift.Posts.thrift_services)

#: A valid value of each IDL argument type (the guard must refuse before it matters).
_SAMPLE = {TType.STRING: "sample", TType.I64: 1, TType.I32: 0, TType.BOOL: True, TType.I16: 1,
           TType.BYTE: 1, TType.DOUBLE: 1.0}


def _rest_of_args(method: str) -> list[Any]:
    """Sample values for every argument after the token, in IDL order."""
    spec = getattr(posts_thrift.Posts, f"{method}_args").thrift_spec
    ids = sorted(spec)
    assert spec[ids[0]][:2] == (TType.STRING, "token"), f"{method}: first argument is not the token"
    return [_SAMPLE[spec[i][0]] for i in ids[1:]]


def _needed(method: str) -> frozenset[str]:
    scopes = required_scopes(getattr(PostsHandler, method))
    assert scopes, f"{method} is not guarded"
    return scopes


BAD_TOKENS: dict[str, Callable[[Mint], Any]] = {
    "missing": lambda mint: None,
    "empty": lambda mint: "",
    "garbage": lambda mint: "not-a-jwt",
    "garbage-jwt-shape": lambda mint: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.AAAA",
    "oversized": lambda mint: "a" * 100_000,
    "expired": lambda mint: mint(scope=" ".join(ALL_SCOPES), ttl_s=300, age_s=3600),
    "not-yet-valid": lambda mint: mint(scope=" ".join(ALL_SCOPES), age_s=-3600),
    "wrong-key": lambda mint: mint(scope=" ".join(ALL_SCOPES), key=b"k" * 32),
    "wrong-audience": lambda mint: mint(scope=" ".join(ALL_SCOPES), aud="another-service"),
    "wrong-issuer": lambda mint: mint(scope=" ".join(ALL_SCOPES), iss="https://evil.test"),
    "alg-none": lambda mint: _alg_none(),
    "no-sub": lambda mint: mint(scope=" ".join(ALL_SCOPES), sub=None),
}


def _alg_none() -> str:
    """An unsigned token (RFC 7519 6.1) claiming every scope."""

    def seg(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims = {"iss": ISSUER_PLACEHOLDER, "sub": "alice", "scope": " ".join(ALL_SCOPES)}
    return seg({"alg": "none", "typ": "at+jwt"}) + "." + seg(claims) + "."


@pytest.fixture
def seeded(posts_server: PostsServer) -> Iterator[PostRow]:
    """Post 1, by alice; the guard tests check it is left untouched."""
    row = posts_server.store.create(author="alice", title="original", body="untouched")
    assert row.id == 1
    yield row
    assert posts_server.store.get(row.id) == row
    assert [r.id for r in posts_server.store.list_page(10, 0)] == [row.id]


def test_every_idl_method_is_guarded() -> None:
    assert METHODS, "the IDL has no methods?"
    for method in METHODS:
        assert _needed(method) <= ALL_SCOPES


def test_scopes_are_those_of_the_contract() -> None:
    assert {m: _needed(m) for m in METHODS} == {
        "create_post": {SCOPE_WRITE},
        "get_post": {SCOPE_READ},
        "list_posts": {SCOPE_READ},
        "update_post": {SCOPE_WRITE, SCOPE_ADMIN},
        "delete_post": {SCOPE_WRITE, SCOPE_ADMIN},
    }


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
@pytest.mark.parametrize("method", METHODS)
def test_bad_token_is_unauthenticated(
    client: Any, mint: Mint, seeded: PostRow, method: str, kind: str
) -> None:
    token = BAD_TOKENS[kind](mint)
    with pytest.raises(common_thrift.Unauthenticated) as info:
        getattr(client, method)(token, *_rest_of_args(method))
    if isinstance(token, str) and len(token) > 20:
        assert token not in info.value.message


@pytest.mark.parametrize("method", METHODS)
def test_token_without_the_scope_is_permission_denied(
    client: Any, mint: Mint, seeded: PostRow, method: str
) -> None:
    for scopes in ("", " ".join(sorted(ALL_SCOPES - _needed(method))), "posts:readwrite openid"):
        token = mint("alice", scopes)  # alice owns post 1: only the scope is missing
        with pytest.raises(common_thrift.PermissionDenied) as info:
            getattr(client, method)(token, *_rest_of_args(method))
        assert "scope" in info.value.message


@pytest.mark.parametrize("method", METHODS)
def test_token_with_the_scope_passes_the_guard(
    client: Any, mint: Mint, posts_server: PostsServer, method: str
) -> None:
    # The control for the tests above: the same call with the scope does not
    # stop at the guard (it succeeds, or fails for a reason after it).
    for scope in _needed(method):
        posts_server.store.create(author="alice", title="t", body="b")
        try:
            getattr(client, method)(mint("alice", scope), *_rest_of_args(method))
        except (common_thrift.Unauthenticated, common_thrift.PermissionDenied) as exc:
            pytest.fail(f"{method} with {scope}: {exc!r}")
        except (common_thrift.InvalidArgument, common_thrift.NotFound):
            pass


@pytest.fixture
def unreachable_auth_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unavailable_server(
    tmp_path: Path, unreachable_auth_port: int, issuer_audience: tuple[str, str]
) -> Iterator[PostsServer]:
    """A Posts server whose verifier asks an Auth service that is down (no cache)."""
    issuer, audience = issuer_audience
    verifier = ThriftVerifier(
        host="127.0.0.1",
        port=unreachable_auth_port,
        issuer=issuer,
        audience=audience,
        timeout_s=1.0,
        cache_ttl_s=0,
    )
    server = PostsServer(data_dir=tmp_path, verifier=verifier).start()
    yield server
    server.stop(grace_s=5)
    verifier.close()


@pytest.mark.parametrize("method", METHODS)
def test_verifier_that_cannot_decide_gives_unavailable_and_writes_nothing(
    unavailable_server: PostsServer, mint: Mint, method: str
) -> None:
    row = unavailable_server.store.create(author="alice", title="t", body="b")
    client = open_client(posts_thrift.Posts, "127.0.0.1", unavailable_server.port, timeout_s=10)
    try:
        with pytest.raises(common_thrift.Unavailable):
            getattr(client, method)(mint("alice", " ".join(ALL_SCOPES)), *_rest_of_args(method))
    finally:
        client.close()
    assert unavailable_server.store.list_page(10, 0) == [row]


def test_missing_token_never_reaches_the_verifier(tmp_path: Path) -> None:
    calls: list[str] = []

    class Recording:
        def verify(self, token: str) -> Principal:
            calls.append(token)
            raise DependencyUnavailable("should not be asked")

        def close(self) -> None:
            pass

    with PostsServer(data_dir=tmp_path, verifier=Recording()) as server:
        client = open_client(posts_thrift.Posts, "127.0.0.1", server.port)
        try:
            for token in (None, ""):
                with pytest.raises(common_thrift.Unauthenticated):
                    client.list_posts(token, 0, 0)
        finally:
            client.close()
    assert calls == []


def test_a_principal_without_subject_is_refused(tmp_path: Path) -> None:
    class NoSubject:
        def verify(self, token: str) -> Principal:
            return Principal(subject="", scopes=ALL_SCOPES, expires_at=2**40, token_id="j",
                             client_id="c")

        def close(self) -> None:
            pass

    with PostsServer(data_dir=tmp_path, verifier=NoSubject()) as server:
        client = open_client(posts_thrift.Posts, "127.0.0.1", server.port)
        try:
            with pytest.raises(common_thrift.Unauthenticated):
                client.create_post("any-token", "t", "b")
        finally:
            client.close()
        assert server.store.list_page(10, 0) == []


# -- the handler class cannot forget the guard ------------------------------------


def _complete_methods() -> dict[str, Any]:
    """Guarded stand-ins for every IDL method, with the IDL's number of arguments."""
    methods: dict[str, Any] = {}
    for name in METHODS:
        n = len(_rest_of_args(name))
        params = ", ".join(f"a{i}" for i in range(n))
        namespace: dict[str, Any] = {}
        exec(f"def {name}(self, principal{', ' if n else ''}{params}): return None", namespace)
        methods[name] = requires(SCOPE_READ)(namespace[name])
    return methods


def test_a_complete_handler_class_is_accepted() -> None:
    cls = type("Complete", (GuardedHandler,), _complete_methods(), service=posts_thrift.Posts)
    assert cls.thrift_service is posts_thrift.Posts


@pytest.mark.parametrize("method", METHODS)
def test_an_unguarded_method_fails_at_class_definition(method: str) -> None:
    methods = _complete_methods()
    methods[method] = methods[method].__wrapped__  # the undecorated function
    with pytest.raises(TypeError, match=f"{method}: not guarded"):
        type("Forgetful", (GuardedHandler,), methods, service=posts_thrift.Posts)


@pytest.mark.parametrize("method", METHODS)
def test_a_missing_method_fails_at_class_definition(method: str) -> None:
    methods = _complete_methods()
    del methods[method]
    with pytest.raises(TypeError, match=f"{method}: not implemented"):
        type("Incomplete", (GuardedHandler,), methods, service=posts_thrift.Posts)


def test_a_subclass_overriding_a_method_without_the_guard_fails() -> None:
    with pytest.raises(TypeError, match="get_post: not guarded"):

        class Sneaky(PostsHandler):
            def get_post(self, principal: Any, post_id: Any) -> Any:
                return None

    class Fine(PostsHandler):
        @requires(SCOPE_ADMIN)
        def get_post(self, principal: Any, post_id: Any) -> Any:
            return None

    assert Fine.thrift_service is posts_thrift.Posts


def test_a_handler_class_must_name_its_service() -> None:
    with pytest.raises(TypeError, match="name the service"):
        type("Nameless", (GuardedHandler,), _complete_methods())


def test_a_method_with_the_wrong_arguments_fails_at_class_definition() -> None:
    methods = _complete_methods()

    @requires(SCOPE_READ)
    def get_post(self: Any, principal: Principal) -> None:  # post_id forgotten
        return None

    methods["get_post"] = get_post
    with pytest.raises(TypeError, match="get_post: takes 0 arguments"):
        type("Wrong", (GuardedHandler,), methods, service=posts_thrift.Posts)


def test_a_service_without_a_token_argument_is_refused() -> None:
    class FakeArgs:
        thrift_spec: ClassVar[dict[int, tuple[int, str, bool]]] = {
            1: (TType.I64, "post_id", False)
        }

    class FakeService:
        __name__ = "Fake"
        thrift_services: ClassVar[list[str]] = ["get_post"]
        get_post_args = FakeArgs

    with pytest.raises(TypeError, match="get_post: the IDL has no `string token` argument"):
        type("X", (GuardedHandler,), {"get_post": _complete_methods()["get_post"]},
             service=FakeService)


@pytest.mark.parametrize("bad", [(), ("",), (" posts:read",), ("posts:read posts:write",)])
def test_requires_needs_real_scope_names(bad: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        requires(*bad)


def test_handler_refuses_a_non_verifier() -> None:
    with pytest.raises(TypeError):
        PostsHandler(store=None, verifier=object())  # type: ignore[arg-type]
