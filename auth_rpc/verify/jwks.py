"""JWKS mode: public keys fetched from a configured JWK Set URL (RFC 7517)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jwt
import requests

from auth_rpc.errors import DependencyUnavailable, TokenRejected
from auth_rpc.verify._common import (
    _ASYMMETRIC_ALGS,
    DEFAULT_LEEWAY_S,
    DEFAULT_MAX_LIFETIME_S,
    DEFAULT_MAX_TOKEN_BYTES,
    DEFAULT_TIMEOUT_S,
    _audiences,
    _b64url_json,
    _check_url,
    _FetchError,
    _new_session,
    _read_body,
)
from auth_rpc.verify._jwt import (
    STATUS_REQUIRED,
    _algorithms_for_key,
    _check_algorithms,
    _JwtVerifier,
)
from auth_rpc.verify.cache import DEFAULT_CACHE_SIZE, DEFAULT_CACHE_TTL_S
from auth_rpc.verify.principal import NoRevocations, Principal, RevocationCheck
from auth_rpc.verify.statuslist import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_REFRESH_MAX_S,
    StatusListChecker,
)

log = logging.getLogger(__name__)

# -- jwks ---------------------------------------------------------------------


@dataclass(frozen=True)
class _JwkEntry:
    key: Any
    algorithms: frozenset[str]


def load_jwk(data: Any, algorithms: frozenset[str]) -> tuple[str, _JwkEntry] | None:
    """One usable verification key of a JWK Set member, or ``None`` if it must be ignored.

    Only keys with ``use`` ``sig`` (or none), ``key_ops`` including
    ``verify`` (or none), a ``kid`` and an algorithm in ``algorithms``;
    never a symmetric (``oct``) key. A private JWK gives its public key.
    """
    if not isinstance(data, dict):
        return None
    kid = data.get("kid")
    if not isinstance(kid, str) or not kid:
        return None
    # RFC 7517 §4.2/4.3: only keys meant for signatures.
    if data.get("use", "sig") != "sig":
        return None
    ops = data.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    if data.get("kty") == "oct":  # a shared secret never comes from a key set
        return None
    alg = data.get("alg")
    if alg is not None and alg not in algorithms:
        return None
    try:
        key = jwt.PyJWK(data).key
        if hasattr(key, "private_bytes"):  # a private JWK published by mistake
            key = key.public_key()
        usable = _algorithms_for_key(key) & algorithms
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    if alg is not None:
        usable &= {alg}
    if not usable:
        return None
    return kid, _JwkEntry(key=key, algorithms=usable)


def parse_jwk_set(document: Any, algorithms: frozenset[str]) -> dict[str, _JwkEntry]:
    """The usable keys of a JWK Set (RFC 7517 section 5) by ``kid`` (the first of a repeat).

    Raises ``ValueError`` if ``document`` is not a JWK Set (an object with a
    ``keys`` list).
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set (a JSON object with a \"keys\" list)")
    keys: dict[str, _JwkEntry] = {}
    for member in document["keys"]:
        loaded = load_jwk(member, algorithms)
        if loaded is not None and loaded[0] not in keys:
            keys[loaded[0]] = loaded[1]
    return keys


class _KeyNotFetchedYet(DependencyUnavailable):
    """An unknown ``kid`` while the cooldown forbids a fetch: retryable, not a rejection."""


