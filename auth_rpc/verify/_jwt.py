"""The JWT policy shared by the local and jwks modes (RFC 9068 / RFC 8725 checks)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from auth_rpc.errors import AuthError, DependencyUnavailable, TokenRejected
from auth_rpc.verify._common import (
    _AT_JWT_TYPES,
    _EC_ALG_BY_CURVE,
    _MIN_RSA_BITS,
    _REQUIRED_CLAIMS,
    _RSA_ALGS,
    _audiences,
    _b64url_json,
    _check_settings,
    _number,
)
from auth_rpc.verify.cache import CachingVerifier
from auth_rpc.verify.principal import NoRevocations, Principal, RevocationCheck

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
        if not isinstance(revocations, NoRevocations):
            self._recheck = self._check_revoked
        self._jws = jwt.PyJWS(options={"enforce_minimum_key_length": True})

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

    def _verify_signature(self, token: str, key: Any, alg: str) -> bytes:
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
        payload: bytes = decoded["payload"]
        return payload

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
        )


