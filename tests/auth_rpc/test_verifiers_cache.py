"""The verified-token cache: bounded, never past exp, keyed by a hash, off at TTL 0."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import jwt
import pytest

from auth_rpc.verify.cache import VerifiedCache
from auth_rpc.verify.principal import Principal
from auth_rpc.verify.verifiers import LocalVerifier

T0 = 1_800_000_000.0
SECRET = b"k" * 32
ISS = "https://issuer.test"
AUD = "posts"


def principal(exp: float = T0 + 900, jti: str = "j") -> Principal:
    return Principal(
        subject="alice", scopes=frozenset({"posts:read"}), expires_at=int(exp), token_id=jti,
        client_id="cli",
    )


def token(i: int = 0, *, exp: float = T0 + 900) -> str:
    claims: dict[str, Any] = {
        "iss": ISS, "sub": "alice", "aud": AUD, "iat": int(T0), "exp": int(exp),
        "jti": f"jti-{i}", "scope": "posts:read",
    }
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"typ": "at+jwt"})


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def local(clock: Clock, **kw: Any) -> LocalVerifier:
    kw.setdefault("status_list", "off")  # a test issuer without Token Status Lists
    return LocalVerifier(issuer=ISS, audience=AUD, hs256_secret=SECRET, clock=clock, **kw)


def test_bounded_size_evicts_oldest_first() -> None:
    cache = VerifiedCache(max_entries=3, ttl_s=30)
    keys = [cache.key_for(f"token-{i}") for i in range(5)]
    for i, key in enumerate(keys):
        cache.put(key, principal(jti=str(i)), T0)
    assert len(cache) == 3
    assert [cache.get(k, T0) for k in keys[:2]] == [None, None]
    assert [p.token_id for k in keys[2:] if (p := cache.get(k, T0))] == ["2", "3", "4"]


def test_reinserting_refreshes_the_position() -> None:
    cache = VerifiedCache(max_entries=2, ttl_s=30)
    a, b, c = (cache.key_for(t) for t in "abc")
    cache.put(a, principal(), T0)
    cache.put(b, principal(), T0)
    cache.put(a, principal(), T0 + 1)
    cache.put(c, principal(), T0 + 1)
    assert a in cache and b not in cache and c in cache


def test_entry_never_outlives_exp_nor_ttl() -> None:
    cache = VerifiedCache(ttl_s=30)
    short, long = cache.key_for("short"), cache.key_for("long")
    cache.put(short, principal(exp=T0 + 10), T0)
    cache.put(long, principal(exp=T0 + 900), T0)
    assert cache.get(short, T0 + 9.99) is not None
    assert cache.get(short, T0 + 10) is None and short not in cache  # dropped when stale
    assert cache.get(long, T0 + 29.99) is not None
    assert cache.get(long, T0 + 30) is None
    cache.put(short, principal(exp=T0 - 1), T0)  # already expired: not stored
    assert short not in cache


def test_keyed_by_a_hash_not_by_the_token_text() -> None:
    clock = Clock()
    v = local(clock)
    t = token()
    v.verify(t)
    entries = v.cache.entries
    assert len(entries) == 1
    (key,) = entries
    assert key == hashlib.sha256(t.encode()).digest()
    assert t not in entries and t.encode() not in entries
    assert t.split(".")[2].encode() not in key
    for principal, _until in entries.values():
        assert t not in repr(principal)


def test_verifier_hit_returns_the_cached_principal_until_exp() -> None:
    clock = Clock()
    v = local(clock, cache_ttl_s=300)
    t = token(exp=T0 + 60)
    p = v.verify(t)
    clock.now = T0 + 59
    assert v.verify(t) is p
    clock.now = T0 + 60  # the cache entry is gone; full check (within leeway) makes a new one
    assert v.verify(t) is not p


def test_ttl_zero_turns_the_cache_off() -> None:
    clock = Clock()
    v = local(clock, cache_ttl_s=0)
    t = token()
    p = v.verify(t)
    assert v.verify(t) is not p
    assert len(v.cache) == 0 and not v.cache.enabled


def test_rejections_are_never_cached() -> None:
    v = local(Clock())
    bad = token()[:-4] + "AAAA"
    for _ in range(2):
        with pytest.raises(Exception, match="signature"):
            v.verify(bad)
    assert len(v.cache) == 0


def test_verifier_cache_size_is_bounded() -> None:
    v = local(Clock(), cache_size=5)
    for i in range(20):
        v.verify(token(i))
    assert len(v.cache) == 5


def test_concurrent_inserts_stay_bounded_and_consistent() -> None:
    cache = VerifiedCache(max_entries=50, ttl_s=30)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            for i in range(2000):
                key = cache.key_for(f"{n}-{i}")
                cache.put(key, principal(), T0)
                cache.get(key, T0)
                cache.get(key, T0 + 31)  # stale: dropped under the lock
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) <= 50


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        VerifiedCache(max_entries=0)
    with pytest.raises(ValueError):
        VerifiedCache(ttl_s=-1)


def test_cached_principals_share_their_repeated_parts() -> None:
    """100,000 tokens of one user keep one copy of the scope set and names (memory)."""
    from auth_rpc.verify.cache import VerifiedCache
    from auth_rpc.verify.principal import Principal

    cache = VerifiedCache(max_entries=10, ttl_s=30)
    for i in range(3):
        principal = Principal(
            subject="alice" + "",
            scopes=frozenset({"posts:read", "posts:write"}),
            expires_at=2_000_000_000,
            token_id=f"jti-{i}",
            client_id="auth-rpc",
            issuer="https://auth.test",
            audience=("posts",),
        )
        cache.put(bytes([i]) * 32, principal, now=1_000_000_000)
    stored = [entry[0] for entry in cache.entries.values()]
    assert [p.token_id for p in stored] == ["jti-0", "jti-1", "jti-2"]
    assert stored[0].scopes is stored[1].scopes is stored[2].scopes
    assert stored[0].audience is stored[2].audience
