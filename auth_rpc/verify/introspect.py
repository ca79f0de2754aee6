"""Introspection mode: RFC 7662 token introspection, any server."""

from __future__ import annotations

import base64
import json
import logging
import math
import ssl
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import requests
import urllib3

from auth_rpc.errors import DependencyUnavailable, TokenRejected
from auth_rpc.serving.transport import TLSClientConfig
from auth_rpc.verify._common import (
    DEFAULT_LEEWAY_S,
    DEFAULT_MAX_TOKEN_BYTES,
    DEFAULT_TIMEOUT_S,
    _audiences,
    _check_settings,
    _check_url,
    _FetchError,
    _http_pool,
    _read_body,
    _read_raw_body,
    _remote_audience_ok,
    _remote_issuer_ok,
)
from auth_rpc.verify.cache import DEFAULT_CACHE_SIZE, DEFAULT_CACHE_TTL_S, CachingVerifier
from auth_rpc.verify.principal import Principal

log = logging.getLogger(__name__)

# -- introspection ------------------------------------------------------------


class IntrospectionVerifier(CachingVerifier):
    """Asks an RFC 7662 introspection endpoint about each token (any server).

    POSTs ``token`` and ``token_type_hint=access_token`` with HTTP Basic client
    authentication (RFC 6749 §2.3.1) over a keep-alive connection pool (up to
    ``pool_size`` connections kept open); no redirects are followed. For an
    https URL the server's certificate and hostname are checked, against
    ``tls`` (a :class:`~auth_rpc.serving.transport.TLSClientConfig`: CA file,
    client certificate for mutual TLS; or an ``ssl.SSLContext``) or else the
    CA bundle ``requests`` trusts. The pool is urllib3's own: ``requests``'
    per-request machinery cost about half the CPU of an introspection. A
    ``requests.Session`` given as ``session`` is used instead (its settings, its
    adapters), at that cost. An answer is accepted only if ``active`` is the
    JSON ``true``, it has a ``sub``, ``exp`` (when present) is in the future,
    ``iss`` (when present) equals ``issuer`` and ``aud`` contains ``audience``.
    RFC 7662 makes ``aud`` optional, but without it a token issued for another
    service of the same authorization server would be accepted here, so by
    default an answer without ``aud`` is refused (``require_audience=False``
    relaxes it); ``iss`` is implied by the endpoint, so its absence is accepted
    unless ``require_issuer=True``. An answer without ``exp`` is cached for
    ``cache_ttl_s`` only. A refresh token (``token_type`` ``refresh_token``) is
    refused.

    ``verify`` raises ``DependencyUnavailable`` on connection errors, timeouts,
    any status but 200 (401: "introspection client credentials rejected"; 403:
    "introspection not permitted for this client", one not given the permission)
    and malformed answers. Construction raises ``ValueError`` when misconfigured.
    """

    def __init__(
        self,
        *,
        introspect_url: str,
        client_id: str,
        client_secret: str,
        issuer: str,
        audience: str,
        require_issuer: bool = False,
        require_audience: bool = True,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        leeway_s: float = DEFAULT_LEEWAY_S,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        max_answer_bytes: int = 65536,
        pool_size: int = 16,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        session: requests.Session | None = None,
        tls: TLSClientConfig | ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_settings(issuer, audience, leeway_s)
        _check_url(introspect_url, "introspect_url")
        if not client_id or not client_secret:
            raise ValueError("client_id and client_secret must be configured")
        if not 0 < timeout_s <= 30:
            raise ValueError("timeout_s must be in (0, 30]")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if session is not None and tls is not None:
            raise ValueError("give session or tls, not both (a session carries its own TLS)")
        super().__init__(
            max_token_bytes=max_token_bytes,
            cache_size=cache_size,
            cache_ttl_s=cache_ttl_s,
            clock=clock,
        )
        self.introspect_url = introspect_url
        self.issuer = issuer
        self.audience = audience
        self.client_id = client_id
        self._require_issuer = require_issuer
        self._require_audience = require_audience
        self._timeout_s = float(timeout_s)
        self._leeway_s = float(leeway_s)
        # Concurrent misses of one token share one round trip (CachingVerifier); the
        # others wait at most what a call of their own could take (connect, then the answer).
        self._coalesce = True
        self._miss_wait_s = 3 * self._timeout_s
        self._max_answer_bytes = max_answer_bytes
        # RFC 6749 §2.3.1: the client id and secret are form-encoded before Basic encoding.
        pair = f"{_form(client_id)}:{_form(client_secret)}".encode()
        self._headers = {
            "Authorization": "Basic " + base64.b64encode(pair).decode("ascii"),
            "Accept": "application/json",
        }
        self._session = session
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._raw_headers: dict[str, str] = {}
        if session is None:
            parts = urllib.parse.urlsplit(introspect_url)
            self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            self._raw_headers = {
                **self._headers,
                "Content-Type": "application/x-www-form-urlencoded",
            }
            self._pool = _http_pool(
                introspect_url, pool_size=pool_size, timeout_s=self._timeout_s, tls=tls
            )
        self._credentials_rejected = False

    def _cache_bound(self, principal: Principal) -> float:
        return math.inf if principal.expires_at == 0 else float(principal.expires_at)

    def _verify_uncached(self, token: str, now: float) -> Principal:
        answer = self._introspect(token)
        # RFC 7662 §2.2: "active" is REQUIRED, a boolean; anything but true is inactive.
        if answer.get("active") is not True:
            raise TokenRejected("token not active")
        token_type = answer.get("token_type")
        if isinstance(token_type, str) and token_type.lower() == "refresh_token":
            raise TokenRejected("not an access token")
        exp = _answer_number(answer, "exp")
        nbf = _answer_number(answer, "nbf")
        if exp is not None and exp <= now:
            raise TokenRejected("token expired")
        if nbf is not None and nbf > now + self._leeway_s:
            raise TokenRejected("token not yet valid")
        iss = answer.get("iss")
        if iss is not None and not isinstance(iss, str):
            raise DependencyUnavailable("introspection answer malformed")
        _remote_issuer_ok(iss, self.issuer, self._require_issuer)
        audiences = None
        if answer.get("aud") is not None:
            audiences = _audiences(answer["aud"])
            if audiences is None:
                raise DependencyUnavailable("introspection answer malformed")
        _remote_audience_ok(audiences, self.audience, self._require_audience)
        sub = answer.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenRejected("token has no subject")
        scope = answer.get("scope", "")
        client_id = answer.get("client_id", "")
        jti = answer.get("jti", "")
        if not all(isinstance(v, str) for v in (scope, client_id, jti)):
            raise DependencyUnavailable("introspection answer malformed")
        return Principal(
            subject=sub,
            scopes=frozenset(scope.split()),
            expires_at=0 if exp is None else int(exp),
            token_id=jti,
            client_id=client_id,
            issuer=iss or "",
            audience=audiences or (),
        )

    def check_credentials(self) -> None:
        """Introspect a dummy token once, to check the client credentials at start.

        Raises ``ValueError`` (a configuration error: the service cannot work)
        when the endpoint refuses the credentials (401) or the client's
        permission to introspect (403), and ``DependencyUnavailable`` when it
        cannot be reached or answers otherwise (it may come up later). A 200
        answer, whatever it says about the dummy token, passes.
        """
        status, _ = self._post(_PROBE_TOKEN)
        if status == 401:
            raise ValueError(
                f"{self.introspect_url} refused the client credentials of {self.client_id} "
                "(HTTP 401): check --client-id and --client-secret-file"
            )
        if status == 403:
            raise ValueError(
                f"{self.introspect_url} does not let client {self.client_id} introspect "
                "(HTTP 403): register it with auth-rpc add-client ID --introspect"
            )
        if status != 200:
            raise DependencyUnavailable(f"introspection endpoint answered HTTP {status}")

    def _post(self, token: str) -> tuple[int, bytes]:
        """POST ``token``: the status and (for 200) the body; ``DependencyUnavailable``
        when the endpoint cannot be reached, is too slow or answers too much."""
        deadline = time.monotonic() + 2 * self._timeout_s
        form = {"token": token, "token_type_hint": "access_token"}
        if self._pool is None:
            return self._post_with_session(form, deadline)
        try:
            resp = self._pool.urlopen(
                "POST",
                self._target,
                body=urllib.parse.urlencode(form).encode("ascii"),
                headers=self._raw_headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
            )
        except (urllib3.exceptions.HTTPError, OSError):
            raise DependencyUnavailable("introspection endpoint unreachable") from None
        complete = False
        try:
            status = resp.status
            body = _read_raw_body(resp, self._max_answer_bytes, deadline) if status == 200 else b""
            complete = status == 200
        except (urllib3.exceptions.HTTPError, OSError):
            raise DependencyUnavailable("introspection endpoint unreachable") from None
        except _FetchError as exc:
            raise DependencyUnavailable(f"introspection endpoint {exc}") from None
        finally:
            if not complete:
                resp.close()  # the rest of the answer is not read: the connection goes
            resp.release_conn()
        return status, body

    def _post_with_session(self, form: dict[str, str], deadline: float) -> tuple[int, bytes]:
        assert self._session is not None
        try:
            with self._session.post(
                self.introspect_url,
                data=form,
                headers=self._headers,
                timeout=(self._timeout_s, self._timeout_s),
                allow_redirects=False,
                stream=True,
            ) as resp:
                status = resp.status_code
                body = _read_body(resp, self._max_answer_bytes, deadline) if status == 200 else b""
        except requests.RequestException:
            raise DependencyUnavailable("introspection endpoint unreachable") from None
        except _FetchError as exc:
            raise DependencyUnavailable(f"introspection endpoint {exc}") from None
        return status, body

    def _introspect(self, token: str) -> dict[str, Any]:
        status, body = self._post(token)
        if status in (401, 403):
            # 403: the credentials are right, but the client was not given the
            # permission to introspect (auth-rpc add-client --introspect).
            reason = (
                "introspection not permitted for this client"
                if status == 403
                else "introspection client credentials rejected"
            )
            if not self._credentials_rejected:
                self._credentials_rejected = True
                log.error(
                    "%s by %s (client id %s)%s",
                    reason,
                    self.introspect_url,
                    self.client_id,
                    "; register it with: auth-rpc add-client ID --introspect"
                    if status == 403
                    else "",
                )
            raise DependencyUnavailable(reason)
        if status != 200:
            raise DependencyUnavailable(f"introspection endpoint answered HTTP {status}")
        self._credentials_rejected = False
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            raise DependencyUnavailable("introspection answer malformed") from None
        if not isinstance(answer, dict):
            raise DependencyUnavailable("introspection answer malformed")
        return answer

    def close(self) -> None:
        super().close()
        if self._pool is not None:
            self._pool.close()


#: What :meth:`IntrospectionVerifier.check_credentials` asks about: no token of any server.
_PROBE_TOKEN = "startup-credentials-check"  # noqa: S105 - a dummy, not a secret


def _form(value: str) -> str:
    return urllib.parse.quote_plus(value, safe="")


def _answer_number(answer: dict[str, Any], name: str) -> float | None:
    value = answer.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DependencyUnavailable("introspection answer malformed")
    return float(value)


