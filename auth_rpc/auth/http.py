"""The Auth service's HTTP side: a plain WSGI application (no framework).

Endpoints (the contract's "HTTP endpoints of the Auth service"):

- ``GET /.well-known/jwks.json`` -- RFC 7517 JWK Set (public keys only);
- ``GET /.well-known/oauth-authorization-server`` -- RFC 8414 metadata;
- ``POST /token`` -- RFC 6749: ``password``, ``refresh_token`` and
  ``client_credentials`` grants, errors as section 5.2; each takes an RFC 8707
  ``resource`` (one, naming an audience the account may use, as registered,
  e.g. ``notes``: the access token's ``aud``; else 400 ``invalid_target``);
- ``POST /introspect`` -- RFC 7662, for clients given the permission only
  (``add-client --introspect``; another client gets 403 ``unauthorized_client``);
- ``POST /revoke`` -- RFC 7009, for registered clients only;
- ``GET /statuslists/<k>`` -- a Token Status List (draft-ietf-oauth-status-list):
  ``application/statuslist+jwt``, with ``ETag`` (``If-None-Match`` gives 304) and
  gzip when accepted; 404 for a list unknown or retired;
- ``GET /statuslists`` -- the Status List Aggregation (``{"status_lists": [uri...]}``);
- ``GET /healthz`` -- 200 when the service can serve, else 503;
- ``GET /metrics`` -- the Prometheus text format, when built with ``metrics``
  (:mod:`auth_rpc.serving.metrics`; requests are counted by endpoint and status).

The app calls only the :class:`auth_rpc.auth.service.AuthService` facade: it
compares no secret itself and keeps no state. Internal errors become OAuth
error responses in one place (:data:`HTTP_ERROR_MAP`, :func:`oauth_error_for`).
Nothing here logs a request body, an ``Authorization`` header, a token or a
password; the last-resort handler logs the exception's class and stack only
(an exception's message might quote input).

Access log: one line per request on the logger ``auth_rpc.access.http`` (INFO),
``http method=POST path=/token status=200 latency_ms=12.345 client=reporter
subject=alice peer=127.0.0.1``: the path without its query string (a path that
is no endpoint of ours is logged as ``?``, since it could carry anything), the
authenticated client id and the subject of a successful password grant (``-``
when unknown or not authenticated), and the peer address (``REMOTE_ADDR``: the
TCP peer, or the TLS front's client). Names are percent-encoded outside
printable ASCII. Never a token, secret, password, header or body.

Client authentication (RFC 6749 section 2.3.1) is accepted as HTTP Basic
(``client_secret_basic``, id and secret form-encoded before base64 as the RFC
says) or as ``client_id``/``client_secret`` body parameters
(``client_secret_post``), never both in one request. A ``client_id`` body
parameter equal to the Basic user name is tolerated (it identifies, it does
not authenticate).

Endpoint URLs in the metadata are built from ``base_url`` when given
(recommended: the public URL, e.g. ``https://auth.example.com``), otherwise
from the request's scheme, ``Host`` header and ``SCRIPT_NAME``. A ``Host``
that is not a plain host name or address (with an optional port) is refused.

:func:`make_app` builds the app; the caller serves it with waitress (see
:class:`auth_rpc.auth.server.HttpListener`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote_plus, urlsplit

from auth_rpc import errors
from auth_rpc.serving.metrics import CONTENT_TYPE as METRICS_TYPE
from auth_rpc.serving.metrics import HttpCounts, ServiceMetrics, Snapshot

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from auth_rpc.auth.service import AuthService

__all__ = [
    "HTTP_ERROR_MAP",
    "JWKS_MAX_AGE_S",
    "OAuthError",
    "make_app",
    "oauth_error_for",
]

log = logging.getLogger("auth_rpc.auth.http")
#: One line per HTTP request (see the module docstring).
access_log = logging.getLogger("auth_rpc.access.http")

#: How long a client may cache the JWK Set and the metadata, in seconds.
JWKS_MAX_AGE_S = 300

#: The most form parameters a request may carry (a token request needs five).
MAX_FORM_FIELDS = 32

GRANT_TYPES = ("password", "refresh_token", "client_credentials")
CLIENT_AUTH_METHODS = ("client_secret_basic", "client_secret_post")

JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATH = "/.well-known/oauth-authorization-server"
TOKEN_PATH = "/token"  # noqa: S105  # a URL path, not a password
INTROSPECT_PATH = "/introspect"
REVOKE_PATH = "/revoke"
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
STATUS_LISTS_PATH = "/statuslists"
STATUS_LIST_TYPE = "application/statuslist+jwt"
#: How long a client may cache the aggregation (the lists themselves say ``ttl``).
AGGREGATION_MAX_AGE_S = 60
_LIST_SEGMENT = re.compile(r"[1-9][0-9]{0,17}\Z")

FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"

WWW_AUTHENTICATE = ("WWW-Authenticate", 'Basic realm="auth-rpc", charset="UTF-8"')

# RFC 6749 Appendix A.4 (scope): scope-token = 1*( %x21 / %x23-5B / %x5D-7E ),
# separated by single spaces (section 3.3).
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+(?: [\x21\x23-\x5b\x5d-\x7e]+)*\Z")
# RFC 6749 section 5.2: "Values for the "error_description" parameter MUST NOT
# include characters outside the set %x20-21 / %x23-5B / %x5D-7E."
_DESCRIPTION_BAD = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,15}\Z")
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?\Z"
)
# Body parameters that carry credentials: never accepted in the query string.
_SECRET_PARAMS = frozenset({"password", "client_secret", "refresh_token", "token"})


class OAuthError(Exception):
    """An error response: HTTP status, OAuth ``error`` code and description.

    Raised inside the app and turned into the response by the dispatcher.
    ``description`` is shown to the client: it never quotes a secret.
    """

    def __init__(
        self,
        status: int,
        error: str,
        description: str = "",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error
        self.description = description
        self.headers = headers or []

    def body(self) -> dict[str, object]:
        out: dict[str, object] = {"error": self.error}
        if self.description:
            out["error_description"] = _safe_description(self.description)
        return out


#: Every internal error class and the (HTTP status, OAuth error code) it becomes.
#: ``InvalidCredentials`` during client authentication is 401 ``invalid_client``
#: instead (see :func:`oauth_error_for`); ``InvalidInput`` naming the ``scope``
#: field is ``invalid_scope``, naming the ``audience`` field ``invalid_target``.
HTTP_ERROR_MAP: dict[type[errors.AuthError], tuple[int, str]] = {
    # RFC 6749 5.2 invalid_grant: "The provided authorization grant (e.g., ...,
    # resource owner credentials) or refresh token is invalid, expired, revoked".
    errors.TokenRejected: (400, "invalid_grant"),
    errors.InvalidCredentials: (400, "invalid_grant"),
    # RFC 6749 5.2 invalid_scope: "The requested scope is invalid, unknown,
    # malformed, or exceeds the scope granted by the resource owner."
    errors.Forbidden: (400, "invalid_scope"),
    errors.InvalidInput: (400, "invalid_request"),
    # No endpoint here looks a resource up; should one, the request names
    # something that does not exist, which OAuth calls a bad request.
    errors.NotFoundError: (400, "invalid_request"),
    # RFC 6585 section 4: 429 "indicates that the user has sent too many
    # requests in a given amount of time"; Retry-After is added by the app.
    errors.Throttled: (429, "slow_down"),
    errors.DependencyUnavailable: (503, "temporarily_unavailable"),
}


def oauth_error_for(exc: errors.AuthError, *, client_auth: bool = False) -> OAuthError:
    """The error response for an internal error (the one place they are mapped).

    ``client_auth`` says the failing call authenticated a client, so wrong
    credentials are ``invalid_client`` (401, with ``WWW-Authenticate``).

    Raises:
        TypeError: ``exc`` is of a class with no mapping (a bug; tested).
    """
    for cls in type(exc).__mro__:
        if not (issubclass(cls, errors.AuthError) and cls in HTTP_ERROR_MAP):
            continue
        status, code = HTTP_ERROR_MAP[cls]
        headers: list[tuple[str, str]] = []
        if client_auth and isinstance(exc, errors.InvalidCredentials):
            # RFC 6749 5.2 invalid_client: "Client authentication failed ... The
            # authorization server MAY return an HTTP 401 (Unauthorized) status
            # code to indicate which HTTP authentication schemes are supported."
            status, code = 401, "invalid_client"
            headers.append(WWW_AUTHENTICATE)
        elif isinstance(exc, errors.InvalidInput) and exc.field == "scope":
            code = "invalid_scope"
        elif isinstance(exc, errors.InvalidInput) and exc.field == "audience":
            # RFC 8707 section 2: "invalid_target: The requested resource is
            # invalid, missing, unknown, or malformed." On HTTP the audience
            # is asked for with the resource parameter: the description says so.
            return OAuthError(status, "invalid_target", _resource_description(exc))
        elif isinstance(exc, errors.Throttled):
            # RFC 9110 10.2.3: Retry-After = HTTP-date / delay-seconds (an integer).
            headers.append(("Retry-After", str(max(1, math.ceil(exc.retry_after_ms / 1000)))))
        return OAuthError(status, code, exc.message, headers)
    raise TypeError(f"no HTTP mapping for {type(exc).__name__}")


def _resource_description(exc: errors.InvalidInput) -> str:
    return "resource: " + exc.message.partition(": ")[2]


def _safe_description(text: str) -> str:
    return _DESCRIPTION_BAD.sub("?", text)[:200]


def _invalid_request(description: str) -> OAuthError:
    return OAuthError(400, "invalid_request", description)


def _invalid_client(description: str) -> OAuthError:
    return OAuthError(401, "invalid_client", description, [WWW_AUTHENTICATE])


@dataclass(frozen=True)
class _Response:
    status: int
    body: dict[str, object]
    headers: list[tuple[str, str]] = field(default_factory=list)
    cache: str = "no-store"
    #: Sent as is instead of ``body`` as JSON (a Status List Token).
    raw: bytes | None = None
    content_type: str = JSON_TYPE


@dataclass
class _AccessNote:
    """What a request's access-log line says about who made it (filled in as learnt)."""

    client: str = "-"
    subject: str = "-"


