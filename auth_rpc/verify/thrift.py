"""Thrift mode: ``Auth.validate`` over pooled Thrift connections."""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from thriftpy2.thrift import TApplicationException

from auth_rpc.errors import DependencyUnavailable, TokenRejected
from auth_rpc.idl import auth_thrift, common_thrift
from auth_rpc.serving.rpc import is_server_busy
from auth_rpc.serving.transport import TLSClientConfig, open_client
from auth_rpc.verify._common import (
    DEFAULT_MAX_TOKEN_BYTES,
    DEFAULT_TIMEOUT_S,
    _check_settings,
    _remote_audience_ok,
    _remote_issuer_ok,
)
from auth_rpc.verify.cache import DEFAULT_CACHE_SIZE, DEFAULT_CACHE_TTL_S, CachingVerifier
from auth_rpc.verify.principal import Principal

# -- thrift -------------------------------------------------------------------


class _ClientPool:
    """A small thread-safe pool of Thrift client connections.

    At most ``size`` connections are in use at once; a caller waits at most
    ``wait_s`` for one. Idle connections are reused last-in first-out. Taking
    and giving back a connection is one lock's acquire and release (a
    ``threading.Semaphore`` is a Python-level condition: several times that);
    only a caller finding every connection in use waits, on a condition.
    """

    def __init__(self, factory: Callable[[], Any], size: int, wait_s: float) -> None:
        self._factory = factory
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._free = size  # connections that may still be taken
        self._waiting = 0
        self._wait_s = wait_s
        self._closed = False
        self.opened = 0

    def acquire(self) -> tuple[Any, bool]:
        """A client and whether it was reused; ``DependencyUnavailable``/``OSError`` on failure."""
        with self._lock:
            if self._free <= 0:
                deadline = time.monotonic() + self._wait_s
                self._waiting += 1
                try:
                    while self._free <= 0:
                        left = deadline - time.monotonic()
                        if left <= 0 or (not self._freed.wait(left) and self._free <= 0):
                            raise DependencyUnavailable("auth service connection pool exhausted")
                finally:
                    self._waiting -= 1
            self._free -= 1
            client = self._idle.pop() if self._idle else None
        if client is not None:
            return client, True
        try:
            client = self._factory()
        except BaseException:
            self._give_back(None)
            raise
        self.opened += 1
        return client, False

    def release(self, client: Any, *, broken: bool) -> None:
        if broken or self._closed:
            _close_quietly(client)
            client = None
        self._give_back(client)

    def _give_back(self, client: Any) -> None:
        with self._lock:
            if client is not None:
                self._idle.append(client)
            self._free += 1
            if self._waiting:
                self._freed.notify()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            _close_quietly(client)


def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):  # closing a broken connection may fail
        client.close()


def _safe_message(message: Any, default: str) -> str:
    if isinstance(message, str) and 0 < len(message) <= 200 and message.isprintable():
        return message
    return default


class ThriftVerifier(CachingVerifier):
    """Asks the Auth service (``Auth.validate``) over pooled Thrift connections.

    Up to ``pool_size`` connections are kept open; a broken connection is
    discarded and a call that failed on a reused one is retried once on a
    fresh connection (``validate`` is idempotent). Connecting and each read or
    write are bounded by ``timeout_s``. ``Unauthenticated`` becomes
    ``TokenRejected``; ``Unavailable``, transport errors, timeouts and refused
    connections become ``DependencyUnavailable``. The returned principal's
    ``issuer`` is checked when present, its ``audience`` must contain
    ``audience`` (``require_audience=False`` accepts an answer without one).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        issuer: str,
        audience: str,
        framed: bool = False,
        tls: TLSClientConfig | ssl.SSLContext | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        pool_size: int = 8,
        require_issuer: bool = False,
        require_audience: bool = True,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_settings(issuer, audience, 0)
        if not host or not 0 < port < 65536:
            raise ValueError("host and port of the Auth service must be configured")
        if not 0 < timeout_s <= 30:
            raise ValueError("timeout_s must be in (0, 30]")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        super().__init__(
            max_token_bytes=max_token_bytes,
            cache_size=cache_size,
            cache_ttl_s=cache_ttl_s,
            clock=clock,
        )
        self.issuer = issuer
        self.audience = audience
        self.address = (host, port)
        self._require_issuer = require_issuer
        self._require_audience = require_audience

        # Concurrent misses of one token share one round trip (CachingVerifier); the
        # others wait at most what a call of their own could take.
        self._coalesce = True
        self._miss_wait_s = 3 * float(timeout_s)

        def connect() -> Any:
            return open_client(
                auth_thrift.Auth,
                host,
                port,
                framed=framed,
                tls=tls,
                timeout_s=timeout_s,
                connect_timeout_s=timeout_s,
                kernel_timeouts=True,
            )

        self._pool = _ClientPool(connect, pool_size, timeout_s)

    @property
    def pool(self) -> _ClientPool:
        return self._pool

    def _verify_uncached(self, token: str, now: float) -> Principal:
        result = self._call_validate(token)
        subject = getattr(result, "subject", None)
        expires_at = getattr(result, "expires_at", None)
        if not isinstance(subject, str) or not subject or not isinstance(expires_at, int):
            raise DependencyUnavailable("auth service answer malformed")
        if expires_at <= now:
            raise TokenRejected("token expired")
        issuer = result.issuer or None
        _remote_issuer_ok(issuer, self.issuer, self._require_issuer)
        audiences = tuple(result.audience.split()) if result.audience else None
        _remote_audience_ok(audiences, self.audience, self._require_audience)
        scopes = result.scopes or []
        if not all(isinstance(s, str) for s in scopes):
            raise DependencyUnavailable("auth service answer malformed")
        return Principal(
            subject=subject,
            scopes=frozenset(scopes),
            expires_at=expires_at,
            token_id=result.token_id or "",
            client_id=result.client_id or "",
            issuer=issuer or "",
            audience=audiences or (),
        )

    def _call_validate(self, token: str) -> Any:
        for attempt in (1, 2):
            try:
                client, reused = self._pool.acquire()
            except OSError:
                raise DependencyUnavailable("auth service unreachable") from None
            broken = True
            try:
                result = client.validate(token)
                broken = False
                return result
            except common_thrift.Unauthenticated as exc:
                broken = False
                raise TokenRejected(_safe_message(exc.message, "token rejected")) from None
            except common_thrift.Unavailable:
                broken = False
                raise DependencyUnavailable("auth service unavailable") from None
            except TApplicationException as exc:
                # "server busy": not run, and the connection is closed. A pooled one
                # may have been closed while idle to make room: retry on a fresh one.
                if is_server_busy(exc) and reused and attempt == 1:
                    continue
                raise DependencyUnavailable("auth service failed") from None
            except (TimeoutError, BlockingIOError):  # Python's timeout, or the kernel's (EAGAIN)
                raise DependencyUnavailable("auth service timed out") from None
            except Exception:
                # A pooled connection may have been closed by the server (idle timeout,
                # restart): retry once on a fresh one. A fresh connection failing is final.
                if reused and attempt == 1:
                    continue
                raise DependencyUnavailable("auth service unreachable") from None
            finally:
                self._pool.release(client, broken=broken)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        super().close()
        self._pool.close()