class JwksVerifier(_JwtVerifier):
    """Checks tokens against the public keys of a JWK Set fetched from ``jwks_url``.

    Keys are cached by ``kid``. A token naming an unknown ``kid`` triggers a
    fetch at most once per ``refresh_cooldown_s`` (one fetch however many
    threads ask); the set is also fetched again when older than
    ``max_key_age_s``, by the one call that finds it stale (other calls keep using the
    old keys meanwhile). An unknown ``kid`` is refused (``TokenRejected``)
    only when a fetch made for it does not list it; while the cooldown
    forbids a fetch the call fails with ``DependencyUnavailable`` (retryable:
    the token may be signed by a key published since the last fetch, and a
    client must not throw it away). A failed fetch is retried after
    ``failure_retry_s``, doubling with each further failure up to
    ``failure_retry_max_s``, not after the whole cooldown. While the endpoint
    is down the cached keys stay in use; with no key ever fetched every call
    fails with ``DependencyUnavailable``. Only keys with ``use`` ``sig`` (or
    no ``use``), a ``kid``, and an algorithm in ``algorithms`` are used;
    symmetric (``oct``) keys are ignored, and so are URLs and keys carried in
    a token (``jku``, ``x5u``, ``jwk``). Redirects are not followed.

    Token Status Lists (``status_list``, on by default) as for
    :class:`~auth_rpc.verify.local.LocalVerifier`: lists are fetched from
    ``status_list_prefix`` (default ``<issuer>/statuslists/``) with the same
    ``session`` and ``timeout_s`` and verified with the keys of the JWK Set.

    Raises ``ValueError`` for misconfiguration (an HMAC algorithm, ``none``).
    """

    def __init__(
        self,
        *,
        jwks_url: str,
        issuer: str,
        audience: str,
        algorithms: Iterable[str] = ("EdDSA", "RS256", "ES256"),
        timeout_s: float = DEFAULT_TIMEOUT_S,
        refresh_cooldown_s: float = 30.0,
        max_key_age_s: float = 300.0,
        failure_retry_s: float = 1.0,
        failure_retry_max_s: float = 8.0,
        max_jwks_bytes: int = 1 << 20,
        leeway_s: float = DEFAULT_LEEWAY_S,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S,
        revocations: RevocationCheck | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        status_list: str = STATUS_REQUIRED,
        status_list_prefix: str | None = None,
        status_max_age_s: float = DEFAULT_MAX_AGE_S,
        status_refresh_max_s: float = DEFAULT_REFRESH_MAX_S,
        status_checker: StatusListChecker | None = None,
    ) -> None:
        _check_url(jwks_url, "jwks_url")
        algs = _check_algorithms(algorithms, _ASYMMETRIC_ALGS)
        if not 0 < timeout_s <= 30:
            raise ValueError("timeout_s must be in (0, 30]")
        if min(refresh_cooldown_s, failure_retry_s, failure_retry_max_s) < 0 or max_key_age_s <= 0:
            raise ValueError("refresh intervals must not be negative")
        super().__init__(
            issuer=issuer,
            audience=audience,
            algorithms=algs,
            leeway_s=leeway_s,
            max_token_bytes=max_token_bytes,
            max_lifetime_s=max_lifetime_s,
            revocations=revocations if revocations is not None else NoRevocations(),
            cache_size=cache_size,
            cache_ttl_s=cache_ttl_s,
            clock=clock,
            status_list=status_list,
            status_list_prefix=status_list_prefix,
            status_max_age_s=status_max_age_s,
            status_refresh_max_s=status_refresh_max_s,
            status_checker=status_checker,
            status_session=session,
            status_timeout_s=timeout_s,
        )
        self.jwks_url = jwks_url
        self._timeout_s = float(timeout_s)
        self._cooldown_s = float(refresh_cooldown_s)
        self._max_key_age_s = float(max_key_age_s)
        self._failure_retry_s = float(failure_retry_s)
        self._failure_retry_max_s = max(float(failure_retry_max_s), self._failure_retry_s)
        self._max_jwks_bytes = max_jwks_bytes
        self._own_session = session is None
        self._session = session if session is not None else _new_session(2)
        # Published whole and never mutated afterwards: readers need no lock.
        self._keys: dict[str, _JwkEntry] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._last_ok = False
        self._last_error = ""  # why the last fetch failed ("" after a success)
        self._attempts = 0
        self._failures = 0  # consecutive failed fetches (the retry delay grows with them)
        self._fetch_lock = threading.Lock()

    @property
    def key_ids(self) -> frozenset[str]:
        """The ``kid`` of every key in use."""
        return frozenset(self._keys)

    @property
    def last_fetch_not_a_jwk_set(self) -> str:
        """Why the last fetch failed, when the endpoint answered with something not a JWK Set.

        ``""`` after a success, or when it failed without such an answer
        (unreachable, timeout, HTTP 5xx, 408 or 429: it may answer later).
        For start-up checks: ``posts-rpc serve`` exits with an error then.
        """
        error = self._last_error
        if error in ("not JSON", "not a JWK Set", "answer too large"):
            return error
        if error.startswith("HTTP "):
            code = error[5:]
            if code.isdigit() and code not in ("408", "429") and not code.startswith("5"):
                return error
        return ""

    @property
    def fetch_count(self) -> int:
        """How many fetches were attempted (for monitoring and tests)."""
        return self._attempts

    def prefetch(self) -> int:
        """Fetch the key set now; return the number of usable keys.

        Raises ``DependencyUnavailable`` when the endpoint cannot be reached or
        does not answer a JWK Set (the cached keys, if any, stay in use).
        """
        if not self._fetch_lock.acquire(timeout=2 * self._timeout_s + 1):
            raise DependencyUnavailable("JWKS endpoint unreachable")
        try:
            self._fetch_locked(self._clock())
            if not self._last_ok:
                raise DependencyUnavailable("JWKS endpoint unreachable")
            return len(self._keys)
        finally:
            self._fetch_lock.release()

    def _verify_uncached(self, token: str, now: float) -> Principal:
        header, alg = self._header(token)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("token lacks a key id")
        try:
            entry = self._key_for(kid, now)
        except _KeyNotFetchedYet:
            if not self._could_be_valid(token, now):
                # Whatever key signed it, this token is refused: say so now, not later.
                raise TokenRejected("unknown signing key") from None
            raise
        if alg not in entry.algorithms:
            raise TokenRejected("algorithm not allowed")
        payload = self._verify_signature(token, entry.key, alg, header)
        return self._principal(payload, now)

    def _could_be_valid(self, token: str, now: float) -> bool:
        """Whether the token's unverified claims could pass: our issuer and audience, unexpired.

        Only ever used to refuse early a token that would be refused anyway (a
        foreign issuer's token naming a kid we do not know), never to accept.
        """
        try:
            claims = _b64url_json(token.split(".")[1])
        except TokenRejected:
            return False
        if not isinstance(claims, dict) or claims.get("iss") != self.issuer:
            return False
        audiences = _audiences(claims.get("aud"))
        exp = claims.get("exp")
        if audiences is None or self.audience not in audiences:
            return False
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            return False
        return bool(exp > now - self._leeway_s)

    def _status_list_key(self, header: dict[str, Any], alg: str, now: float) -> Any:
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("token lacks a key id")
        entry = self._key_for(kid, now)
        if alg not in entry.algorithms:
            raise TokenRejected("algorithm not allowed")
        return entry.key

    def _key_for(self, kid: str, now: float) -> _JwkEntry:
        entry = self._keys.get(kid)
        if entry is not None:
            fetched_at = self._fetched_at
            if fetched_at is not None and not 0 <= now - fetched_at < self._max_key_age_s:
                self._refresh(now, wait=False)  # best effort; old keys serve if it fails
                entry = self._keys.get(kid)
                if entry is None:  # the key was withdrawn from the set
                    raise TokenRejected("unknown signing key")
            return entry
        fetched = self._refresh(now, wait=True)
        entry = self._keys.get(kid)
        if entry is not None:
            return entry
        if not self._last_ok:
            raise DependencyUnavailable("JWKS endpoint unreachable")
        if not fetched:
            # The cooldown forbids a fetch: the key may have been published since the
            # last one. Retryable, so that a client keeps its (possibly valid) token.
            raise _KeyNotFetchedYet("signing key not fetched yet; retry later")
        raise TokenRejected("unknown signing key")

    def _may_fetch(self, now: float) -> bool:
        last = self._last_attempt
        if last is None or now < last:  # never tried, or the clock went backwards
            return True
        if self._failures:
            # 1, 2, 4... times failure_retry_s after a failed fetch, at most failure_retry_max_s.
            interval = min(
                self._failure_retry_s * 2 ** min(self._failures - 1, 30), self._failure_retry_max_s
            )
        elif not self._keys:
            interval = self._failure_retry_s
        else:
            interval = self._cooldown_s
        return now - last >= interval

    def _refresh(self, now: float, *, wait: bool) -> bool:
        """Fetch if allowed; whether a fetch was made meanwhile (by this call or another)."""
        seen = self._attempts
        if wait:
            # Bounded: a fetch in progress ends within about two timeouts.
            if not self._fetch_lock.acquire(timeout=2 * self._timeout_s + 1):
                raise DependencyUnavailable("JWKS endpoint unreachable")
        elif not self._fetch_lock.acquire(blocking=False):
            return False
        try:
            if self._attempts != seen:
                return True  # another thread fetched while we waited: use its result
            if self._may_fetch(now):
                self._fetch_locked(now)
                return True
            return False
        finally:
            self._fetch_lock.release()

    def _fetch_locked(self, now: float) -> None:
        self._attempts += 1
        self._last_attempt = now
        try:
            keys = self._fetch()
        except _FetchError as exc:
            self._last_ok = False
            self._failures += 1
            self._last_error = str(exc)
            log.warning(
                "JWKS fetch from %s failed (%s); %d cached key(s) stay in use",
                self.jwks_url,
                exc,
                len(self._keys),
            )
            return
        if not keys:
            log.warning("JWKS at %s has no usable signing key", self.jwks_url)
        self._keys = keys
        self._fetched_at = now
        self._last_ok = True
        self._last_error = ""
        self._failures = 0

    def _fetch(self) -> dict[str, _JwkEntry]:
        deadline = time.monotonic() + 2 * self._timeout_s
        try:
            with self._session.get(
                self.jwks_url,
                timeout=(self._timeout_s, self._timeout_s),
                headers={"Accept": "application/jwk-set+json, application/json"},
                allow_redirects=False,
                stream=True,
            ) as resp:
                if resp.status_code != 200:
                    raise _FetchError(f"HTTP {resp.status_code}")
                body = _read_body(resp, self._max_jwks_bytes, deadline)
        except requests.RequestException as exc:
            raise _FetchError(type(exc).__name__) from exc
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise _FetchError("not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise _FetchError("not a JWK Set")
        keys: dict[str, _JwkEntry] = {}
        for jwk_data in document["keys"]:
            loaded = self._load_jwk(jwk_data)
            if loaded is None:
                continue
            kid, entry = loaded
            if kid in keys:
                log.warning("JWKS at %s repeats kid %s; the first is used", self.jwks_url, kid)
                continue
            keys[kid] = entry
        return keys

    def _load_jwk(self, data: Any) -> tuple[str, _JwkEntry] | None:
        """One usable verification key from a JWK, or ``None`` if it must be ignored."""
        loaded = load_jwk(data, self.algorithms)
        if loaded is None and isinstance(data, dict) and isinstance(data.get("kid"), str):
            log.debug("ignoring unusable JWK %s from %s", data["kid"], self.jwks_url)
        return loaded

    def close(self) -> None:
        super().close()
        if self._own_session:
            self._session.close()


