"""Client connections and the token-attaching session.

Two layers:

- :func:`connect_auth` and :func:`connect_posts` open one Thrift connection
  and yield a thin wrapper: the IDL's methods, nothing added. The IDL's typed
  exceptions (``common_thrift.Unauthenticated`` and the rest) come through
  unchanged; a connection that cannot be made or that breaks raises
  :class:`TransportError`.
- :class:`Session` holds a login (a password login or OAuth client
  credentials) and hands out :class:`TokenClient` objects (``session.posts()``,
  or ``session.client(service, endpoint)`` for any Thrift service) whose
  methods are the service's methods *without* the ``token`` argument:
  ``posts.list_posts(limit=10)``. The session attaches the current access
  token to every call, refreshes it shortly before it expires, and on
  ``Unauthenticated`` renews it once and retries the call once (never more).
  ``Unauthenticated`` is recognised by the Thrift exception's name and fields
  (:func:`is_common_error`), so a service whose IDL was loaded separately
  (its own ``common`` module, its own classes) gets the same treatment.

Retry rule for a dropped connection (at most once, and only when harmless):

- the connection could not be opened: :class:`TransportError`, nothing was sent;
- the request could not be sent in full, or the server answered "server
  busy" (:func:`auth_rpc.serving.rpc.is_server_busy`: a connection cap or its
  memory budget made it refuse the request unread or unrun, and close the
  connection): the server cannot have acted on it, so the call is retried
  once on a new connection, whatever the method, then raises
  :class:`TransportError` (never :class:`ConnectionLost`);
- the request was sent but no reply came (connection reset or closed): a
  method declared *safe to repeat* (``safe_to_repeat=`` of
  :meth:`Session.client`; for Posts ``get_post`` and ``list_posts``) is
  retried once on a new connection; any other method raises
  :class:`ConnectionLost`, because the server may have done it. Nothing is
  guessed from a method's name;
- a timeout is never retried (:class:`TransportError`, or
  :class:`ConnectionLost` for a method not safe to repeat whose request was
  sent).

A pooled connection that the server has closed while it sat idle is noticed
before it is used (and an idle one older than ``max_idle_s`` is not reused),
so a write is not lost to a stale connection.

Nothing here logs or shows a token, a password or a client secret: the
token fields of :class:`Tokens` are left out of its ``repr``.
"""

from __future__ import annotations

import functools
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from thriftpy2.protocol.exc import TProtocolException
from thriftpy2.thrift import TApplicationException, TDecodeException, TException, TType
from thriftpy2.transport import TTransportException

from auth_rpc.idl import auth_thrift, posts_thrift
from auth_rpc.serving.rpc import is_server_busy
from auth_rpc.serving.transport import TLSClientConfig, open_client, parse_hostport

__all__ = [
    "DEFAULT_AUTH_PORT",
    "DEFAULT_POSTS_PORT",
    "ClientError",
    "ConnectionLost",
    "Endpoint",
    "NotLoggedIn",
    "ProtocolError",
    "Session",
    "TokenClient",
    "Tokens",
    "TransportError",
    "connect_auth",
    "connect_posts",
    "is_common_error",
]

log = logging.getLogger("client.session")

DEFAULT_AUTH_PORT = 9090
DEFAULT_POSTS_PORT = 9091

_Clock = Callable[[], float]


# --------------------------------------------------------------------------- errors


class ClientError(Exception):
    """Base of the errors the client raises itself (not sent by a server)."""


class TransportError(ClientError):
    """The service could not be reached or the connection broke.

    Connection refused, timeout, TLS failure (including a certificate or
    hostname that does not verify), a connection closed mid-call, or a
    server too busy to take the request (it was not run). The underlying
    exception is the ``__cause__``.
    """


class ConnectionLost(TransportError):
    """The connection broke after the request was sent: the server may have done it.

    A call that was not declared safe to repeat is sent at most once, so it
    was not retried; look before trying again (for example list the posts).
    """


class NotLoggedIn(ClientError):
    """There is no login to use (never logged in, or logged out)."""


class ProtocolError(ClientError):
    """A service answered with something that breaks the contract."""


# The exceptions of idl/common.thrift, each with the (type, name) of the
# fields it must have to be taken for that exception.
_COMMON_ERRORS: dict[str, frozenset[tuple[int, str]]] = {
    "Unauthenticated": frozenset({(TType.STRING, "message")}),
    "PermissionDenied": frozenset({(TType.STRING, "message")}),
    "InvalidArgument": frozenset({(TType.STRING, "message")}),
    "NotFound": frozenset({(TType.STRING, "message")}),
    "Unavailable": frozenset({(TType.STRING, "message")}),
    "RateLimited": frozenset({(TType.STRING, "message"), (TType.I64, "retry_after_ms")}),
}


