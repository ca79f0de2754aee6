"""What the four verification modes share: defaults, claim helpers, HTTP fetching."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import ssl
import time
import urllib.parse
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import requests
import requests.utils
import urllib3
from requests.adapters import HTTPAdapter

from auth_rpc.errors import TokenRejected
from auth_rpc.serving.transport import TLSClientConfig

log = logging.getLogger("auth_rpc.verify")

DEFAULT_LEEWAY_S = 30.0
DEFAULT_MAX_TOKEN_BYTES = 8192
DEFAULT_MAX_LIFETIME_S = 86400.0
DEFAULT_TIMEOUT_S = 2.0

#: RFC 9068 §2.1: "Resource servers MUST verify that the typ value is at+jwt or application/at+jwt".
_AT_JWT_TYPES = frozenset({"at+jwt", "application/at+jwt"})
_REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "jti")
_HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALG_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_ASYMMETRIC_ALGS = _RSA_ALGS | frozenset(_EC_ALG_BY_CURVE.values()) | {"EdDSA"}
_MIN_HMAC_SECRET_BYTES = 32
_MIN_RSA_BITS = 2048


def _b64url_json(segment: str) -> Any:
    try:
        raw = base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)
        return json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        raise TokenRejected("malformed token") from None


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TokenRejected(f"invalid {name} claim")
    return float(value)


def _audiences(value: Any) -> tuple[str, ...] | None:
    """``aud`` as a tuple (RFC 7519 §4.1.3: a string or an array of strings); None if malformed."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return tuple(value)
    return None


def _check_settings(issuer: str, audience: str, leeway_s: float) -> None:
    if not isinstance(issuer, str) or not issuer:
        raise ValueError("issuer must be configured")
    if not isinstance(audience, str) or not audience:
        raise ValueError("audience must be configured")
    if not 0 <= leeway_s <= 300:
        raise ValueError("leeway_s must be between 0 and 300 seconds")


class _FetchError(Exception):
    pass


def _read_body(resp: requests.Response, limit: int, deadline: float) -> bytes:
    """The response body, bounded in size and in total time (``_FetchError``)."""
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _FetchError("answer too large")
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_content(chunk_size=16384):
        size += len(chunk)
        if size > limit:
            raise _FetchError("answer too large")
        if time.monotonic() > deadline:
            raise _FetchError("answer too slow")
        chunks.append(chunk)
    return b"".join(chunks)


def _read_raw_body(resp: urllib3.BaseHTTPResponse, limit: int, deadline: float) -> bytes:
    """:func:`_read_body` for a urllib3 response read with ``preload_content=False``.

    Reads one socket read at a time (``read1``), so the deadline is checked
    after every read; the body is taken as sent (no ``Content-Encoding`` is
    asked for nor decoded: an encoded answer is malformed).
    """
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _FetchError("answer too large")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = resp.read1(16384, decode_content=False)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _FetchError("answer too large")
        if time.monotonic() > deadline:
            raise _FetchError("answer too slow")
        chunks.append(chunk)


def _http_pool(
    url: str,
    *,
    pool_size: int,
    timeout_s: float,
    tls: TLSClientConfig | ssl.SSLContext | None,
) -> urllib3.HTTPConnectionPool:
    """A keep-alive urllib3 connection pool for ``url``'s scheme, host and port.

    No retries, no redirects, no proxies or credentials from the environment.
    For https the server's certificate and hostname are verified: with ``tls``
    (a :class:`TLSClientConfig`: CA file, client certificate; or an
    ``ssl.SSLContext``), else against the CA bundle ``requests`` trusts by
    default. Up to ``pool_size`` idle connections are kept; more callers at
    once get connections of their own, closed after use.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    kw: dict[str, Any] = {
        "maxsize": pool_size,
        "block": False,
        "retries": False,
        "timeout": urllib3.Timeout(connect=timeout_s, read=timeout_s),
    }
    if parts.scheme == "https":
        if isinstance(tls, ssl.SSLContext):
            ctx = tls
        else:
            config = tls or TLSClientConfig(ca_file=requests.utils.DEFAULT_CA_BUNDLE_PATH)
            ctx = config.context()
            if config.server_hostname:
                kw["server_hostname"] = config.server_hostname
        return urllib3.HTTPSConnectionPool(
            host, parts.port or 443, ssl_context=ctx, cert_reqs="CERT_REQUIRED", **kw
        )
    return urllib3.HTTPConnectionPool(host, parts.port or 80, **kw)


def _new_session(pool_size: int) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc credentials from the environment
    # Shared by every serving thread: keep it stateless (no cookies from the server).
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _check_url(url: str, what: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http(s) URL")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
        log.warning("%s %s is plain HTTP: use HTTPS outside a trusted network", what, url)


# -- remote answers -----------------------------------------------------------


def _remote_audience_ok(audiences: tuple[str, ...] | None, audience: str, required: bool) -> None:
    if audiences is None:
        if required:
            raise TokenRejected("token has no audience")
        return
    if audience not in audiences:
        raise TokenRejected("wrong audience")


def _remote_issuer_ok(issuer: str | None, expected: str, required: bool) -> None:
    if issuer is None:
        if required:
            raise TokenRejected("token has no issuer")
        return
    if issuer != expected:
        raise TokenRejected("wrong issuer")


