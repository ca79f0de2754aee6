"""The one token-checking mechanism of the Posts service.

Every method of ``service Posts`` takes the caller's access token as its first
argument (``1: string token``). A handler method declares the scope it needs
with :func:`requires`; the decorator replaces the ``token`` parameter with a
verified :class:`~auth_rpc.verify.principal.Principal`::

    class PostsHandler(GuardedHandler, service=posts_thrift.Posts):
        @requires(SCOPE_READ)
        def get_post(self, principal: Principal, post_id: int | None) -> Post: ...

For every call, before the handler body runs, the wrapper:

1. refuses a missing (``None``), empty, non-string or oversized token
   (``Unauthenticated``);
2. verifies it with the configured :class:`~auth_rpc.verify.principal.TokenVerifier`
   (``TokenRejected`` -> ``Unauthenticated``; ``DependencyUnavailable`` ->
   ``Unavailable``: the call is refused, never accepted, when the verifier
   cannot decide);
3. records the subject on :func:`auth_rpc.serving.rpc.current_call` for the
   access log (never the token);
4. checks that the token carries at least one of the declared scopes
   (``PermissionDenied`` otherwise);
5. runs the handler with the principal, and translates every internal error
   it raises into the IDL exception, once, here (:func:`auth_rpc.verify.rpc_errors.to_thrift`).

No handler can forget it: :class:`GuardedHandler` checks, when a subclass is
*defined* (so at import time), that every method named in the service's
``thrift_services`` is wrapped by :func:`requires`, that the IDL method's first
argument is ``token``, and that the handler takes as many further arguments
as the IDL declares; a violation raises ``TypeError`` and the module does not
import. The guard test walks the IDL and tries every method with missing,
empty, garbage and expired tokens and a token without the scope.

Scopes of ``service Posts`` (see the handler): ``posts:read`` for ``get_post``
and ``list_posts``; ``posts:write`` for ``create_post``; ``posts:write`` *or*
``posts:admin`` for ``update_post`` and ``delete_post``, where ``posts:write``
covers one's own posts and ``posts:admin`` alone suffices for any post.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from auth_rpc.errors import AuthError, Forbidden, TokenRejected
from auth_rpc.serving.rpc import current_call
from auth_rpc.verify.principal import Principal, TokenVerifier
from auth_rpc.verify.rpc_errors import to_thrift

__all__ = [
    "MAX_TOKEN_CHARS",
    "SCOPE_ADMIN",
    "SCOPE_READ",
    "SCOPE_WRITE",
    "GuardedHandler",
    "required_scopes",
    "requires",
]

SCOPE_READ = "posts:read"
SCOPE_WRITE = "posts:write"
SCOPE_ADMIN = "posts:admin"

#: Longer tokens are refused before any verification work (a hash, a
#: signature check, a network call). RFC 9068 tokens of this project are
#: well under 1 KiB; the local verifier refuses tokens over 8 KiB as well.
MAX_TOKEN_CHARS = 8192

_SCOPES_ATTR = "__posts_required_scopes__"
_THRIFT_STRING = 11  # thriftpy2.thrift.TType.STRING

H = TypeVar("H", bound="GuardedHandler")
P = ParamSpec("P")
R = TypeVar("R")


def requires(
    *any_of: str,
) -> Callable[[Callable[Concatenate[H, Principal, P], R]], Callable[Concatenate[H, Any, P], R]]:
    """Guard a handler method: the caller's token must carry one of ``any_of``.

    The decorated method receives the verified :class:`Principal` where the
    IDL has the ``token`` argument. The returned wrapper raises only the IDL's
    exceptions for the errors described in the module docstring (and lets any
    other exception through, which the serving layer answers as an internal
    error: still a refusal). Raises ``ValueError`` at decoration time if no
    scope, or a blank one, is given.
    """
    if not any_of or any(not scope or scope.split() != [scope] for scope in any_of):
        raise ValueError("requires() needs one or more non-blank scope names")
    needed = frozenset(any_of)
    if len(needed) == 1:
        (only,) = needed
        missing_message = f"this call needs the scope {only}"
    else:
        missing_message = "this call needs one of the scopes " + " ".join(sorted(needed))

    def decorate(
        func: Callable[Concatenate[H, Principal, P], R],
    ) -> Callable[Concatenate[H, Any, P], R]:
        @functools.wraps(func)
        def guarded(self: H, token: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                # RFC 6750 3.1: "If the request lacks any authentication
                # information [...], the resource server SHOULD NOT include
                # an error code or other error information."
                if not token or token.__class__ is not str:
                    raise TokenRejected("missing access token")
                if len(token) > MAX_TOKEN_CHARS:
                    raise TokenRejected("access token too large")
                principal = self._verify(token)
                if not principal.subject:
                    # Ownership is decided by the subject: a verifier (perhaps a
                    # user's own) that returns none must not make posts ownerless.
                    raise TokenRejected("token has no subject")
                call = current_call()
                if call is not None:
                    call.subject = principal.subject
                # RFC 6750 3.1: "insufficient_scope: The request requires
                # higher privileges than provided by the access token."
                if needed.isdisjoint(principal.scopes):
                    raise Forbidden(missing_message)
                return func(self, principal, *args, **kwargs)
            except AuthError as exc:
                raise to_thrift(exc) from exc

        setattr(guarded, _SCOPES_ATTR, needed)
        return guarded

    return decorate


def required_scopes(method: Any) -> frozenset[str] | None:
    """The scopes a guarded method accepts (any one suffices), or ``None`` if unguarded."""
    scopes: frozenset[str] | None = getattr(method, _SCOPES_ATTR, None)
    return scopes


class GuardedHandler:
    """Base of a Thrift handler whose every method is guarded by :func:`requires`.

    Subclass with the thriftpy2 service class: ``class H(GuardedHandler,
    service=posts_thrift.Posts)`` (subclasses of ``H`` inherit the service
    and are checked too). Defining the subclass raises ``TypeError``
    if any method of the service is missing, unguarded, or takes a different
    number of arguments than the IDL declares, or if an IDL method's first
    argument is not ``1: string token``.
    """

    #: The thriftpy2 service class the subclass implements.
    thrift_service: ClassVar[Any]
    _verify: Callable[[str], Principal]

    def __init_subclass__(cls, *, service: Any = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass of a handler inherits its service, and is checked again:
        # overriding a method without @requires fails just the same.
        service = service if service is not None else getattr(cls, "thrift_service", None)
        if service is None:
            raise TypeError(
                f"{cls.__qualname__}: name the service: class X(GuardedHandler, service=...)"
            )
        _check_handler_class(cls, service)
        cls.thrift_service = service

    def __init__(self, verifier: TokenVerifier) -> None:
        if not isinstance(verifier, TokenVerifier):
            raise TypeError("verifier must implement auth_rpc.verify.principal.TokenVerifier")
        self.verifier = verifier
        # Bound once: the hot path does one attribute lookup, not two.
        self._verify = verifier.verify


def _check_handler_class(cls: type, service: Any) -> None:
    methods = getattr(service, "thrift_services", None)
    if not methods:
        raise TypeError(f"{service!r} is not a thriftpy2 service")
    problems: list[str] = []
    for name in methods:
        spec = getattr(service, f"{name}_args").thrift_spec
        arg_ids = sorted(spec)
        first = spec[arg_ids[0]] if arg_ids else None
        if first is None or first[0] != _THRIFT_STRING or first[1] != "token":
            problems.append(f"{name}: the IDL's first argument is not `string token`")
            continue
        method = getattr(cls, name, None)
        if method is None:
            problems.append(f"{name}: not implemented")
            continue
        if required_scopes(method) is None:
            problems.append(f"{name}: not guarded by @requires(...)")
            continue
        wrapped = inspect.unwrap(method)
        params = list(inspect.signature(wrapped).parameters.values())
        positional = [
            p
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        # self, principal, then the IDL arguments after the token.
        if len(positional) != len(arg_ids) + 1 or any(
            p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params
        ):
            problems.append(
                f"{name}: takes {max(len(positional) - 2, 0)} arguments after the principal, "
                f"the IDL declares {len(arg_ids) - 1} after the token"
            )
    if problems:
        raise TypeError(
            f"{cls.__qualname__} does not guard {service.__name__}: " + "; ".join(problems)
        )