def is_common_error(exc: BaseException, *names: str) -> bool:
    """True when ``exc`` is one of the ``common.thrift`` exceptions ``names``.

    Recognised by the Thrift exception's name and fields, not by its class:
    a thriftpy2 ``TException`` subclass called ``Unauthenticated`` with a
    string ``message`` field (``RateLimited`` also an i64
    ``retry_after_ms``), from whichever loaded module. An IDL loaded with
    ``thriftpy2.load(path, include_dirs=[auth_rpc.idl.IDL_DIR])`` gets its own
    ``common`` module with its own classes, so ``except
    client.Unauthenticated`` does not catch its exceptions, but this does::

        try:
            notes.get_note(note_id=1)
        except Exception as exc:
            if not is_common_error(exc, "Unauthenticated", "PermissionDenied"):
                raise
            ...

    Raises ``ValueError`` for a name that ``common.thrift`` does not declare.
    """
    unknown = [name for name in names if name not in _COMMON_ERRORS]
    if unknown:
        raise ValueError(f"not an exception of common.thrift: {', '.join(unknown)}")
    kind = type(exc)
    if kind.__name__ not in names or not isinstance(exc, TException):
        return False
    spec = getattr(kind, "thrift_spec", None)
    if not isinstance(spec, dict):
        return False
    fields = {(entry[0], entry[1]) for entry in spec.values() if len(entry) >= 2}
    return _COMMON_ERRORS[kind.__name__] <= fields


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """Where a service listens and how to talk to it. Times in seconds."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_AUTH_PORT
    tls: TLSClientConfig | ssl.SSLContext | None = None
    framed: bool = False
    timeout_s: float = 5.0
    connect_timeout_s: float = 2.0

    @classmethod
    def parse(cls, hostport: str, **options: Any) -> Endpoint:
        """``"host:port"`` (``"[::1]:port"``, ``":port"``) as an endpoint.

        Raises ``ValueError`` when malformed.
        """
        host, port = parse_hostport(hostport)
        return cls(host=host, port=port, **options)

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def open(self, service: ModuleType) -> _Connection:
        """A new connection to ``service`` here; raises :class:`TransportError`."""
        try:
            client = open_client(
                service,
                self.host,
                self.port,
                framed=self.framed,
                tls=self.tls,
                timeout_s=self.timeout_s,
                connect_timeout_s=self.connect_timeout_s,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise TransportError(f"cannot connect to {self.address}: {_reason(exc)}") from exc
        return _Connection(client, service, self)


def _as_endpoint(value: Endpoint | str, default_port: int | None) -> Endpoint:
    if isinstance(value, Endpoint):
        return value
    if ":" not in value:
        if default_port is None:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return Endpoint(host=value, port=default_port)
    return Endpoint.parse(value)


def _reason(exc: BaseException) -> str:
    """A short, token-free description of a transport failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, TTransportException):
        return exc.message or "connection closed"
    return str(exc) or type(exc).__name__


def _is_tls_alert(exc: BaseException) -> bool:
    """A TLS alert from the peer (``TLSV13_ALERT_CERTIFICATE_REQUIRED``, ...)."""
    return isinstance(exc, ssl.SSLError) and "ALERT" in str(exc.reason or "")


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return True
    return isinstance(exc, TTransportException) and exc.type == TTransportException.TIMED_OUT


# --------------------------------------------------------------------------- one connection

_TRANSPORT_FAILURES = (TTransportException, OSError, TProtocolException, TDecodeException, EOFError)


class _CallFailed(Exception):
    """A call broke in transit; ``sent`` tells whether the request went out in full."""

    def __init__(self, cause: BaseException, *, sent: bool) -> None:
        super().__init__(_reason(cause))
        self.cause = cause
        self.sent = sent


