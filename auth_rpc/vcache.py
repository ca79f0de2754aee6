"""The verified-token cache shared by every verifier.

A verified answer is reused for a short while so that the hot path of every
RPC is a hash and a dictionary lookup instead of a signature check or a
network round trip:

- keyed by a keyed BLAKE2b digest of the token (a per-process random key), never
  by the token text, so a memory dump of the cache holds no usable token;
- bounded: at most ``max_entries``; when full the oldest insertion goes first
  (with one TTL for every entry, oldest inserted is also first to expire);
- an entry never outlives its token's ``exp``, nor ``ttl_s`` after it was
  stored. For the remote verifiers ``ttl_s`` is the documented revocation
  delay; ``ttl_s=0`` turns the cache off;
- only accepted tokens are stored; a rejection or an unreachable dependency
  is never cached.

The hit path takes no lock: a ``dict.get`` is atomic under the GIL, and every
mutation (insert, evict, drop a stale entry) happens under one lock.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

from auth_rpc.principal import Principal

__all__ = ["DEFAULT_CACHE_SIZE", "DEFAULT_CACHE_TTL_S", "VerifiedCache"]

DEFAULT_CACHE_SIZE = 10_000
DEFAULT_CACHE_TTL_S = 30.0


class VerifiedCache:
    """A bounded map from token digest to ``(Principal, valid_until)``.

    ``valid_until`` is ``min(principal.expires_at, stored_at + ttl_s)`` in the
    same clock as the ``now`` passed to :meth:`get` and :meth:`put` (unix
    seconds). Raises ``ValueError`` for a negative TTL or a size below 1.
    """

    __slots__ = ("_blake_key", "_entries", "_lock", "max_entries", "ttl_s")

    def __init__(
        self, *, max_entries: int = DEFAULT_CACHE_SIZE, ttl_s: float = DEFAULT_CACHE_TTL_S
    ) -> None:
        if max_entries < 1:
            raise ValueError("cache size must be at least 1")
        if ttl_s < 0:
            raise ValueError("cache TTL must not be negative")
        self.max_entries = max_entries
        self.ttl_s = float(ttl_s)
        self._entries: dict[bytes, tuple[Principal, float]] = {}
        self._lock = threading.Lock()
        self._blake_key = os.urandom(32)

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def key_for(self, token: str) -> bytes:
        """The cache key of ``token``: a 16-byte keyed BLAKE2b digest."""
        return hashlib.blake2b(
            token.encode("utf-8", "surrogatepass"), digest_size=16, key=self._blake_key
        ).digest()

    def get(self, key: bytes, now: float) -> Principal | None:
        """The cached principal for ``key`` if it is still valid at ``now``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now < entry[1]:
            return entry[0]
        with self._lock:
            current = self._entries.get(key)
            if current is not None and not now < current[1]:
                del self._entries[key]
        return None

    def put(
        self, key: bytes, principal: Principal, now: float, expires_at: float | None = None
    ) -> None:
        """Remember ``principal`` as the verified answer for ``key``.

        The entry ends at ``expires_at`` (default: ``principal.expires_at``) or
        ``ttl_s`` after ``now``, whichever is first. Nothing is stored when the
        cache is off or the token expires before ``now``.
        """
        if self.ttl_s <= 0:
            return
        end = float(principal.expires_at) if expires_at is None else expires_at
        valid_until = min(end, now + self.ttl_s)
        if valid_until <= now:
            return
        with self._lock:
            entries = self._entries
            entries.pop(key, None)  # re-inserted last: fresh entries are evicted last
            while len(entries) >= self.max_entries:
                del entries[next(iter(entries))]
            entries[key] = (principal, valid_until)

    def discard(self, key: bytes) -> None:
        """Forget ``key`` (e.g. its token was found revoked)."""
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


class CachingVerifier:
    """Base of the verifiers: the cache lookup around :meth:`_verify_uncached`.

    Subclasses implement ``_verify_uncached(token, now) -> Principal`` (raising
    ``TokenRejected`` / ``DependencyUnavailable``) and may override
    :meth:`_check_on_hit`, called on every verify, cached or not (local
    verifiers consult their revocation list there).
    """

    def __init__(
        self, *, cache_size: int, cache_ttl_s: float, clock: Callable[[], float]
    ) -> None:
        self._cache = VerifiedCache(max_entries=cache_size, ttl_s=cache_ttl_s)
        self._clock = clock

    @property
    def cache(self) -> VerifiedCache:
        return self._cache

    def _verify_uncached(self, token: str, now: float) -> Principal:  # pragma: no cover
        raise NotImplementedError

    def _check_on_hit(self, principal: Principal) -> None:
        """Checks repeated on a cache hit; raise ``TokenRejected`` to refuse."""

    def _precheck(self, token: str) -> None:
        """Checks done before the cache lookup (presence, size)."""

    def _cache_bound(self, principal: Principal) -> float:
        """When a cached answer must end at the latest: the token's expiry."""
        return float(principal.expires_at)

    def verify(self, token: str) -> Principal:
        """Verify ``token`` and return its :class:`Principal`.

        Raises :class:`auth_rpc.errors.TokenRejected` when the token is not
        acceptable and :class:`auth_rpc.errors.DependencyUnavailable` when the
        verifier cannot decide now (the caller must refuse the call).
        """
        self._precheck(token)
        now = self._clock()
        cache = self._cache
        if cache.ttl_s > 0:
            key = cache.key_for(token)
            hit = cache.get(key, now)
            if hit is not None:
                self._check_on_hit(hit)
                return hit
            principal = self._verify_uncached(token, now)
            self._check_on_hit(principal)
            cache.put(key, principal, now, self._cache_bound(principal))
            return principal
        principal = self._verify_uncached(token, now)
        self._check_on_hit(principal)
        return principal

    def close(self) -> None:
        """Release what the verifier holds (connections); idempotent."""
        self._cache.clear()
