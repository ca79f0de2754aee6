"""End to end: the Posts service in each verification mode against a real Auth service.

Everything runs in-process over real Thrift and real HTTP on 127.0.0.1 (the
plugin's fixtures): users log in to Auth, call Posts with the token, and the
Posts service checks it locally, with the JWKS, by introspection or by
``Auth.validate``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from auth_rpc.auth.keys import SigningKey
from auth_rpc.idl import auth_thrift, common_thrift, posts_thrift
from auth_rpc.serving.transport import open_client
from auth_rpc.testing import TokenFactory

from _http_stub import QuietHandler, StubServer

MODES = ["local", "jwks", "introspect", "thrift"]
REMOTE = ["introspect", "thrift"]
LOCAL = ["local", "jwks"]
READ = ("posts:read",)  # token_factory gives no scopes unless asked

PASSWORD = "a password long enough"


class FakeClock:
    """A clock the test moves by hand (for cache TTLs and JWKS cooldowns)."""

    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def users(auth_server: Any, make_user: Callable[..., None]) -> Callable[[str], str]:
    """``login(name)`` -> access token; alice, bob (write), rita (read only), root (admin)."""
    make_user("alice", PASSWORD, "posts:read posts:write")
    make_user("bob", PASSWORD, "posts:read posts:write")
    make_user("rita", PASSWORD, "posts:read")
    make_user("root", PASSWORD, "posts:read posts:write posts:admin")

    def login(name: str) -> str:
        with contextlib.closing(open_client(auth_thrift.Auth, "127.0.0.1", auth_server.port)) as c:
            token: str = c.login(name, PASSWORD).access_token
            return token

    return login


@contextlib.contextmanager
def posts_client(server: Any) -> Iterator[Any]:
    client = open_client(posts_thrift.Posts, "127.0.0.1", server.port)
    try:
        yield client
    finally:
        client.close()


@pytest.mark.parametrize("mode", MODES)
def test_happy_path(mode: str, make_posts_server: Any, users: Callable[[str], str]) -> None:
    server = make_posts_server(mode)
    token = users("alice")
    with posts_client(server) as posts:
        created = posts.create_post(token, "  Hello  ", "first body")
        assert created.title == "Hello" and created.author == "alice"
        assert posts.get_post(token, created.id) == created
        second = posts.create_post(token, "Second", "")
        page = posts.list_posts(token, 0, 0)
        assert [p.id for p in page.posts] == [second.id, created.id]
        assert page.next_before_id == 0
        updated = posts.update_post(token, created.id, "Hello again", "edited")
        assert updated.title == "Hello again" and updated.updated_at >= created.updated_at
        posts.delete_post(token, created.id)
        with pytest.raises(common_thrift.NotFound):
            posts.get_post(token, created.id)


@pytest.mark.parametrize("mode", MODES)
def test_bad_tokens_are_unauthenticated(
    mode: str, make_posts_server: Any, token_factory: TokenFactory
) -> None:
    server = make_posts_server(mode)
    bad = {
        "expired": token_factory.expired(scopes=READ),
        "wrong audience": token_factory.mint(scopes=READ, audience="another-service"),
        "wrong issuer": token_factory.mint(scopes=READ, issuer="http://evil.test"),
        "foreign key": token_factory.mint(
            scopes=READ, key=SigningKey.generate("EdDSA", kid=server_kid(token_factory))
        ),
        "forged": token_factory.forged(scopes=READ),
        "garbage": "not.a.token",
        "empty": "",
    }
    with posts_client(server) as posts:
        for name, token in bad.items():
            with pytest.raises(common_thrift.Unauthenticated):
                posts.list_posts(token, 0, 0)
            assert name  # the loop names the case in the traceback
        # The connection is still usable after every refusal.
        assert posts.list_posts(token_factory.mint(scopes=READ), 0, 0).posts == []


def server_kid(factory: TokenFactory) -> str:
    """The kid of the Auth service's key: a forged token claims it."""
    return factory.key.kid


@pytest.mark.parametrize("mode", MODES)
def test_scope_ownership_and_admin(
    mode: str, make_posts_server: Any, users: Callable[[str], str]
) -> None:
    server = make_posts_server(mode)
    alice, bob, rita, root = (users(n) for n in ("alice", "bob", "rita", "root"))
    with posts_client(server) as posts:
        post = posts.create_post(alice, "Alice's", "mine")
        with pytest.raises(common_thrift.PermissionDenied):
            posts.create_post(rita, "Reader", "cannot write")
        assert posts.get_post(rita, post.id).id == post.id
        with pytest.raises(common_thrift.PermissionDenied):
            posts.update_post(bob, post.id, "Bob's now", "")
        with pytest.raises(common_thrift.PermissionDenied):
            posts.delete_post(bob, post.id)
        assert posts.update_post(root, post.id, "Moderated", "").title == "Moderated"
        posts.delete_post(root, post.id)
        with pytest.raises(common_thrift.NotFound):
            posts.get_post(alice, post.id)


@pytest.mark.parametrize("mode", REMOTE)
def test_remote_revocation_with_cache_off_is_immediate(
    mode: str, make_posts_server: Any, users: Callable[[str], str], auth_server: Any
) -> None:
    server = make_posts_server(mode, cache_ttl_s=0)
    token = users("alice")
    with posts_client(server) as posts:
        posts.list_posts(token, 0, 0)
        auth_server.service.revoke(token)
        with pytest.raises(common_thrift.Unauthenticated):
            posts.list_posts(token, 0, 0)