class _Connection:
    """One thriftpy2 client plus what the pool needs to know about it."""

    def __init__(self, client: Any, service: ModuleType, endpoint: Endpoint) -> None:
        self._client = client
        self.service = service
        self.endpoint = endpoint
        self.idle_since = time.monotonic()
        self._answered = False  # a reply has come on this connection

    def call(self, method: str, arguments: dict[str, Any]) -> Any:
        """Send one call and read its reply.

        IDL exceptions and ``TApplicationException`` propagate (the connection
        stays usable); a transport failure raises :class:`_CallFailed`, and so
        does a "server busy" answer (not sent: the server did not run it).
        """
        # TClient._req is _send then _recv; calling them apart tells a
        # failure before the request left from one after it did.
        try:
            self._client._send(method, **arguments)
        except _TRANSPORT_FAILURES as exc:
            raise _CallFailed(exc, sent=False) from exc
        try:
            result = self._client._recv(method)
        except _TRANSPORT_FAILURES as exc:
            # A TLS alert before the first reply ends the handshake (TLS 1.3
            # checks the client's certificate after the client has finished
            # its side and may already have written the request): the server
            # refused the connection and never read the request.
            refused = not self._answered and _is_tls_alert(exc)
            raise _CallFailed(exc, sent=not refused) from exc
        except TApplicationException as exc:
            if is_server_busy(exc):  # refused unrun; the server closes the connection
                raise _CallFailed(exc, sent=False) from exc
            self._answered = True
            raise
        except Exception:
            self._answered = True  # an IDL exception: a reply
            raise
        self._answered = True
        return result

    def peer_closed(self) -> bool:
        """True when the idle connection has been closed by the server.

        No reply is pending on an idle Thrift connection, so anything
        readable (end of file, a TLS close_notify, stray bytes) means it is
        no longer usable.
        """
        sock = getattr(getattr(self._client, "_iprot", None), "trans", None)
        sock = getattr(sock, "sock", None)
        if not isinstance(sock, socket.socket):
            return False  # cannot tell: let the call find out
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(sock, select.POLLIN | select.POLLPRI)
                return bool(poller.poll(0))
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable)
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        with suppress(OSError, TTransportException):
            self._client.close()


def _transport_error(
    endpoint: Endpoint, method: str, failure: _CallFailed, *, may_have_run: bool
) -> TransportError:
    if may_have_run:
        return ConnectionLost(
            f"connection to {endpoint.address} lost during {method} ({failure}); "
            "the server may or may not have done it"
        )
    return TransportError(f"connection to {endpoint.address} failed during {method}: {failure}")


# --------------------------------------------------------------------------- arguments

_ZERO: dict[int, Callable[[], Any]] = {
    TType.BOOL: lambda: False,
    TType.BYTE: lambda: 0,
    TType.I16: lambda: 0,
    TType.I32: lambda: 0,
    TType.I64: lambda: 0,
    TType.DOUBLE: lambda: 0.0,
    TType.STRING: lambda: "",
    TType.LIST: list,
    TType.SET: set,
    TType.MAP: dict,
}


@dataclass(frozen=True)
class _Signature:
    method: str
    names: tuple[str, ...]  # in field-id order, the token argument left out
    zero: dict[str, Callable[[], Any] | None]
    token_name: str | None

    @classmethod
    def of(cls, service: ModuleType, method: str, *, token_name: str | None) -> _Signature:
        spec = getattr(service, f"{method}_args").thrift_spec
        names: list[str] = []
        zero: dict[str, Callable[[], Any] | None] = {}
        found_token = None
        for fid in sorted(spec):
            ttype, name = spec[fid][0], spec[fid][1]
            if token_name is not None and name == token_name and ttype == TType.STRING:
                found_token = name
                continue
            names.append(name)
            zero[name] = _ZERO.get(ttype)
        return cls(method, tuple(names), zero, found_token)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Positional and keyword arguments as a dict; omitted ones get zero values.

        Raises ``TypeError`` like a Python function would.
        """
        if len(args) > len(self.names):
            raise TypeError(
                f"{self.method}() takes {len(self.names)} arguments ({len(args)} given)"
            )
        bound = dict(zip(self.names, args, strict=False))
        for name, value in kwargs.items():
            if name not in self.zero:
                raise TypeError(f"{self.method}() got an unexpected keyword argument {name!r}")
            if name in bound:
                raise TypeError(f"{self.method}() got multiple values for argument {name!r}")
            bound[name] = value
        for name in self.names:
            if name not in bound:
                make = self.zero[name]
                if make is None:
                    raise TypeError(f"{self.method}() missing required argument {name!r}")
                bound[name] = make()
        return bound


@functools.lru_cache(maxsize=256)
def _signature(service: ModuleType, method: str, token_name: str | None) -> _Signature:
    return _Signature.of(service, method, token_name=token_name)


# --------------------------------------------------------------------------- thin wrappers


class _ThinClient:
    """One connection; the IDL's methods; no retries."""

    _service: ModuleType

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        arguments = _signature(self._service, method, None).bind(args, kwargs)
        try:
            return self._conn.call(method, arguments)
        except _CallFailed as failure:
            raise _transport_error(
                self._conn.endpoint, method, failure, may_have_run=failure.sent
            ) from failure.cause

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