_NOTE_KEY = "auth_rpc.access_note"
#: Characters of a logged name or address kept as they are (the rest percent-encoded).
_LOG_SAFE = "!$&'()*+,;:@/~._-[]"
#: A path that is no endpoint is logged if it is short segments of these only
#: (no 20-character piece of a token can fit), else as "?".
_LOGGABLE_PATH = re.compile(r"(?:/[A-Za-z0-9._-]{0,16}){1,8}\Z")
_METHOD_RE = re.compile(r"[A-Z]{1,16}\Z")


def _note(environ: WSGIEnvironment) -> _AccessNote:
    note = environ.get(_NOTE_KEY)
    if not isinstance(note, _AccessNote):
        note = _AccessNote()
        environ[_NOTE_KEY] = note
    return note


def _log_value(value: object) -> str:
    text = str(value)[:128]
    return quote(text, safe=_LOG_SAFE) if text else "-"


@dataclass(frozen=True)
class _ClientCredentials:
    client_id: str
    client_secret: str


@dataclass(frozen=True)
class _Route:
    methods: tuple[str, ...]
    handler: Callable[[WSGIEnvironment], _Response]


class AuthHttpApp:
    """The WSGI application; build it with :func:`make_app`."""

    def __init__(
        self,
        service: AuthService,
        *,
        base_url: str | None,
        max_body_bytes: int,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._service = service
        self._metrics = metrics
        self._counts = HttpCounts() if metrics is not None else None
        self._base_url = base_url
        self._max_body_bytes = max_body_bytes
        get = ("GET", "HEAD")
        self._routes: dict[str, _Route] = {
            JWKS_PATH: _Route(get, self._jwks),
            METADATA_PATH: _Route(get, self._metadata),
            TOKEN_PATH: _Route(("POST",), self._token),
            INTROSPECT_PATH: _Route(("POST",), self._introspect),
            REVOKE_PATH: _Route(("POST",), self._revoke),
            HEALTH_PATH: _Route(get, self._health),
            STATUS_LISTS_PATH: _Route(get, self._status_lists),
        }
        # RFC 8414 section 3: "If the issuer identifier value contains a path
        # component, any terminating "/" MUST be removed before inserting
        # "/.well-known/" and the well-known URI suffix between the host
        # component and the path component."
        issuer_path = urlsplit(service.issuer).path.rstrip("/")
        if issuer_path:
            self._routes[METADATA_PATH + issuer_path] = _Route(get, self._metadata)
        if metrics is not None:
            self._routes[METRICS_PATH] = _Route(get, self._metrics_text)
            metrics.add_source(self._counts_snapshot)

    # -- WSGI entry -------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        path = str(environ.get("PATH_INFO", "")) or "/"
        note = _note(environ)
        try:
            response = self._dispatch(environ, method, path)
        except OAuthError as exc:
            response = _Response(exc.status, exc.body(), exc.headers)
        except Exception as exc:  # the last resort: no request crashes the app
            # Class and stack only: the message of an arbitrary exception may
            # quote the input (a token, a password).
            log.error(
                "internal error in %s %s: %s\n%s",
                method,
                self._loggable_path(path),
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
            )
            response = _Response(500, {"error": "server_error"})
        try:
            return _send(start_response, method, response)
        finally:
            counts = self._counts
            if counts is not None:
                counts.record(self._endpoint(path), response.status, time.perf_counter() - started)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "http method=%s path=%s status=%d latency_ms=%.3f client=%s subject=%s "
                    "peer=%s",
                    method if _METHOD_RE.match(method) else "?",
                    self._loggable_path(path),
                    response.status,
                    (time.perf_counter() - started) * 1000.0,
                    note.client,
                    note.subject,
                    _log_value(environ.get("REMOTE_ADDR", "")),
                )

    def _endpoint(self, path: str) -> str:
        """The metrics' ``endpoint`` label: a route of ours, or ``other`` (never the path)."""
        if path in self._routes:
            return path
        if path.startswith(STATUS_LISTS_PATH + "/") and _LIST_SEGMENT.match(
            path[len(STATUS_LISTS_PATH) + 1 :]
        ):
            return STATUS_LISTS_PATH + "/{id}"
        return "other"

    def _counts_snapshot(self) -> Snapshot:
        return self._counts.snapshot() if self._counts is not None else {}

    def _metrics_text(self, environ: WSGIEnvironment) -> _Response:
        assert self._metrics is not None
        # The service's own counts are a source too (added by the server).
        return _Response(200, {}, raw=self._metrics.render(), content_type=METRICS_TYPE)

    def _loggable_path(self, path: str) -> str:
        """``path`` if it is one of ours or harmless (see ``_LOGGABLE_PATH``), else ``?``."""
        if path in self._routes or _LOGGABLE_PATH.match(path):
            return _log_value(path)
        return "?"

    def _dispatch(self, environ: WSGIEnvironment, method: str, path: str) -> _Response:
        route = self._routes.get(path)
        if route is None and path.startswith(STATUS_LISTS_PATH + "/"):
            route = _Route(("GET", "HEAD"), self._status_list)
        if route is None:
            return _Response(404, {"error": "not_found"})
        if method not in route.methods:
            # RFC 9110 15.5.6: "The origin server MUST generate an Allow header
            # field in a 405 response containing a list of the target
            # resource's currently supported methods."
            return _Response(
                405, {"error": "method_not_allowed"}, [("Allow", ", ".join(route.methods))]
            )
        return route.handler(environ)

    # -- GET endpoints ------------------------------------------------------

    def _jwks(self, environ: WSGIEnvironment) -> _Response:
        # RFC 7517 section 5: "A JWK Set is a JSON object that represents a set
        # of JWKs. The JSON object MUST have a "keys" member".
        jwks: dict[str, Any] = self._call(self._service.jwks)
        if not isinstance(jwks.get("keys"), list):
            raise TypeError("the service's JWK Set has no keys list")
        return _Response(200, jwks, cache=f"public, max-age={JWKS_MAX_AGE_S}")

    def _metadata(self, environ: WSGIEnvironment) -> _Response:
        base = self._base_url if self._base_url is not None else _request_base(environ)
        methods = list(CLIENT_AUTH_METHODS)
        body: dict[str, object] = {
            # RFC 8414 section 2: "issuer REQUIRED. The authorization server's
            # issuer identifier, which is a URL that uses the "https" scheme".
            "issuer": self._service.issuer,
            "token_endpoint": base + TOKEN_PATH,
            "jwks_uri": base + JWKS_PATH,
            "introspection_endpoint": base + INTROSPECT_PATH,
            "revocation_endpoint": base + REVOKE_PATH,
            # draft-ietf-oauth-status-list section 9.3: "it is RECOMMENDED to use the
            # status_list_aggregation_endpoint parameter within its metadata".
            "status_list_aggregation_endpoint": base + STATUS_LISTS_PATH,
            "grant_types_supported": list(GRANT_TYPES),
            "token_endpoint_auth_methods_supported": methods,
            "introspection_endpoint_auth_methods_supported": methods,
            "revocation_endpoint_auth_methods_supported": methods,
            # RFC 8414 section 2: "response_types_supported REQUIRED." There is
            # no authorization endpoint, so no response type.
            "response_types_supported": [],
        }
        return _Response(200, body, cache=f"public, max-age={JWKS_MAX_AGE_S}")

    def _status_list(self, environ: WSGIEnvironment) -> _Response:
        segment = str(environ.get("PATH_INFO", ""))[len(STATUS_LISTS_PATH) + 1 :]
        not_found = _Response(404, {"error": "not_found"})
        if not _LIST_SEGMENT.match(segment):
            return not_found
        # draft-ietf-oauth-status-list section 8.1: content negotiation; this
        # service has the JWT format only.
        if not _accepts(str(environ.get("HTTP_ACCEPT", "")), STATUS_LIST_TYPE):
            return _Response(406, {"error": "not_acceptable"})
        try:
            encoded = self._service.status_list_token(int(segment))
        except errors.NotFoundError:
            return not_found
        except errors.AuthError as exc:
            raise oauth_error_for(exc) from exc
        cache = f"public, max-age={_list_ttl(self._service)}"
        headers = [("ETag", encoded.etag), ("Vary", "Accept-Encoding")]
        # RFC 9110 13.1.2: If-None-Match matching the current entity tag: 304.
        if _etag_matches(str(environ.get("HTTP_IF_NONE_MATCH", "")), encoded.etag):
            return _Response(304, {}, headers, cache=cache, raw=b"")
        # Section 8.2: "The HTTP response SHOULD use Content-Encoding (such as gzip)".
        if _accepts_gzip(str(environ.get("HTTP_ACCEPT_ENCODING", ""))):
            headers.append(("Content-Encoding", "gzip"))
            body = encoded.gzipped
        else:
            body = encoded.token.encode("ascii")
        return _Response(
            200, {}, headers, cache=cache, raw=body, content_type=STATUS_LIST_TYPE
        )

    def _status_lists(self, environ: WSGIEnvironment) -> _Response:
        # draft-ietf-oauth-status-list section 9.3: "status_lists: REQUIRED. JSON
        # array of strings that contains URIs linking to Status List Tokens."
        uris = self._call(self._service.status_list_uris)
        return _Response(
            200, {"status_lists": uris}, cache=f"public, max-age={AGGREGATION_MAX_AGE_S}"
        )

    def _health(self, environ: WSGIEnvironment) -> _Response:
        try:
            healthy = self._service.healthy()
        except Exception:  # a failing health check means unhealthy, not a 500
            log.warning("health check failed")
            healthy = False
        if healthy:
            return _Response(200, {"status": "ok"})
        return _Response(503, {"status": "unavailable"})

    # -- POST endpoints -----------------------------------------------------

    def _token(self, environ: WSGIEnvironment) -> _Response:
        form = self._read_form(environ, resource=True)
        creds = _client_credentials(environ, form)
        # RFC 6749 4.3.2 / 6 / 4.4.2: "grant_type REQUIRED."
        grant_type = _required(form, "grant_type")
        scope = _scope(form)
        # RFC 8707 section 2: "resource: Indicates the target service or
        # resource to which access is being requested." One audience name as
        # registered (e.g. "notes"); absent: the default (the login's, for a
        # refresh). The service refuses an unknown or unallowed one.
        target: dict[str, Any] = {"audience": form.get("resource")}
        if grant_type == "client_credentials":
            # RFC 6749 4.4: "The client credentials grant type MUST only be used
            # by confidential clients."
            if creds is None:
                raise _invalid_client("client authentication required")
            tokens = self._call(
                self._service.client_token,
                creds.client_id,
                creds.client_secret,
                scope,
                client_auth=True,
                **target,
            )
            _note(environ).client = _log_value(creds.client_id)
        elif grant_type in ("password", "refresh_token"):
            # RFC 6749 4.3.2: "If the client type is confidential or the client
            # was issued client credentials ..., the client MUST authenticate".
            # A client that presents credentials is held to them; the password
            # grant's access token then names it as its client_id.
            client_id: str | None = None
            if creds is not None:
                client_id = self._call(
                    self._service.authenticate_client,
                    creds.client_id,
                    creds.client_secret,
                    client_auth=True,
                )
                _note(environ).client = _log_value(client_id)
            named_client: dict[str, Any] = {} if client_id is None else {"client_id": client_id}
            named_client.update(target)
            if grant_type == "password":
                username = _required(form, "username")
                password = _required(form, "password")
                # The peer's address (behind the TLS front, the TLS client's):
                # password hashing is admitted per source.
                tokens = self._call(
                    self._service.login, username, password, scope,
                    source=str(environ.get("REMOTE_ADDR") or "") or None, **named_client,
                )
                _note(environ).subject = _log_value(username)
            else:
                refresh_token = _required(form, "refresh_token")
                # RFC 6749 6: the server MUST "ensure that it was issued to the
                # authenticated client" - the service refuses another client's.
                tokens = self._call(self._service.refresh, refresh_token, scope, **named_client)
        else:
            # RFC 6749 5.2 unsupported_grant_type: "The authorization grant type
            # is not supported by the authorization server."
            raise OAuthError(400, "unsupported_grant_type", "grant_type is not supported")
        # RFC 6749 5.1: access_token, token_type, expires_in RECOMMENDED, scope,
        # refresh_token OPTIONAL.
        body: dict[str, object] = {
            "access_token": tokens.access_token,
            "token_type": tokens.token_type,
            "expires_in": tokens.expires_in,
            "scope": tokens.scope,
        }
        if tokens.refresh_token:
            body["refresh_token"] = tokens.refresh_token
        return _Response(200, body)

    def _introspect(self, environ: WSGIEnvironment) -> _Response:
        form = self._read_form(environ)
        # RFC 7662 2.1: "To prevent token scanning attacks, the endpoint MUST
        # also require some form of authorization to access this endpoint".
        # Authorization, not only authentication: a client registered with
        # the permission (add-client --introspect); any other gets 403.
        self._authenticate(environ, form, introspect=True)
        # RFC 7662 2.1: "token REQUIRED."; "token_type_hint OPTIONAL" (ignored:
        # the service finds either kind).
        token = _required(form, "token")
        try:
            result = self._service.introspect(token)
        except (errors.TokenRejected, errors.InvalidInput):
            # RFC 7662 2.2: for a token that is not active "the authorization
            # server MUST return an introspection response with the "active"
            # field set to "false"".
            result = {"active": False}
        except errors.AuthError as exc:
            raise oauth_error_for(exc) from exc
        if not isinstance(result.get("active"), bool):
            raise TypeError("the service's introspection response has no boolean active")
        return _Response(200, result)

    def _revoke(self, environ: WSGIEnvironment) -> _Response:
        form = self._read_form(environ)
        # RFC 7009 2.1: "The client also includes its authentication credentials
        # as described in Section 2.3. of [RFC6749]."
        client_id = self._authenticate(environ, form)
        # RFC 7009 2.1: "token REQUIRED."
        token = _required(form, "token")
        try:
            # RFC 7009 2.1: the server "verifies whether the token was issued to
            # the client making the revocation request": another client's token
            # is left alone (answered like an unknown one).
            self._service.revoke(token, client_id=client_id)
        except (errors.TokenRejected, errors.InvalidInput):
            # RFC 7009 2.2: "The authorization server responds with HTTP status
            # code 200 if the token has been revoked successfully or if the
            # client submitted an invalid token." (A missing token was refused
            # above, so InvalidInput here is about a malformed token.)
            pass
        except errors.AuthError as exc:
            raise oauth_error_for(exc) from exc
        return _Response(200, {})

    # -- helpers -----------------------------------------------------------

    def _authenticate(
        self, environ: WSGIEnvironment, form: dict[str, str], *, introspect: bool = False
    ) -> str:
        creds = _client_credentials(environ, form)
        if creds is None:
            raise _invalid_client("client authentication required")
        check = (
            self._service.authorize_introspection
            if introspect
            else self._service.authenticate_client
        )
        try:
            client_id: str = check(creds.client_id, creds.client_secret)
        except errors.Forbidden as exc:
            # Authenticated, not authorized: RFC 9110 15.5.4 "403 (Forbidden)
            # ... the server understood the request but refuses to fulfill it".
            raise OAuthError(403, "unauthorized_client", exc.message) from exc
        except errors.AuthError as exc:
            if isinstance(exc, errors.DependencyUnavailable):
                log.warning("refused a request: %s", exc.message)
            raise oauth_error_for(exc, client_auth=True) from exc
        _note(environ).client = _log_value(client_id)
        return client_id

    @staticmethod
    def _call(
        func: Callable[..., Any], *args: Any, client_auth: bool = False, **kwargs: Any
    ) -> Any:
        """``func(*args, **kwargs)``, its internal errors turned into :class:`OAuthError`."""
        try:
            return func(*args, **kwargs)
        except errors.AuthError as exc:
            if isinstance(exc, errors.DependencyUnavailable):
                log.warning("refused a request: %s", exc.message)
            raise oauth_error_for(exc, client_auth=client_auth) from exc

    def _read_form(self, environ: WSGIEnvironment, *, resource: bool = False) -> dict[str, str]:
        """The request's form parameters, each present at most once, blanks dropped.

        With ``resource`` (the token endpoint), a ``resource`` parameter given
        more than once or empty is 400 ``invalid_target`` (RFC 8707).

        Raises:
            OAuthError: 413 when the body is larger than allowed (not read), 400
                ``invalid_request`` for any other fault.
        """
        raw_length = str(environ.get("CONTENT_LENGTH") or "0").strip()
        if not _CONTENT_LENGTH_RE.match(raw_length):
            raise _invalid_request("invalid Content-Length")
        length = int(raw_length)
        if length > self._max_body_bytes:
            # RFC 9110 15.5.14: "The 413 (Content Too Large) status code
            # indicates that the server is refusing to process a request because
            # the request content is larger than the server is willing or able
            # to process."
            raise OAuthError(413, "invalid_request", "request body too large")
        media_type, _, params = str(environ.get("CONTENT_TYPE", "")).partition(";")
        # RFC 6749 3.2: "The client MUST use the HTTP "POST" method when making
        # access token requests" with the "application/x-www-form-urlencoded"
        # format (Appendix B), as RFC 7662 2.1 and RFC 7009 2.1 also require.
        if media_type.strip().lower() != FORM_TYPE:
            raise _invalid_request(f"Content-Type must be {FORM_TYPE}")
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
                "utf-8",
                "utf8",
                "us-ascii",
            ):
                raise _invalid_request("charset must be UTF-8")
        # RFC 6749 2.3.1: "The parameters can only be transmitted in the
        # request-body and MUST NOT be included in the request URI."
        query = parse_qsl(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
        if any(name in _SECRET_PARAMS for name, _ in query):
            raise _invalid_request("credentials must be sent in the request body")
        body = environ["wsgi.input"].read(length) if length else b""
        if len(body) != length:
            raise _invalid_request("request body shorter than Content-Length")
        return _parse_form(body, resource=resource)


def _parse_form(body: bytes, *, resource: bool = False) -> dict[str, str]:
    """Decode an ``application/x-www-form-urlencoded`` body (RFC 6749 Appendix B).

    Raises:
        OAuthError: 400 ``invalid_request`` for bytes outside ASCII, a malformed
            pair, percent-escapes that are not UTF-8, too many fields, an empty
            name or a name given twice.
    """
    try:
        pairs = parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=bool(body),
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        # The parser's message quotes the input: never pass it on.
        raise _invalid_request("malformed form body") from exc
    counts = Counter(name for name, _ in pairs)
    if "" in counts:
        raise _invalid_request("malformed form body")
    if resource and "resource" in counts:
        # RFC 8707 section 2: a resource the server does not accept is
        # refused with invalid_target. A token here is for one audience, and
        # an empty value names none (not "omitted" as RFC 6749 section 3.2
        # treats blank parameters: the client meant to ask for something).
        if counts["resource"] > 1:
            raise OAuthError(400, "invalid_target", "only one resource may be requested")
        if not dict(pairs)["resource"]:
            raise OAuthError(400, "invalid_target", "resource must not be empty")
    # RFC 6749 3.2 (and 3.1): "Request and response parameters MUST NOT be
    # included more than once."
    repeated = sorted(name for name, n in counts.items() if n > 1)
    if repeated:
        raise _invalid_request(f"parameter given more than once: {repeated[0][:40]}")
    # RFC 6749 3.2: "Parameters sent without a value MUST be treated as if they
    # were omitted from the request."
    return {name: value for name, value in pairs if value}


def _required(form: dict[str, str], name: str) -> str:
    value = form.get(name)
    if value is None:
        raise _invalid_request(f"missing parameter: {name}")
    return value


def _scope(form: dict[str, str]) -> str:
    scope = form.get("scope", "")
    # RFC 6749 3.3: "The value of the scope parameter is expressed as a list of
    # space-delimited, case-sensitive strings."
    if scope and not _SCOPE_RE.match(scope):
        raise OAuthError(400, "invalid_scope", "malformed scope")
    return scope


def _client_credentials(
    environ: WSGIEnvironment, form: dict[str, str]
) -> _ClientCredentials | None:
    """The client's id and secret from HTTP Basic or the body, or None if absent.

    Raises:
        OAuthError: 401 ``invalid_client`` for an Authorization header that is
            not well-formed Basic; 400 ``invalid_request`` when both methods are
            used, or a body secret comes without its id.
    """
    header = environ.get("HTTP_AUTHORIZATION")
    body_id = form.get("client_id")
    body_secret = form.get("client_secret")
    if header is not None:
        client_id, client_secret = _parse_basic(str(header))
        # RFC 6749 2.3.1: "The client MUST NOT use more than one authentication
        # method in each request."
        if body_secret is not None or (body_id is not None and body_id != client_id):
            raise _invalid_request("more than one client authentication method")
        return _ClientCredentials(client_id, client_secret)
    if body_secret is not None:
        if body_id is None:
            raise _invalid_request("client_secret without client_id")
        return _ClientCredentials(body_id, body_secret)
    return None


def _parse_basic(header: str) -> tuple[str, str]:
    scheme, _, param = header.strip().partition(" ")
    if scheme.lower() != "basic":
        # RFC 6749 5.2 invalid_client: "... or unsupported authentication method".
        raise _invalid_client("unsupported client authentication method")
    try:
        decoded = base64.b64decode(param.strip(), validate=True).decode("ascii")
    except (binascii.Error, ValueError) as exc:
        raise _invalid_client("malformed Basic credentials") from exc
    raw_id, sep, raw_secret = decoded.partition(":")
    if not sep:
        raise _invalid_client("malformed Basic credentials")
    # RFC 6749 2.3.1: "The client identifier is encoded using the
    # "application/x-www-form-urlencoded" encoding algorithm per Appendix B,
    # and the encoded value is used as the username; the client password is
    # encoded using the same algorithm and used as the password."
    try:
        client_id = unquote_plus(raw_id, errors="strict")
        client_secret = unquote_plus(raw_secret, errors="strict")
    except UnicodeDecodeError as exc:
        raise _invalid_client("malformed Basic credentials") from exc
    if not client_id or not client_secret:
        raise _invalid_client("malformed Basic credentials")
    return client_id, client_secret


def _request_base(environ: WSGIEnvironment) -> str:
    """``scheme://host[:port]/script-name`` of this request (no trailing slash).

    Raises:
        OAuthError: 400 ``invalid_request`` when the Host is not a plain host.
    """
    scheme = str(environ.get("wsgi.url_scheme", "http"))
    host = environ.get("HTTP_HOST")
    if host is None:
        host = f"{environ.get('SERVER_NAME', 'localhost')}:{environ.get('SERVER_PORT', '80')}"
    host = str(host)
    if scheme not in ("http", "https") or not _HOST_RE.match(host):
        raise _invalid_request("invalid Host header")
    script = str(environ.get("SCRIPT_NAME", "")).rstrip("/")
    if script and not re.fullmatch(r"(?:/[A-Za-z0-9._~%!$&'()*+,;=:@-]+)+", script):
        raise _invalid_request("invalid script name")
    return f"{scheme}://{host}{script}"


def _list_ttl(service: AuthService) -> int:
    """The ``ttl`` of the service's Status List Tokens (their HTTP ``max-age``)."""
    return int(service.settings.status_list_ttl_s)


def _accepts(header: str, media_type: str) -> bool:
    """Whether an ``Accept`` header (RFC 9110 12.5.1) admits ``media_type``; absent admits all."""
    if not header.strip():
        return True
    major = media_type.split("/")[0]
    for item in header.split(","):
        name, *params = item.split(";")
        name = name.strip().lower()
        q = next((p.split("=", 1)[1].strip() for p in params if p.strip().startswith("q=")), "1")
        if q in ("0", "0.", "0.0", "0.00", "0.000"):
            continue
        if name in (media_type, f"{major}/*", "*/*"):
            return True
    return False


def _accepts_gzip(header: str) -> bool:
    for item in header.split(","):
        name, *params = item.split(";")
        if name.strip().lower() in ("gzip", "x-gzip", "*"):
            q = next((p.split("=", 1)[1].strip() for p in params if "q=" in p), "1")
            return q not in ("0", "0.", "0.0", "0.00", "0.000")
    return False


def _etag_matches(header: str, etag: str) -> bool:
    """RFC 9110 13.1.2 If-None-Match: weak comparison against the current ``etag``."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    return any(
        candidate.strip().removeprefix("W/") == etag for candidate in header.split(",")
    )


def _send(start_response: StartResponse, method: str, response: _Response) -> list[bytes]:
    if response.raw is not None:
        body = response.raw
    else:
        body = json.dumps(response.body, separators=(",", ":")).encode("ascii")
    headers = [("Content-Type", response.content_type)]
    if response.status != 304:
        # RFC 9110 8.6: a 304 carries no Content-Length unless equal to the 200's.
        headers.append(("Content-Length", str(len(body))))
    headers += [
        ("Cache-Control", response.cache),
        ("X-Content-Type-Options", "nosniff"),
        ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
        ("Referrer-Policy", "no-referrer"),
    ]
    if response.cache == "no-store":
        # RFC 6749 5.1: "The authorization server MUST include the HTTP
        # "Cache-Control" response header field [RFC2616] with a value of
        # "no-store" in any response containing tokens, credentials, or other
        # sensitive information, as well as the "Pragma" response header field
        # [RFC2616] with a value of "no-cache"."
        headers.append(("Pragma", "no-cache"))
    headers.extend(response.headers)
    status = HTTPStatus(response.status)
    start_response(f"{status.value} {status.phrase}", headers)
    # RFC 9110 9.3.2: "The server SHOULD send the same header fields in response
    # to a HEAD request as it would have sent if the request method had been
    # GET. However, a server MAY omit header fields for which a value is
    # determined only while generating the content."
    return [] if method == "HEAD" else [body]


def make_app(
    service: AuthService,
    *,
    base_url: str | None = None,
    max_body_bytes: int = 64 * 1024,
    metrics: ServiceMetrics | None = None,
) -> WSGIApplication:
    """The WSGI application of the Auth service's HTTP endpoints.

    ``base_url`` is the public URL the endpoints are reached at (``http`` or
    ``https``, no query or fragment), used to build the metadata's endpoint
    URLs; without it they are built from each request's ``Host``.
    ``max_body_bytes`` bounds a request body (larger ones get 413 unread).
    With ``metrics``, requests are counted into it and ``GET /metrics``
    answers its exposition (the Prometheus text format); without, ``/metrics``
    is 404.

    Raises:
        ValueError: ``base_url`` is not an absolute http(s) URL, or
            ``max_body_bytes`` is not positive.
    """
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be positive")
    if base_url is not None:
        parts = urlsplit(base_url)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.query
            or parts.fragment
            or "@" in parts.netloc
        ):
            raise ValueError("base_url must be an absolute http(s) URL without query")
        base_url = base_url.rstrip("/")
    return AuthHttpApp(
        service, base_url=base_url, max_body_bytes=max_body_bytes, metrics=metrics
    )
