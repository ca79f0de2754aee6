"""The verified-token cache shared by every verifier.

A verified answer is reused for a short while so that the hot path of every
RPC is a hash and a dictionary lookup instead of a signature check or a
network round trip:

- keyed by the SHA-256 digest of the token, never by the token text, so a
  memory dump of the cache holds no usable token (SHA-256 rather than BLAKE2b:
  OpenSSL's SHA-256 costs about a quarter of hashlib's BLAKE2b here, and this
  is the hot path of every call);
- bounded: at most ``max_entries``; when full the oldest insertion goes first
  (with one TTL for every entry, oldest inserted is also first to expire);
- an entry never outlives its token's ``exp``, nor ``ttl_s`` after it was
  stored. For the remote verifiers ``ttl_s`` is the documented revocation
  delay; ``ttl_s=0`` turns the cache off;
- only accepted tokens are stored; a rejection or an unreachable dependency
  is never cached.

The hit path takes no lock: a ``dict.get`` is atomic under the GIL, and every
mutation (insert, evict, drop a stale entry) happens under one lock. It is
inlined in :meth:`CachingVerifier.verify` (method calls cost as much as the
lookup itself).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

from auth_rpc.errors import AuthError, DependencyUnavailable, TokenRejected
from auth_rpc.serving.metrics import Snapshot
from auth_rpc.verify.counts import TokenCheckCounts
from auth_rpc.verify.principal import Principal, StatusReference

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_CACHE_TTL_S",
    "CachingVerifier",
    "VerifiedCache",
    "token_key",
]

DEFAULT_CACHE_SIZE = 10_000
DEFAULT_CACHE_TTL_S = 30.0

_sha256 = hashlib.sha256


def token_key(token: str) -> bytes:
    """The cache key of ``token``: its SHA-256 digest."""
    return _sha256(token.encode()).digest()


class VerifiedCache:
    """A bounded map from token digest to ``(Principal, valid_until)``.

    ``valid_until`` is ``min(principal.expires_at, stored_at + ttl_s)`` in the
    same clock as the ``now`` passed to :meth:`get` and :meth:`put` (unix
    seconds). Raises ``ValueError`` for a negative TTL or a size below 1.
    """

    __slots__ = ("_canon", "_lock", "entries", "max_entries", "ttl_s")

    def __init__(
        self, *, max_entries: int = DEFAULT_CACHE_SIZE, ttl_s: float = DEFAULT_CACHE_TTL_S
    ) -> None:
        if max_entries < 1:
            raise ValueError("cache size must be at least 1")
        if ttl_s < 0:
            raise ValueError("cache TTL must not be negative")
        self.max_entries = max_entries
        self.ttl_s = float(ttl_s)
        #: Read without a lock (atomic under the GIL); mutated only under ``_lock``.
        self.entries: dict[bytes, tuple[Principal, float]] = {}
        self._lock = threading.Lock()
        self._canon: dict[object, Any] = {}

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    key_for = staticmethod(token_key)

    def get(self, key: bytes, now: float) -> Principal | None:
        """The cached principal for ``key`` if it is still valid at ``now``."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if now < entry[1]:
            return entry[0]
        with self._lock:
            current = self.entries.get(key)
            if current is not None and not now < current[1]:
                del self.entries[key]
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
            principal = self._shared(principal)
            entries = self.entries
            entries.pop(key, None)  # re-inserted last: fresh entries are evicted last
            while len(entries) >= self.max_entries:
                del entries[next(iter(entries))]
            entries[key] = (principal, valid_until)

    def _shared(self, principal: Principal) -> Principal:
        """``principal`` with its repeated parts (scopes, issuer, ...) shared between entries.

        100,000 cached tokens of a few users and clients repeat the same scope
        sets and names: keeping one copy of each saves ~40 % of the cache's
        memory. Called under the lock.
        """
        canon = self._canon
        if len(canon) > 4 * self.max_entries:
            canon.clear()
        parts = (
            principal.subject,
            principal.scopes,
            principal.client_id,
            principal.issuer,
            principal.audience,
        )
        shared = tuple(canon.setdefault(part, part) for part in parts)
        status = principal.status
        if status is not None:
            # Every token of a Status List names the same uri: one copy of it.
            uri = canon.setdefault(status.uri, status.uri)
            if uri is not status.uri:
                status = StatusReference(uri, status.idx)
        if status is principal.status and all(
            a is b for a, b in zip(shared, parts, strict=True)
        ):
            return principal
        subject, scopes, client_id, issuer, audience = shared
        return Principal(
            subject=subject,
            scopes=scopes,
            expires_at=principal.expires_at,
            token_id=principal.token_id,
            client_id=client_id,
            issuer=issuer,
            audience=audience,
            status=status,
        )

    def discard(self, key: bytes) -> None:
        """Forget ``key`` (e.g. its token was found revoked)."""
        with self._lock:
            self.entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries


class _Flight:
    """One check of a token in progress, that concurrent callers of the same token wait for.

    The event is made by the first caller that waits (most checks have none).
    """

    __slots__ = ("event", "principal", "rejected", "unavailable")

    def __init__(self) -> None:
        self.event: threading.Event | None = None
        self.principal: Principal | None = None
        self.rejected: str | None = None  # TokenRejected's message
        self.unavailable = "token check failed"  # what a waiter says otherwise