@pytest.mark.parametrize("mode", REMOTE)
def test_remote_revocation_seen_once_the_cache_ttl_has_passed(
    mode: str, make_posts_server: Any, users: Callable[[str], str], auth_server: Any
) -> None:
    clock = FakeClock()
    server = make_posts_server(mode, cache_ttl_s=30, clock=clock)
    token = users("alice")
    with posts_client(server) as posts:
        posts.list_posts(token, 0, 0)
        auth_server.service.revoke(token)
        clock.advance(10)
        posts.list_posts(token, 0, 0)  # the documented delay: still cached
        clock.advance(21)
        with pytest.raises(common_thrift.Unauthenticated):
            posts.list_posts(token, 0, 0)


@pytest.mark.parametrize("mode", LOCAL)
def test_local_modes_refuse_a_revoked_token_within_a_second_or_so(
    mode: str, make_posts_server: Any, users: Callable[[str], str], auth_server: Any
) -> None:
    """As the README says: a local verifier reads the token's bit in the Auth service's
    Token Status List, which it fetches again every ttl (1 s), cached answer or not."""
    server = make_posts_server(mode)  # the verified-token cache on (30 s)
    token = users("alice")
    with posts_client(server) as posts:
        assert posts.list_posts(token, 0, 0).posts == []
        auth_server.service.revoke(token)
        revoked_at = time.monotonic()
        while True:  # poll with a deadline
            try:
                posts.list_posts(token, 0, 0)
            except common_thrift.Unauthenticated as exc:
                assert exc.message == "token revoked"
                break
            assert time.monotonic() - revoked_at < 10, "the revocation never reached Posts"
            time.sleep(0.005)
    print(f"\n{mode}: refused {time.monotonic() - revoked_at:.3f} s after the revocation")


@pytest.mark.parametrize("mode", MODES)
def test_auth_stopped_mid_test(
    mode: str,
    make_auth_server: Any,
    make_posts_server: Any,
    tmp_path: Any,
) -> None:
    """Remote modes: Unavailable while Auth is down, then recovery; local modes keep serving."""
    data = tmp_path / "auth"
    auth = make_auth_server(data_dir=data)
    auth.service.add_user("alice", PASSWORD, ["posts:read", "posts:write"])
    ports = (auth.port, auth.http_port)
    timeouts = {} if mode == "local" else {"timeout_s": 0.5}
    server = make_posts_server(mode, auth=auth, cache_ttl_s=0, **timeouts)
    factory = TokenFactory.for_auth_server(auth, scopes=READ)
    with posts_client(server) as posts:
        posts.list_posts(factory.mint(), 0, 0)  # warm: JWKS keys and status list fetched
        fresh = factory.mint()  # never seen by the Posts service: not cached
        auth.stop(grace_s=1.0)
        auth.service.close()
        if mode in REMOTE:
            with pytest.raises(common_thrift.Unavailable):
                posts.list_posts(fresh, 0, 0)
        else:
            assert posts.list_posts(fresh, 0, 0).posts == []
        # Auth comes back on the same ports and data dir.
        back = make_auth_server(data_dir=data, port=ports[0], http_port=ports[1])
        factory = TokenFactory.for_auth_server(back, scopes=READ)
        assert posts.list_posts(factory.mint(), 0, 0).posts == []


def test_jwks_mode_picks_up_a_key_rotation(
    make_posts_server: Any, auth_server: Any, users: Callable[[str], str]
) -> None:
    clock = FakeClock()
    server = make_posts_server("jwks", clock=clock)
    with posts_client(server) as posts:
        before = users("alice")
        posts.list_posts(before, 0, 0)
        # An emergency rotation (the new key signs at once, unpublished until now): within
        # the refetch cooldown a token under it is Unavailable (retryable), never refused.
        auth_server.service.rotate_key(activate_after_s=0)
        after = users("alice")
        assert TokenFactory.kid_of(after) != TokenFactory.kid_of(before)
        with pytest.raises(common_thrift.Unavailable):
            posts.list_posts(after, 0, 0)
        clock.advance(31)  # past the refetch cooldown
        posts.list_posts(after, 0, 0)
        posts.list_posts(before, 0, 0)  # the old key still verifies


@pytest.fixture
def independent_issuer() -> Iterator[tuple[str, SigningKey]]:
    """A key set made in the test and served from a small in-process HTTP server."""
    key = SigningKey.generate("ES256", kid="independent-1")
    body = json.dumps({"keys": [key.public_jwk()]}).encode()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            self.reply(200, body)

    with StubServer(Handler) as http:
        yield f"{http.url}/jwks.json", key


def test_independent_issuer_in_jwks_mode(
    make_posts_server: Any, independent_issuer: tuple[str, SigningKey], token_factory: TokenFactory
) -> None:
    url, key = independent_issuer
    issuer = "https://idp.example"
    foreign = TokenFactory(key=key, issuer=issuer, audience="posts", scopes=READ)
    theirs = make_posts_server(  # an issuer without Token Status Lists: tokens lack "status"
        "jwks", jwks_url=url, issuer=issuer, audience="posts", status_list="if-present"
    )
    ours = make_posts_server("jwks")
    with posts_client(theirs) as posts:
        assert posts.list_posts(foreign.mint(), 0, 0).posts == []
        with pytest.raises(common_thrift.Unauthenticated):
            posts.list_posts(token_factory.mint(scopes=READ), 0, 0)  # our Auth's: wrong issuer/key
    with posts_client(ours) as posts:
        with pytest.raises(common_thrift.Unauthenticated):
            posts.list_posts(foreign.mint(), 0, 0)
        # Our issuer and audience, a key never published: within the refetch cooldown the
        # verifier cannot tell it from a key published since its last fetch (retryable).
        with pytest.raises(common_thrift.Unavailable):
            posts.list_posts(foreign.mint(issuer=token_factory.issuer), 0, 0)
