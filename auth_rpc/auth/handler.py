"""The Thrift handler of ``service Auth``: adapts :class:`AuthService` to the IDL.

Each method is wrapped by :func:`auth_rpc.verify.rpc_errors.map_errors`, so internal
errors leave as the IDL's exceptions. A client may omit a string field
(thriftpy2 then passes ``None``): it is treated as empty and refused as the
method declares (``InvalidArgument``, or ``Unauthenticated`` for
``validate``).

Each method may only raise what its IDL ``throws`` declares: an internal
error the method does not declare (which the service should never raise)
is turned into a declared one by :func:`_declared` - ``Unauthenticated`` for
``validate`` (fail closed), ``Unavailable`` elsewhere - rather than
reaching the client as a transport-level error. ``jwks`` declares nothing
and :meth:`AuthService.jwks` never raises.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from auth_rpc.auth.service import AuthService, IssuedTokens
from auth_rpc.errors import (
    AuthError,
    DependencyUnavailable,
    InvalidCredentials,
    InvalidInput,
    Throttled,
    TokenRejected,
)
from auth_rpc.idl import auth_thrift
from auth_rpc.serving.rpc import current_call
from auth_rpc.verify.principal import Principal
from auth_rpc.verify.rpc_errors import map_errors

__all__ = ["AuthHandler", "principal_to_thrift", "tokens_to_thrift"]

log = logging.getLogger("auth_rpc.auth.handler")


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _audience(value: object) -> str | None:
    # The added `audience` argument: omitted (an older client) or empty (a
    # generated client that must pass something) asks for the default.
    return value if isinstance(value, str) and value else None


def _peer_address() -> str | None:
    """The address of the client of the call being served (hashing is admitted per source)."""
    call = current_call()
    return str(call.peer[0]) if call is not None and call.peer else None


def tokens_to_thrift(tokens: IssuedTokens) -> Any:
    """``IssuedTokens`` as an ``auth_thrift.TokenPair``."""
    return auth_thrift.TokenPair(
        access_token=tokens.access_token,
        refresh_token=tokens.refresh_token,
        token_type=tokens.token_type,
        expires_in=tokens.expires_in,
        scope=tokens.scope,
    )


def principal_to_thrift(principal: Principal) -> Any:
    """A :class:`Principal` as an ``auth_thrift.Principal`` (scopes sorted)."""
    return auth_thrift.Principal(
        subject=principal.subject,
        scopes=sorted(principal.scopes),
        expires_at=principal.expires_at,
        token_id=principal.token_id,
        client_id=principal.client_id,
        issuer=principal.issuer,
        audience=" ".join(principal.audience),
    )


F = TypeVar("F", bound=Callable[..., Any])


def _declared(
    *allowed: type[AuthError], fallback: Callable[[], AuthError] | None = None
) -> Callable[[F], F]:
    """Let only ``allowed`` internal errors through; others become ``fallback()``."""

    def fallback_unavailable() -> AuthError:
        return DependencyUnavailable("service error, retry later")

    make = fallback or fallback_unavailable

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except allowed:
                raise
            except AuthError as exc:
                log.error("%s raised undeclared %s", func.__name__, type(exc).__name__)
                raise make() from exc

        return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature

    return decorate


_GRANT_ERRORS = (InvalidCredentials, TokenRejected, Throttled, InvalidInput, DependencyUnavailable)


class AuthHandler:
    """Implements ``service Auth`` over one :class:`AuthService`."""

    def __init__(self, service: AuthService) -> None:
        self._service = service

    @map_errors
    @_declared(*_GRANT_ERRORS)
    def login(
        self, username: str | None, password: str | None, audience: str | None = None
    ) -> Any:
        return tokens_to_thrift(
            self._service.login(
                _text(username), _text(password), audience=_audience(audience),
                source=_peer_address(),
            )
        )

    @map_errors
    @_declared(TokenRejected, InvalidCredentials, InvalidInput, DependencyUnavailable)
    def refresh(self, refresh_token: str | None, audience: str | None = None) -> Any:
        return tokens_to_thrift(
            self._service.refresh(_text(refresh_token), audience=_audience(audience))
        )

    @map_errors
    @_declared(*_GRANT_ERRORS)
    def client_token(
        self,
        client_id: str | None,
        client_secret: str | None,
        scope: str | None,
        audience: str | None = None,
    ) -> Any:
        return tokens_to_thrift(
            self._service.client_token(
                _text(client_id), _text(client_secret), _text(scope), audience=_audience(audience)
            )
        )

    @map_errors
    @_declared(
        TokenRejected, InvalidCredentials, DependencyUnavailable,
        fallback=lambda: TokenRejected("invalid token"),
    )
    def validate(self, token: str | None) -> Any:
        return principal_to_thrift(self._service.validate(_text(token)))

    @map_errors
    @_declared(InvalidInput, DependencyUnavailable)
    def revoke(self, token: str | None) -> None:
        self._service.revoke(_text(token))

    def jwks(self) -> str:
        return json.dumps(self._service.jwks(), separators=(",", ":"), sort_keys=True)