class CachingVerifier:
    """Base of the verifiers: the checks before parsing and the cache around them.

    Subclasses implement ``_verify_uncached(token, now) -> Principal`` (raising
    ``TokenRejected`` / ``DependencyUnavailable``). A subclass that must re-check
    something on every call, cached or not (local verifiers: the token's bit in
    its Status List, a revocation list), sets ``_recheck`` to a callable raising
    ``TokenRejected`` (or ``DependencyUnavailable``): a cached answer never
    hides a revocation.

    A subclass whose check is a round trip (``_coalesce = True``: thrift,
    introspect) has concurrent misses of one token share one check, while the
    cache is on: the first caller asks, the others wait for its answer, at
    most ``_miss_wait_s`` (then ``DependencyUnavailable``: never longer than
    their own call could take), and get its outcome: the principal, the same
    rejection, or ``DependencyUnavailable``. A gateway's burst of calls with a
    new token costs one round trip instead of one each.

    Counts for the metrics (:meth:`metrics_snapshot`): ``cache_hits``,
    ``cache_misses`` (plain integers; with the cache off, every check is
    neither) and :attr:`checks` (refusals by reason, undecidable checks).
    """

    _recheck: Callable[[Principal], None] | None = None
    _coalesce = False
    _miss_wait_s = 0.0

    def __init__(
        self,
        *,
        max_token_bytes: int,
        cache_size: int,
        cache_ttl_s: float,
        clock: Callable[[], float],
    ) -> None:
        if max_token_bytes < 64:
            raise ValueError("max_token_bytes is too small")
        self._max_token_bytes = max_token_bytes
        self._cache = VerifiedCache(max_entries=cache_size, ttl_s=cache_ttl_s)
        self._clock = clock
        self._flights: dict[bytes, _Flight] = {}
        self._flights_lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0
        self.checks = TokenCheckCounts()

    @property
    def cache(self) -> VerifiedCache:
        return self._cache

    def _verify_uncached(self, token: str, now: float) -> Principal:  # pragma: no cover
        raise NotImplementedError

    def _cache_bound(self, principal: Principal) -> float:
        """When a cached answer must end at the latest: the token's expiry."""
        return float(principal.expires_at)

    def verify(self, token: str) -> Principal:
        """Verify ``token`` and return its :class:`Principal`.

        Raises :class:`auth_rpc.errors.TokenRejected` when the token is not
        acceptable and :class:`auth_rpc.errors.DependencyUnavailable` when the
        verifier cannot decide now (the caller must refuse the call).
        """
        try:
            # Before any parsing or hashing: present, bounded, ASCII (every JWT and
            # every RFC 6750 bearer token is).
            if type(token) is not str or not token:
                raise TokenRejected("missing token")
            if len(token) > self._max_token_bytes:
                raise TokenRejected("token too large")
            if not token.isascii():
                raise TokenRejected("malformed token")
            now = self._clock()
            cache = self._cache
            recheck = self._recheck
            if cache.ttl_s <= 0:
                principal = self._verify_uncached(token, now)
            else:
                key = _sha256(token.encode()).digest()
                entry = cache.entries.get(key)
                if entry is not None:
                    if now < entry[1]:
                        self.cache_hits += 1
                        if recheck is not None:
                            recheck(entry[0])
                        return entry[0]
                    cache.get(key, now)  # drops the stale entry (under the lock)
                self.cache_misses += 1
                if self._coalesce:
                    principal = self._verify_shared(key, token, now)
                else:
                    principal = self._verify_uncached(token, now)
                if recheck is not None:
                    recheck(principal)
                cache.put(key, principal, now, self._cache_bound(principal))
                return principal
            if recheck is not None:
                recheck(principal)
            return principal
        except TokenRejected as exc:
            self.checks.refusal(exc.message)
            raise
        except DependencyUnavailable:
            self.checks.unavailable += 1
            raise

    def metrics_snapshot(self) -> Snapshot:
        """Cache hits and misses, refusals by reason, undecidable checks (for the metrics)."""
        snapshot = self.checks.snapshot()
        snapshot["token_cache_hits"] = {(): self.cache_hits}
        snapshot["token_cache_misses"] = {(): self.cache_misses}
        return snapshot

    def _verify_shared(self, key: bytes, token: str, now: float) -> Principal:
        """``_verify_uncached``, or the outcome of the same token's check in progress."""
        with self._flights_lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = _Flight()
                event = None
            else:
                if flight.event is None:
                    flight.event = threading.Event()
                event = flight.event
        if event is not None:  # another caller is checking this token: wait for it
            if not event.wait(self._miss_wait_s):
                raise DependencyUnavailable("timed out waiting for the token's check")
            principal = flight.principal
            if principal is None:
                if flight.rejected is not None:
                    raise TokenRejected(flight.rejected)
                raise DependencyUnavailable(flight.unavailable)
            if principal.expires_at and principal.expires_at <= self._clock():
                raise TokenRejected("token expired")
            return principal
        try:
            principal = self._verify_uncached(token, now)
            flight.principal = principal
            return principal
        except TokenRejected as exc:
            flight.rejected = exc.message
            raise
        except AuthError as exc:
            flight.unavailable = exc.message
            raise
        finally:
            with self._flights_lock:
                del self._flights[key]
                event = flight.event  # every waiter made it before the flight went
            if event is not None:
                event.set()

    def close(self) -> None:
        """Release what the verifier holds (connections); idempotent."""
        self._cache.clear()