class AuthClient(_ThinClient):
    """``service Auth`` over one connection (see ``idl/auth.thrift``)."""

    _service = auth_thrift.Auth

    def login(self, username: str, password: str, audience: str | None = None) -> Any:
        """A ``TokenPair``; raises Unauthenticated, RateLimited, InvalidArgument, Unavailable.

        ``audience`` (RFC 8707) names the service the access token is for
        (one the account may use); ``None`` asks for the Auth service's default.
        """
        return self._call("login", username, password, audience or "")

    def refresh(self, refresh_token: str, audience: str | None = None) -> Any:
        """A new ``TokenPair`` (rotation); raises Unauthenticated, InvalidArgument, Unavailable.

        ``None`` keeps the audience of the login the refresh token came from.
        """
        return self._call("refresh", refresh_token, audience or "")

    def client_token(
        self, client_id: str, client_secret: str, scope: str = "", audience: str | None = None
    ) -> Any:
        """A ``TokenPair`` for a service client; raises as :meth:`login`."""
        return self._call("client_token", client_id, client_secret, scope, audience or "")

    def validate(self, token: str) -> Any:
        """The token's ``Principal``; raises Unauthenticated, Unavailable."""
        return self._call("validate", token)

    def revoke(self, token: str) -> None:
        """Revoke an access or refresh token (idempotent); raises InvalidArgument, Unavailable."""
        self._call("revoke", token)

    def jwks(self) -> str:
        """The JWK Set as JSON."""
        result: str = self._call("jwks")
        return result


class PostsConnection(_ThinClient):
    """``service Posts`` over one connection: every method takes the token first.

    Methods are looked up in the IDL, so ``conn.list_posts(token, limit=10)``
    works for every method, including ones added later. Omitted arguments are
    sent as zero values (``0``, ``""``).
    """

    _service = posts_thrift.Posts

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name in self._service.thrift_services:
            return functools.partial(self._call, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._service.thrift_services))


@contextmanager
def connect_auth(
    host: str = "127.0.0.1",
    port: int = DEFAULT_AUTH_PORT,
    *,
    tls: TLSClientConfig | ssl.SSLContext | None = None,
    timeout_s: float = 5.0,
    connect_timeout_s: float = 2.0,
    framed: bool = False,
) -> Iterator[AuthClient]:
    """One connection to the Auth service, closed on exit.

    Raises :class:`TransportError` when it cannot connect (refused, timeout,
    TLS failure); the IDL's exceptions come through unchanged.
    """
    endpoint = Endpoint(host, port, tls, framed, timeout_s, connect_timeout_s)
    client = AuthClient(endpoint.open(auth_thrift.Auth))
    try:
        yield client
    finally:
        client.close()


@contextmanager
def connect_posts(
    host: str = "127.0.0.1",
    port: int = DEFAULT_POSTS_PORT,
    *,
    tls: TLSClientConfig | ssl.SSLContext | None = None,
    timeout_s: float = 5.0,
    connect_timeout_s: float = 2.0,
    framed: bool = False,
) -> Iterator[PostsConnection]:
    """One connection to the Posts service, closed on exit (the caller passes tokens).

    Raises :class:`TransportError` when it cannot connect; the IDL's
    exceptions come through unchanged.
    """
    endpoint = Endpoint(host, port, tls, framed, timeout_s, connect_timeout_s)
    client = PostsConnection(endpoint.open(posts_thrift.Posts))
    try:
        yield client
    finally:
        client.close()


