"""The JWT policy shared by the local and jwks modes (RFC 9068 / RFC 8725 checks)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from auth_rpc.errors import AuthError, DependencyUnavailable, TokenRejected
from auth_rpc.serving.metrics import Snapshot
from auth_rpc.verify._common import (
    _AT_JWT_TYPES,
    _EC_ALG_BY_CURVE,
    _MIN_RSA_BITS,
    _REQUIRED_CLAIMS,
    _RSA_ALGS,
    DEFAULT_TIMEOUT_S,
    _audiences,
    _b64url_json,
    _check_settings,
    _number,
)
from auth_rpc.verify.cache import CachingVerifier
from auth_rpc.verify.principal import NoRevocations, Principal, RevocationCheck
from auth_rpc.verify.statuslist import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_REFRESH_MAX_S,
    STATUS_LIST_TYP,
    StatusListChecker,
    check_uri_prefix,
    default_uri_prefix,
    parse_status_claim,
)

#: ``status_list`` settings of the local and jwks verifiers: every token must
#: carry a ``status`` claim whose bit is checked (the default), only tokens
#: that carry one are checked (tokens of issuers without status lists), or
#: the claim is ignored.
STATUS_REQUIRED, STATUS_IF_PRESENT, STATUS_OFF = "required", "if-present", "off"
STATUS_MODES = (STATUS_REQUIRED, STATUS_IF_PRESENT, STATUS_OFF)
_STATUS_LIST_TYPES = frozenset({STATUS_LIST_TYP, "application/" + STATUS_LIST_TYP})

# The compact JWS form the fast path takes (RFC 7515 §7.1: three base64url segments
# without padding); anything else -- padding, other characters, empty segments -- goes
# through PyJWS, whose answer is the reference.
_COMPACT_JWS = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")
# The last character of a canonical base64url segment of length 4n+2 (4n+3) leaves its low
# 4 (2) bits zero; PyJWS refuses any other (it re-encodes and compares).
_CANONICAL_LAST = (None, None, frozenset("AQgw"), frozenset("AEIMQUYcgkosw048"))
_b64decode = base64.urlsafe_b64decode


def _canonical_b64url(segment: str) -> bool:
    rest = len(segment) & 3
    if rest == 0:
        return True
    last = _CANONICAL_LAST[rest]
    return last is not None and segment[-1] in last

# -- shared JWT policy --------------------------------------------------------


def _algorithms_for_key(key: Any) -> frozenset[str]:
    """The JWS algorithms ``key`` can verify; ``ValueError`` for an unusable key."""
    if isinstance(key, (Ed25519PublicKey, Ed448PublicKey)):
        return frozenset({"EdDSA"})
    if isinstance(key, RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA keys must have at least {_MIN_RSA_BITS} bits")
        return _RSA_ALGS
    if isinstance(key, EllipticCurvePublicKey):
        alg = _EC_ALG_BY_CURVE.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return frozenset({alg})
    raise ValueError(f"unsupported key type {type(key).__name__}")


def _check_algorithms(configured: Iterable[str] | None, allowed: frozenset[str]) -> frozenset[str]:
    if configured is None:
        raise ValueError("algorithms must be configured")
    algs = frozenset(configured)
    if not algs:
        raise ValueError("at least one algorithm must be allowed")
    if any(a.lower() == "none" for a in algs):
        raise ValueError('the "none" algorithm is never allowed')
    unusable = algs - allowed
    if unusable:
        raise ValueError(f"algorithms {sorted(unusable)} cannot be used with this key")
    return algs


class _JwtVerifier(CachingVerifier):
    """RFC 9068 / RFC 8725 checks shared by the local and JWKS verifiers."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        algorithms: frozenset[str],
        leeway_s: float,
        max_token_bytes: int,
        max_lifetime_s: float,
        revocations: RevocationCheck,
        cache_size: int,
        cache_ttl_s: float,
        clock: Callable[[], float],
        status_list: str = STATUS_REQUIRED,
        status_list_prefix: str | None = None,
        status_max_age_s: float = DEFAULT_MAX_AGE_S,
        status_refresh_max_s: float = DEFAULT_REFRESH_MAX_S,
        status_checker: StatusListChecker | None = None,
        status_session: requests.Session | None = None,
        status_timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        _check_settings(issuer, audience, leeway_s)
        if max_lifetime_s <= 0:
            raise ValueError("max_lifetime_s must be positive")
        super().__init__(
            max_token_bytes=max_token_bytes,
            cache_size=cache_size,
            cache_ttl_s=cache_ttl_s,
            clock=clock,
        )
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self._leeway_s = float(leeway_s)
        self._max_lifetime_s = float(max_lifetime_s)
        self._revocations = revocations
        self._jws = jwt.PyJWS(options={"enforce_minimum_key_length": True})
        #: id(key) -> (key, {alg: (algorithm, prepared key)}) for the fast path; the entry
        #: holds the key itself, so its id cannot be reused while the entry exists.
        self._prepared: dict[int, tuple[Any, dict[str, tuple[Any, Any]]]] = {}
        if status_list not in STATUS_MODES:
            raise ValueError(f"status_list must be one of {STATUS_MODES}")
        self.status_list = status_list
        self._status_required = status_list == STATUS_REQUIRED
        self._own_status = False
        self._status: StatusListChecker | None = None
        if status_list != STATUS_OFF:
            if status_checker is None:
                prefix = status_list_prefix or default_uri_prefix(issuer)
                try:
                    check_uri_prefix(prefix)
                except ValueError as exc:
                    raise ValueError(
                        f"{exc}; the default is <issuer>/statuslists/, which needs an http(s) "
                        "issuer: set status_list_prefix, or status_list='off' for tokens of an "
                        "issuer without status lists"
                    ) from None
                status_checker = StatusListChecker(
                    uri_prefix=prefix,
                    verify_token=self._verify_status_list_token,
                    issuer=issuer,
                    max_age_s=status_max_age_s,
                    refresh_max_s=status_refresh_max_s,
                    timeout_s=status_timeout_s,
                    leeway_s=leeway_s,
                    session=status_session,
                    clock=clock,
                )
                self._own_status = True
            self._status = status_checker
        # Consulted on every call, cached or not: a cached answer never hides a revocation.
        checks: list[Callable[[Principal], None]] = []
        if not isinstance(revocations, NoRevocations):
            checks.append(self._check_revoked)
        if self._status is not None:
            checks.append(self._check_status)
        if len(checks) == 1:
            self._recheck = checks[0]
        elif checks:
            self._recheck = self._check_all

    def metrics_snapshot(self) -> Snapshot:
        """As the base class's, with the age of the Token Status Lists held."""
        snapshot = super().metrics_snapshot()
        if self._status is not None:
            ages = self._status.list_ages()
            snapshot["token_status_lists_held"] = {(): len(ages)}
            if ages:
                snapshot["token_status_list_age_seconds"] = {(): max(ages)}
        return snapshot

    @property
    def status_checker(self) -> StatusListChecker | None:
        """The Status List checker in use (``None`` with ``status_list="off"``)."""
        return self._status

    def _check_all(self, principal: Principal) -> None:
        self._check_revoked(principal)
        self._check_status(principal)

    def _check_status(self, principal: Principal) -> None:
        ref = principal.status
        if ref is None:
            if self._status_required:
                raise TokenRejected("token has no status claim")
            return
        self._status.check(ref)  # type: ignore[union-attr]  # set whenever this is a check

    def _status_list_key(self, header: dict[str, Any], alg: str, now: float) -> Any:
        """The key that verifies a Status List Token with ``header`` (the subclass's keys)."""
        raise NotImplementedError  # pragma: no cover

    def _verify_status_list_token(self, token: str, now: float) -> dict[str, Any]:
        """The claims of a Status List Token signed by a key trusted for access tokens.

        The same policy as for access tokens (configured algorithms only, no
        ``crit``, keys from configuration), but ``typ`` must be
        ``statuslist+jwt``. The claims are the checker's to judge. Raises
        TokenRejected (DependencyUnavailable from the JWKS).
        """
        head, sep, rest = token.partition(".")
        if not sep or rest.count(".") != 1:
            raise TokenRejected("malformed token")
        header = _b64url_json(head)
        if not isinstance(header, dict):
            raise TokenRejected("malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenRejected("algorithm not allowed")
        typ = header.get("typ")
        # draft-ietf-oauth-status-list section 5.1: "typ: REQUIRED. The JWT type MUST be
        # statuslist+jwt" - an access token is never taken for a list, nor a list for one.
        if not isinstance(typ, str) or typ.lower() not in _STATUS_LIST_TYPES:
            raise TokenRejected("not a status list token")
        if "crit" in header:
            raise TokenRejected("unsupported critical header")
        payload = self._verify_signature(
            token, self._status_list_key(header, alg, now), alg, header
        )
        try:
            claims = json.loads(payload)
        except (ValueError, RecursionError):
            raise TokenRejected("malformed token") from None
        if not isinstance(claims, dict):
            raise TokenRejected("malformed token")
        return claims

    def close(self) -> None:
        super().close()
        if self._own_status and self._status is not None:
            self._status.close()

    def _check_revoked(self, principal: Principal) -> None:
        try:
            revoked = self._revocations.is_revoked(principal.token_id)
        except AuthError:
            raise
        except Exception as exc:
            raise DependencyUnavailable("revocation check failed") from exc
        if revoked:
            raise TokenRejected("token revoked")

    def _header(self, token: str) -> tuple[dict[str, Any], str]:
        """The unverified JOSE header and its ``alg``, after the policy checks on it."""
        head, sep, rest = token.partition(".")
        if not sep or rest.count(".") != 1:
            raise TokenRejected("malformed token")
        header = _b64url_json(head)
        if not isinstance(header, dict):
            raise TokenRejected("malformed token")
        alg = header.get("alg")
        # RFC 8725 §3.1: "Libraries MUST enable the caller to specify a supported set of
        # algorithms and MUST NOT use any other algorithms" -- the header only selects
        # among the configured ones, and "none" is never configurable.
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenRejected("algorithm not allowed")
        typ = header.get("typ")
        # RFC 9068 §4: "Resource servers MUST verify that the typ header value is at+jwt
        # or application/at+jwt and reject tokens carrying any other value."
        if not isinstance(typ, str) or typ.lower() not in _AT_JWT_TYPES:
            raise TokenRejected("wrong token type")
        # RFC 7515 §4.1.11: a recipient that does not understand a "crit" extension
        # MUST reject the JWS. We understand none.
        if "crit" in header:
            raise TokenRejected("unsupported critical header")
        # jku, x5u, jwk and x5c are ignored: keys come only from configuration.
        return header, alg

    def _verify_signature(
        self, token: str, key: Any, alg: str, header: dict[str, Any] | None = None
    ) -> bytes:
        """The verified payload of ``token`` (``TokenRejected`` otherwise).

        ``header`` is the token's header as :meth:`_header` parsed it; with it, a
        token in the plain compact form is checked here: the same decoding,
        header checks and ``Algorithm.verify`` as PyJWS, without its per-call
        costs (a Python loop over every character, preparing the key on every
        call). Any other token goes to PyJWS, which stays the reference for
        what is accepted (tests compare the two on mutated tokens).
        """
        if header is not None:
            payload = self._verify_compact(token, key, alg, header)
            if payload is not None:
                return payload
        try:
            decoded = self._jws.decode_complete(token, key=key, algorithms=[alg])
        except jwt.InvalidSignatureError:
            raise TokenRejected("invalid token signature") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRejected("algorithm not allowed") from None
        except jwt.InvalidKeyError:
            raise TokenRejected("invalid token signature") from None
        except jwt.PyJWTError:
            raise TokenRejected("malformed token") from None
        payload_bytes: bytes = decoded["payload"]
        return payload_bytes

    def _verify_compact(
        self, token: str, key: Any, alg: str, header: dict[str, Any]
    ) -> bytes | None:
        """The fast path of :meth:`_verify_signature`; ``None``: not taken, ask PyJWS."""
        match = _COMPACT_JWS.fullmatch(token)
        if match is None or "b64" in header:
            return None
        if "kid" in header and not isinstance(header["kid"], str):
            return None  # PyJWS: "Key ID header parameter must be a string"
        head, body, crypto = match.groups()
        if not (_canonical_b64url(head) and _canonical_b64url(body) and _canonical_b64url(crypto)):
            return None
        if alg not in self.algorithms:  # _header checked it; never trust a caller for it
            raise TokenRejected("algorithm not allowed")
        prepared = self._prepared_key(key, alg)
        if prepared is None:
            return None
        algorithm, verify_key = prepared
        # _COMPACT_JWS matched ASCII only, so the text's bytes are the signing input.
        signing_input = token[: match.end(2)].encode()
        try:
            signature = _b64decode(crypto + "=" * (-len(crypto) & 3))
            payload: bytes = _b64decode(body + "=" * (-len(body) & 3))
        except ValueError:  # binascii.Error; not expected after the pattern matched
            return None
        if not algorithm.verify(signing_input, verify_key, signature):
            raise TokenRejected("invalid token signature")
        return payload

    def _prepared_key(self, key: Any, alg: str) -> tuple[Any, Any] | None:
        """PyJWT's algorithm object for ``alg`` and ``key`` prepared for it, once per key."""
        entry = self._prepared.get(id(key))
        if entry is not None and entry[0] is key:
            found = entry[1].get(alg)
            if found is not None:
                return found
        try:
            algorithm = self._jws.get_algorithm_by_name(alg)
            prepared = algorithm.prepare_key(key)
            if algorithm.check_key_length(prepared):
                return None  # a short key: PyJWS refuses it (enforce_minimum_key_length)
        except (jwt.PyJWTError, NotImplementedError, ValueError, TypeError):
            return None
        if entry is None or entry[0] is not key:
            if len(self._prepared) >= 64:  # keys come and go with JWKS refreshes
                self._prepared.clear()
            entry = (key, {})
            self._prepared[id(key)] = entry
        entry[1][alg] = (algorithm, prepared)
        return algorithm, prepared

    def _principal(self, payload: bytes, now: float) -> Principal:
        try:
            claims = json.loads(payload)
        except (ValueError, RecursionError):
            raise TokenRejected("malformed token") from None
        if not isinstance(claims, dict):
            raise TokenRejected("malformed token")
        for name in _REQUIRED_CLAIMS:
            if claims.get(name) is None:
                raise TokenRejected(f"token lacks the {name} claim")
        exp = _number(claims, "exp")
        iat = _number(claims, "iat")
        nbf = _number(claims, "nbf")
        assert exp is not None and iat is not None
        leeway = self._leeway_s
        # RFC 7519 §4.1.4: "the current date/time MUST be before the expiration date/time".
        if exp <= now - leeway:
            raise TokenRejected("token expired")
        if iat > now + leeway:
            raise TokenRejected("token issued in the future")
        if nbf is not None and nbf > now + leeway:
            raise TokenRejected("token not yet valid")
        if exp <= iat:
            raise TokenRejected("invalid token lifetime")
        if exp - iat > self._max_lifetime_s:
            raise TokenRejected("token lifetime too long")
        # RFC 9068 §4: "The resource server MUST validate that the iss claim exactly matches
        # the issuer" and "MUST validate that the aud claim contains a resource indicator
        # value corresponding to an identifier the resource server expects for itself".
        if claims["iss"] != self.issuer:
            raise TokenRejected("wrong issuer")
        audiences = _audiences(claims["aud"])
        if audiences is None:
            raise TokenRejected("invalid aud claim")
        if self.audience not in audiences:
            raise TokenRejected("wrong audience")
        sub, jti = claims["sub"], claims["jti"]
        if not isinstance(sub, str) or not sub:
            raise TokenRejected("invalid sub claim")
        if not isinstance(jti, str) or not jti:
            raise TokenRejected("invalid jti claim")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise TokenRejected("invalid scope claim")
        client_id = claims.get("client_id", "")
        if not isinstance(client_id, str):
            raise TokenRejected("invalid client_id claim")
        return Principal(
            subject=sub,
            scopes=frozenset(scope.split()),
            expires_at=int(exp),
            token_id=jti,
            client_id=client_id,
            issuer=self.issuer,
            audience=audiences,
            # draft-ietf-oauth-status-list section 8.3: the token's own checks (above)
            # come first; its status is read on every call (``_check_status``).
            status=parse_status_claim(claims) if self._status is not None else None,
        )