@contextmanager
def _auth_at(endpoint: Endpoint) -> Iterator[AuthClient]:
    client = AuthClient(endpoint.open(auth_thrift.Auth))
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Tokens:
    """A token pair as the client keeps it. The tokens are left out of ``repr``."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)  # "" for client-credentials tokens
    expires_at: float  # unix seconds
    lifetime_s: float
    scope: str = ""
    token_type: str = "Bearer"  # noqa: S105  # the token type name, not a secret

    @classmethod
    def from_pair(cls, pair: Any, *, now: float) -> Tokens:
        """Check an ``auth_thrift.TokenPair``; raises :class:`ProtocolError` if malformed."""
        access = getattr(pair, "access_token", None)
        refresh = getattr(pair, "refresh_token", None) or ""
        expires_in = getattr(pair, "expires_in", None)
        token_type = getattr(pair, "token_type", None) or "Bearer"
        scope = getattr(pair, "scope", None) or ""
        if not isinstance(access, str) or not access:
            raise ProtocolError("the Auth service returned no access token")
        if not isinstance(refresh, str) or not isinstance(scope, str):
            raise ProtocolError("the Auth service returned a malformed token pair")
        if not isinstance(expires_in, int) or expires_in <= 0:
            raise ProtocolError("the Auth service returned a bad expires_in")
        # RFC 6750 section 4: the token type value is case insensitive.
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise ProtocolError(f"unsupported token type {token_type!r}")
        return cls(access, refresh, now + expires_in, float(expires_in), scope, "Bearer")

    def refresh_due(self, now: float, margin_s: float) -> bool:
        """True from ``min(margin_s, 10 % of the lifetime)`` before expiry on."""
        margin = min(margin_s, self.lifetime_s * 0.1)
        return now >= self.expires_at - margin


# --------------------------------------------------------------------------- the session


class Session:
    """A login that attaches, refreshes and renews access tokens by itself.

    Make one with :meth:`login` (username and password) or :meth:`for_client`
    (OAuth client credentials), or from saved :class:`Tokens`. Safe to share
    between threads: one lock guards the tokens, so N threads that find the
    token due trigger one refresh.

    ``on_tokens`` is called (under the lock) with every new :class:`Tokens`,
    so a caller can save a rotated refresh token at once; if it raises, the
    call that triggered the refresh raises too.
    """

    def __init__(
        self,
        auth: Endpoint | str,
        tokens: Tokens,
        *,
        client_credentials: tuple[str, str, str] | None = None,
        audience: str | None = None,
        clock: _Clock = time.time,
        refresh_margin_s: float = 60.0,
        retry_refresh_after_s: float = 5.0,
        on_tokens: Callable[[Tokens], None] | None = None,
    ) -> None:
        self.auth = _as_endpoint(auth, DEFAULT_AUTH_PORT)
        self._tokens: Tokens | None = tokens
        self._credentials = client_credentials  # (client_id, client_secret, scope)
        self._audience = audience  # asked again with client credentials; a refresh keeps it
        self._clock = clock
        self._margin_s = refresh_margin_s
        self._retry_after_s = retry_refresh_after_s
        self._next_early_attempt = float("-inf")
        self._on_tokens = on_tokens
        self._lock = threading.Lock()
        self._clients: list[TokenClient] = []

    def __repr__(self) -> str:
        return f"<Session auth={self.auth.address} logged_in={self._tokens is not None}>"

    # -- making one

    @classmethod
    def login(
        cls,
        auth: Endpoint | str,
        username: str,
        password: str,
        *,
        audience: str | None = None,
        **options: Any,
    ) -> Session:
        """Log in with a password (``Auth.login``).

        ``audience`` (RFC 8707) is the service the tokens are for, one the
        user may use (``auth-rpc add-user --audience``); ``None``: the Auth
        service's default. Renewals keep it. Raises ``Unauthenticated`` (wrong
        username or password), ``RateLimited``, ``InvalidArgument`` (also an
        audience the user may not use), ``Unavailable``, :class:`TransportError`,
        :class:`ProtocolError`. ``options`` are those of the constructor.
        """
        endpoint = _as_endpoint(auth, DEFAULT_AUTH_PORT)
        clock: _Clock = options.get("clock", time.time)
        with _auth_at(endpoint) as client:
            pair = client.login(username, password, audience)
        tokens = Tokens.from_pair(pair, now=clock())
        session = cls(endpoint, tokens, audience=audience, **options)
        if session._on_tokens is not None:
            session._on_tokens(tokens)
        return session

    @classmethod
    def for_client(
        cls,
        auth: Endpoint | str,
        client_id: str,
        client_secret: str,
        scope: str = "",
        *,
        audience: str | None = None,
        **options: Any,
    ) -> Session:
        """Obtain a service token with OAuth client credentials (``Auth.client_token``).

        Client tokens have no refresh token: when one is due or rejected, the
        session asks for a new one with the same credentials (kept in memory
        only) and ``audience``. Raises as :meth:`login`.
        """
        endpoint = _as_endpoint(auth, DEFAULT_AUTH_PORT)
        clock: _Clock = options.get("clock", time.time)
        with _auth_at(endpoint) as client:
            pair = client.client_token(client_id, client_secret, scope, audience)
        tokens = Tokens.from_pair(pair, now=clock())
        session = cls(
            endpoint,
            tokens,
            client_credentials=(client_id, client_secret, scope),
            audience=audience,
            **options,
        )
        if session._on_tokens is not None:
            session._on_tokens(tokens)
        return session

    # -- tokens

    @property
    def tokens(self) -> Tokens:
        """The current tokens; raises :class:`NotLoggedIn` after :meth:`logout`."""
        tokens = self._tokens
        if tokens is None:
            raise NotLoggedIn("logged out")
        return tokens

    def _can_renew(self, tokens: Tokens) -> bool:
        return self._credentials is not None or bool(tokens.refresh_token)

    def access_token(self) -> str:
        """The access token to send now, refreshed first if it is due.

        If an early refresh fails because the Auth service is unreachable
        (or busy) while the current token is still valid, the current one is
        used (and the refresh tried again after ``retry_refresh_after_s``).
        Raises :class:`NotLoggedIn`, and what :meth:`refresh` raises.
        """
        tokens = self.tokens
        if not tokens.refresh_due(self._clock(), self._margin_s):
            return tokens.access_token
        with self._lock:
            tokens = self.tokens
            now = self._clock()
            if not tokens.refresh_due(now, self._margin_s) or not self._can_renew(tokens):
                return tokens.access_token
            still_valid = now < tokens.expires_at
            if still_valid and now < self._next_early_attempt:
                return tokens.access_token
            try:
                return self._renew_locked(tokens).access_token
            except Exception as exc:
                busy = isinstance(exc, TransportError) or is_common_error(
                    exc, "Unavailable", "RateLimited"
                )
                if not busy or not still_valid:
                    raise
                self._next_early_attempt = now + self._retry_after_s
                log.warning(
                    "could not refresh the access token early (%s); using the current one",
                    type(exc).__name__,
                )
                return tokens.access_token

    def refresh(self) -> Tokens:
        """Renew the tokens now (refresh grant, or new client credentials token).

        Raises :class:`NotLoggedIn` when there is nothing to renew with,
        ``Unauthenticated`` (refresh token expired, revoked or reused),
        ``InvalidArgument``, ``Unavailable``, :class:`TransportError`,
        :class:`ProtocolError`.
        """
        with self._lock:
            tokens = self.tokens
            if not self._can_renew(tokens):
                raise NotLoggedIn("no refresh token to renew the access token with")
            return self._renew_locked(tokens)

    def _renew_after_rejection(self, rejected: str) -> str | None:
        """A new access token after ``rejected`` was refused; ``None`` if none can be had."""
        with self._lock:
            tokens = self.tokens
            if tokens.access_token != rejected:
                return tokens.access_token  # another thread renewed it meanwhile
            if not self._can_renew(tokens):
                return None
            return self._renew_locked(tokens).access_token

    def _renew_locked(self, tokens: Tokens) -> Tokens:
        with _auth_at(self.auth) as client:
            if self._credentials is not None:
                client_id, secret, scope = self._credentials
                pair = client.client_token(client_id, secret, scope, self._audience)
            else:
                pair = client.refresh(tokens.refresh_token)
        new = Tokens.from_pair(pair, now=self._clock())
        if not new.refresh_token and tokens.refresh_token and self._credentials is None:
            # The old refresh token is spent either way; keep the new access
            # token, and let the next renewal fail as unauthenticated.
            log.warning("the Auth service returned no new refresh token; cannot refresh again")
        self._tokens = new
        self._next_early_attempt = float("-inf")
        log.debug("access token renewed; expires in %.0f s", new.lifetime_s)
        if self._on_tokens is not None:
            self._on_tokens(new)
        return new

    def with_token(self, call: Callable[[str], Any]) -> Any:
        """Run ``call(access_token)``; on ``Unauthenticated`` renew once and retry once.

        ``Unauthenticated`` is any Thrift exception of that name with a
        ``message`` field (:func:`is_common_error`), whichever module its
        class comes from. If the retry is refused too, that ``Unauthenticated``
        propagates. If the renewal itself is refused, its ``Unauthenticated``
        (the Auth service's) propagates. Never more than one renewal and one
        retry per call.
        """
        token = self.access_token()
        try:
            return call(token)
        except TException as exc:
            if not is_common_error(exc, "Unauthenticated"):
                raise
            renewed = self._renew_after_rejection(token)
            if renewed is None:
                raise
        return call(renewed)

    def validate(self) -> Any:
        """``Auth.validate`` of the current access token: its ``Principal``.

        Raises ``Unauthenticated``, ``Unavailable``, :class:`TransportError`,
        :class:`NotLoggedIn`.
        """

        def _validate(token: str) -> Any:
            with _auth_at(self.auth) as client:
                return client.validate(token)

        return self.with_token(_validate)

    # -- clients

    def client(
        self,
        service: ModuleType,
        endpoint: Endpoint | str,
        *,
        safe_to_repeat: Iterable[str] | None = None,
        token_arg: str = "token",  # noqa: S107  # an argument name, not a secret
        max_connections: int = 8,
        max_idle_s: float = 30.0,
    ) -> TokenClient:
        """A :class:`TokenClient` of any Thrift ``service``, with the token filled in.

        ``service`` is a service of a thriftpy2-loaded IDL (``notes_thrift.Notes``);
        ``endpoint`` an :class:`Endpoint` or ``"host:port"``. Each method
        that has a string argument named ``token_arg`` (any position) is
        called without it: the session passes the current access token,
        refreshes it when due, and on ``Unauthenticated`` (the service's
        own class or any other of that name, see :func:`is_common_error`)
        renews it once and retries the call once. Methods without that
        argument are called as they are.

        ``safe_to_repeat`` names the methods that may run twice without harm
        (reads, idempotent writes). When the connection breaks after a
        request was sent, only those are retried (once, on a new
        connection); any other method raises :class:`ConnectionLost`: the
        server may or may not have done it, so look before trying again. A
        request that could not be sent at all is retried once whatever the
        method, and a timeout never is. The default is none for every
        service, except ``get_post`` and ``list_posts`` for Posts; nothing is
        guessed from method names.

        Example::

            notes_thrift = thriftpy2.load(
                "notes.thrift", module_name="notes_thrift",
                include_dirs=[str(auth_rpc.idl.IDL_DIR)],
            )
            session = Session.login("127.0.0.1:9090", "alice", password)
            with session.client(
                notes_thrift.Notes, "127.0.0.1:9000",
                safe_to_repeat={"get_note", "list_notes"},
            ) as notes:
                note = notes.get_note(note_id=7)   # token filled in
                notes.get_and_increment(note_id=7)  # never sent twice

        Arguments are positional (in field-id order, the token left out) or
        by keyword; omitted numbers, strings and containers are sent as zero
        values. The client pools up to ``max_connections`` connections
        (idle ones older than ``max_idle_s`` are not reused) and may be
        shared by threads; close it (or the session) when done.

        Raises ``ValueError`` when ``safe_to_repeat`` names a method the
        service does not have, when no method takes a string ``token_arg``,
        or when ``endpoint`` is malformed (a port is required, except for
        Posts, 9091); ``TypeError`` when ``safe_to_repeat`` is a string.
        """
        default_port = DEFAULT_POSTS_PORT if service is posts_thrift.Posts else None
        client = TokenClient(
            self,
            service,
            _as_endpoint(endpoint, default_port),
            safe_to_repeat=safe_to_repeat,
            token_arg=token_arg,
            max_connections=max_connections,
            max_idle_s=max_idle_s,
        )
        with self._lock:
            self._clients.append(client)
        return client

    def posts(
        self,
        endpoint: Endpoint | str = f"127.0.0.1:{DEFAULT_POSTS_PORT}",
        **options: Any,
    ) -> TokenClient:
        """A client of ``service Posts``: ``posts.list_posts(limit=10)``.

        ``get_post`` and ``list_posts`` are safe to repeat; ``options`` are
        those of :meth:`client`.
        """
        return self.client(posts_thrift.Posts, endpoint, **options)

    # -- ending

    def logout(self) -> None:
        """Revoke the refresh token and the access token (``Auth.revoke``), forget them.

        The tokens are forgotten even if revoking fails. Raises
        ``InvalidArgument``, ``Unavailable``, :class:`TransportError`.
        """
        with self._lock:
            tokens = self._tokens
            self._tokens = None
            self._credentials = None
        if tokens is None:
            return
        with _auth_at(self.auth) as client:
            if tokens.refresh_token:
                client.revoke(tokens.refresh_token)
            client.revoke(tokens.access_token)

    def _forget(self, client: TokenClient) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    def close(self) -> None:
        """Close the connections of every client made by this session."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- pooled client


class _Pool:
    """Up to ``max_connections`` connections to one endpoint, each used by one call at a time."""

    def __init__(
        self, service: ModuleType, endpoint: Endpoint, max_connections: int, max_idle_s: float
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._service = service
        self._endpoint = endpoint
        self._slots = threading.BoundedSemaphore(max_connections)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._max_idle_s = max_idle_s
        self._closed = False
        self.opened = 0  # connections made so far (tests, metrics)

    def acquire(self) -> _Connection:
        """A usable connection (pooled or new); raises :class:`TransportError`."""
        self._slots.acquire()
        try:
            while True:
                with self._lock:
                    if self._closed:
                        raise ClientError("client is closed")
                    conn = self._idle.pop() if self._idle else None
                if conn is None:
                    break
                if time.monotonic() - conn.idle_since > self._max_idle_s or conn.peer_closed():
                    conn.close()
                    continue
                return conn
            conn = self._endpoint.open(self._service)
            with self._lock:
                self.opened += 1
            return conn
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            if self._closed:
                conn.close()
            else:
                self._idle.append(conn)
        self._slots.release()

    def discard(self, conn: _Connection) -> None:
        """Close a broken connection, and the idle ones too (they likely broke alike)."""
        conn.close()
        with self._lock:
            idle, self._idle = self._idle, []
        for other in idle:
            other.close()
        self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


# The methods of the project's own services that are safe to repeat after a
# lost connection, when the caller declares none. Every other service: none.
_SAFE_TO_REPEAT: dict[ModuleType, frozenset[str]] = {
    posts_thrift.Posts: frozenset({"get_post", "list_posts"}),
}


class TokenClient:
    """A Thrift service whose ``token`` argument is filled in by a :class:`Session`.

    Made by :meth:`Session.client` (or :meth:`Session.posts`), which tells
    the details. Methods come from the IDL: ``posts.create_post(title="t",
    body="b")`` (positional or keyword; omitted numbers and strings are sent
    as ``0`` and ``""``). Each call takes a connection from a small pool (a
    thriftpy2 client is not thread-safe, so a connection serves one call at
    a time), so one client may be shared by many threads.

    Raises the IDL's exceptions unchanged, :class:`TransportError`,
    :class:`ConnectionLost` (see the module docstring for the retry rule),
    :class:`NotLoggedIn`, and ``TypeError`` for bad arguments.
    """

    def __init__(
        self,
        session: Session,
        service: ModuleType,
        endpoint: Endpoint,
        *,
        safe_to_repeat: Iterable[str] | None = None,
        token_arg: str = "token",  # noqa: S107  # an argument name, not a secret
        max_connections: int = 8,
        max_idle_s: float = 30.0,
    ) -> None:
        methods = frozenset(service.thrift_services)
        if isinstance(safe_to_repeat, (str, bytes)):
            raise TypeError("safe_to_repeat takes a collection of method names, not a string")
        if safe_to_repeat is None:
            safe = _SAFE_TO_REPEAT.get(service, frozenset())
        else:
            safe = frozenset(safe_to_repeat)
            unknown = sorted(safe - methods)
            if unknown:
                raise ValueError(
                    f"safe_to_repeat names methods {service.__name__} does not have: "
                    + ", ".join(unknown)
                )
        if not any(_signature(service, m, token_arg).token_name for m in methods):
            raise ValueError(
                f"no method of {service.__name__} takes a string argument {token_arg!r}"
            )
        self._session = session
        self._service = service
        self._token_arg = token_arg
        self.endpoint = endpoint
        self._safe_to_repeat = safe
        self._pool = _Pool(service, endpoint, max_connections, max_idle_s)

    @property
    def safe_to_repeat(self) -> frozenset[str]:
        """The methods retried after a connection lost once their request was sent."""
        return self._safe_to_repeat

    @property
    def connections_opened(self) -> int:
        """How many connections this client has opened (reconnections included)."""
        return self._pool.opened

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if not name.startswith("_") and name in self._service.thrift_services:
            return functools.partial(self._invoke, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._service.thrift_services))

    def _invoke(self, method: str, *args: Any, **kwargs: Any) -> Any:
        signature = _signature(self._service, method, self._token_arg)
        arguments = signature.bind(args, kwargs)
        token_name = signature.token_name
        if token_name is None:
            return self._call(method, arguments)

        def _with(token: str) -> Any:
            return self._call(method, {token_name: token, **arguments})

        return self._session.with_token(_with)

    def _call(self, method: str, arguments: dict[str, Any]) -> Any:
        repeatable = method in self._safe_to_repeat
        for attempt in (1, 2):
            conn = self._pool.acquire()
            try:
                result = conn.call(method, arguments)
            except _CallFailed as failure:
                self._pool.discard(conn)
                may_have_run = failure.sent and not repeatable
                if attempt == 2 or may_have_run or _is_timeout(failure.cause):
                    raise _transport_error(
                        self.endpoint, method, failure, may_have_run=may_have_run
                    ) from failure.cause
                log.info("connection to %s broke (%s); retrying %s once on a new one",
                         self.endpoint.address, failure, method)
                continue
            except Exception as exc:
                if _is_thrift_reply(exc):
                    self._pool.release(conn)  # a full reply was read: still usable
                else:
                    self._pool.discard(conn)
                raise
            except BaseException:
                self._pool.discard(conn)  # interrupted mid-call: state unknown
                raise
            self._pool.release(conn)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the pooled connections; calls in flight finish first."""
        self._pool.close()
        self._session._forget(self)

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_thrift_reply(exc: BaseException) -> bool:
    """An exception decoded from a complete reply (IDL exception or TApplicationException)."""
    return isinstance(exc, (TException, TApplicationException)) and not isinstance(
        exc, _TRANSPORT_FAILURES
    )
