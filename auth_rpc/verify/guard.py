"""The token guard: access-token checks for the handler of any Thrift service.

A handler subclasses :class:`GuardedHandler` naming its thriftpy2 service,
and marks every method of the service either :func:`requires` (the caller's
token must carry one of the given scopes) or :func:`public` (the method
deliberately takes no token: a visible, declared decision). A complete
example, with the IDL stored anywhere::

    # notes.thrift
    include "common.thrift"

    service Notes {
      string get_note(1: i64 id, 2: string token)
        throws (1: common.Unauthenticated unauthenticated,
                2: common.PermissionDenied permission_denied,
                3: common.Unavailable unavailable,
                4: common.NotFound not_found)
      string health()
    }

    # notes.py
    from auth_rpc.errors import NotFoundError
    from auth_rpc.idl import load_idl
    from auth_rpc.serving.rpc import RpcServer
    from auth_rpc.verify import GuardedHandler, Principal, make_verifier, public, requires

    notes_thrift = load_idl("notes.thrift")

    class NotesHandler(GuardedHandler, service=notes_thrift.Notes):
        def __init__(self, verifier, notes: dict[tuple[str, int], str]) -> None:
            super().__init__(verifier)
            self.notes = notes

        @requires("notes:read", "notes:admin")  # any one of them
        def get_note(self, principal: Principal, id: int) -> str:
            try:
                return self.notes[principal.subject, id]
            except KeyError:
                raise NotFoundError("no such note") from None

        @public
        def health(self) -> str:
            return "ok"

    verifier = make_verifier("jwks", jwks_url="https://auth.example/jwks.json",
                             issuer="https://auth.example", audience="notes")
    server = RpcServer(notes_thrift.Notes, NotesHandler(verifier, {}), port=9090).start()

**The call.** A guarded method receives ``self``, the verified
:class:`~auth_rpc.verify.principal.Principal`, then the IDL's other
arguments in IDL order (the token argument taken out). The token argument
is found in the IDL *by name*: ``token`` unless ``@requires(..., token=
"access_token")`` says otherwise, at any position. For every call, before
the handler body runs, the guard:

1. refuses a missing (``None``), empty, non-string or oversized
   (over :data:`MAX_TOKEN_CHARS`) token without asking the verifier
   (``Unauthenticated``);
2. verifies it with the handler's :class:`~auth_rpc.verify.principal.TokenVerifier`
   (``TokenRejected`` -> ``Unauthenticated``; ``DependencyUnavailable`` ->
   ``Unavailable``: when the verifier cannot decide, the call is refused,
   never accepted);
3. refuses a principal without a subject (``Unauthenticated``);
4. records the subject on :func:`auth_rpc.serving.rpc.current_call` for the
   access log (never the token);
5. checks that the token carries at least one of the declared scopes
   (``PermissionDenied`` otherwise);
6. runs the handler, and translates the internal errors it raises
   (:mod:`auth_rpc.errors`: ``InvalidInput``, ``NotFoundError``,
   ``Forbidden``, ``Throttled``, ...) into the IDL exceptions the method
   declares. Errors are mapped here, once; a :func:`public` method gets the
   same translation.

**The exceptions are the service's own.** At class definition, the guard
resolves, for each method, the exceptions its ``throws`` declares *by Thrift
name and fields* (``Unauthenticated``, ``PermissionDenied``, ``Unavailable``,
``InvalidArgument``, ``NotFound``, each with ``1: string message``;
``RateLimited`` also with ``retry_after_ms``), as listed in
:data:`auth_rpc.verify.rpc_errors.ERROR_NAMES`. So a service whose IDL holds
a second copy of ``common.thrift``'s classes (loaded with plain
``thriftpy2.load``; :func:`auth_rpc.idl.load_idl` avoids that) still sends
its callers typed errors. A handler raising an internal error whose IDL
exception the method does not declare is a handler bug: it is logged as such
(method and error class, never the token) and the call is refused (the
serving layer answers ``TApplicationException(INTERNAL_ERROR)``).

**Nothing is left unguarded by omission.** Defining a subclass (so, at import
time) raises ``TypeError`` naming every problem, if a method of the service
is missing, is neither :func:`requires` nor :func:`public`, takes a different
number of arguments than the IDL declares, names a token argument the IDL
does not have as a string, or (guarded) does not declare ``Unauthenticated``,
``PermissionDenied`` and ``Unavailable`` with a ``string message`` (the three
exceptions the guard itself raises); or if a declared exception of those
names lacks its fields.

:func:`required_scopes` and :func:`public_methods` report what a handler
declares (for tests that walk the IDL).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from thriftpy2.thrift import TType

from auth_rpc.errors import AuthError, DependencyUnavailable, Forbidden, TokenRejected
from auth_rpc.serving.metrics import Snapshot, merge
from auth_rpc.serving.rpc import current_call
from auth_rpc.verify.counts import TokenCheckCounts
from auth_rpc.verify.principal import Principal, TokenVerifier
from auth_rpc.verify.rpc_errors import (
    ERROR_NAMES,
    declared_errors,
    error_table,
    idl_name,
    thrift_error,
)

__all__ = [
    "GUARD_EXCEPTIONS",
    "MAX_TOKEN_CHARS",
    "GuardedHandler",
    "public",
    "public_methods",
    "required_scopes",
    "requires",
]

log = logging.getLogger("auth_rpc.verify.guard")

#: Longer tokens are refused before any verification work (a hash, a
#: signature check, a network call). RFC 9068 tokens of this project are
#: well under 1 KiB; the local verifier refuses tokens over 8 KiB as well.
MAX_TOKEN_CHARS = 8192

#: The IDL exceptions the guard itself raises (for a refused token, a missing
#: scope, a verifier that cannot decide): every guarded method declares them.
GUARD_EXCEPTIONS: tuple[str, ...] = tuple(
    ERROR_NAMES[error] for error in (TokenRejected, Forbidden, DependencyUnavailable)
)

#: Where :func:`requires` and :func:`public` leave their declaration on a method.
_GUARD_ATTR = "__rpc_guard__"

H = TypeVar("H", bound="GuardedHandler")
P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class _Declaration:
    """What a method declares: its scopes and token argument, or (``scopes is None``) public."""

    func: Callable[..., Any]
    scopes: frozenset[str] | None
    token: str = ""


def requires(
    *any_of: str, token: str = "token"  # noqa: S107 - the name of an argument, not a secret
) -> Callable[[Callable[Concatenate[H, Principal, P], R]], Callable[..., R]]:
    """Guard a handler method: the caller's token must carry one of ``any_of``.

    ``token`` names the IDL argument that holds the access token (a
    ``string``, at any position). The decorated method receives the verified
    :class:`Principal` after ``self``, then the other IDL arguments in IDL
    order. The guard is completed when the :class:`GuardedHandler` subclass
    is defined (a decorated method of any other class refuses every call).
    Raises ``ValueError`` at decoration time if no scope, or a blank one, is
    given, if ``token`` is not an identifier, or if the method is already
    decorated.
    """
    if not any_of or any(
        not isinstance(scope, str) or not scope or scope.split() != [scope] for scope in any_of
    ):
        raise ValueError("requires() needs one or more non-blank scope names")
    if not isinstance(token, str) or not token.isidentifier():
        raise ValueError("requires(token=...) needs the name of the IDL's token argument")
    needed = frozenset(any_of)

    def decorate(func: Callable[Concatenate[H, Principal, P], R]) -> Callable[..., R]:
        return _declare(func, _Declaration(func, needed, token))

    return decorate


def public(func: F) -> F:
    """Declare a handler method that deliberately takes no token (e.g. a health check).

    The method receives exactly the IDL's arguments, and its internal errors
    are translated as for a guarded method. Anyone who can reach the port can
    call it: it must reveal and change nothing that needs a token.
    """
    return _declare(func, _Declaration(func, None))  # type: ignore[return-value]


def _declare(func: Callable[..., Any], declaration: _Declaration) -> Callable[..., Any]:
    if getattr(func, _GUARD_ATTR, None) is not None:
        raise ValueError(f"{func.__qualname__} is already declared @requires or @public")

    @functools.wraps(func)
    def not_bound(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Bound by GuardedHandler.__init_subclass__; here only on another class.
        raise TypeError(
            f"{func.__qualname__}: @requires/@public only take effect on a GuardedHandler subclass"
        )

    setattr(not_bound, _GUARD_ATTR, declaration)
    return not_bound


def required_scopes(method: Any) -> frozenset[str] | None:
    """The scopes a guarded method accepts (any one suffices), or ``None`` if not @requires."""
    declaration: _Declaration | None = getattr(method, _GUARD_ATTR, None)
    return None if declaration is None else declaration.scopes


def public_methods(handler_cls: type[GuardedHandler]) -> frozenset[str]:
    """The methods of ``handler_cls``'s service that it declares :func:`public`."""
    service = handler_cls.thrift_service
    return frozenset(
        name
        for name in service.thrift_services
        if (declaration := getattr(getattr(handler_cls, name, None), _GUARD_ATTR, None))
        is not None
        and declaration.scopes is None
    )


class GuardedHandler:
    """Base of a Thrift handler whose every method is :func:`requires` or :func:`public`.

    Subclass with the thriftpy2 service class: ``class H(GuardedHandler,
    service=notes_thrift.Notes)`` (subclasses of ``H`` inherit the service
    and are checked too). Defining the subclass raises ``TypeError``
    naming every problem (see the module docstring). The constructor takes
    the :class:`~auth_rpc.verify.principal.TokenVerifier` (``TypeError`` for
    anything else); the verifier's ``close`` is the caller's.
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
        for name, method in _bind_methods(cls, service).items():
            setattr(cls, name, method)
        cls.thrift_service = service

    def __init__(self, verifier: TokenVerifier) -> None:
        if not isinstance(verifier, TokenVerifier):
            raise TypeError("verifier must implement auth_rpc.verify.principal.TokenVerifier")
        self.verifier = verifier
        # Bound once: the hot path does one attribute lookup, not two.
        self._verify = verifier.verify
        #: The guard's own refusals (no token, too large, no subject), for the metrics.
        self.token_checks = TokenCheckCounts()

    def _guard_refusal(self, message: str) -> TokenRejected:
        """A refusal by the guard itself, counted (see :meth:`metrics_snapshot`).

        A subclass whose ``__init__`` skipped this class's still refuses (uncounted).
        """
        counts = getattr(self, "token_checks", None)
        if isinstance(counts, TokenCheckCounts):
            counts.refusal(message)
        return TokenRejected(message)

    def metrics_snapshot(self) -> Snapshot:
        """The token checks' counts: the guard's refusals and the verifier's own counts.

        A verifier counts when it has a ``metrics_snapshot()`` (every verifier
        of :mod:`auth_rpc.verify` does: cache hits and misses, refusals by
        reason, undecidable checks, status list age).
        """
        snapshot = self.token_checks.snapshot()
        own = getattr(self.verifier, "metrics_snapshot", None)
        if callable(own):
            merge(snapshot, own())
        return snapshot


# -- class definition: check every method, then bind it ---------------------------


def _bind_methods(cls: type, service: Any) -> dict[str, Callable[..., Any]]:
    """The bound guard of every method of ``service``; ``TypeError`` naming every problem."""
    methods = getattr(service, "thrift_services", None)
    if not methods:
        raise TypeError(f"{service!r} is not a thriftpy2 service")
    problems: list[str] = []
    bound: dict[str, Callable[..., Any]] = {}
    for name in methods:
        method = getattr(cls, name, None)
        if method is None:
            problems.append(f"{name}: not implemented")
            continue
        declaration: _Declaration | None = getattr(method, _GUARD_ATTR, None)
        if declaration is None:
            problems.append(
                f"{name}: not guarded: decorate it with @requires(...), "
                "or with @public if it deliberately takes no token"
            )
            continue
        args_spec = getattr(getattr(service, f"{name}_args", None), "thrift_spec", None)
        if not isinstance(args_spec, Mapping):
            problems.append(f"{name}: the service has no {name}_args struct")
            continue
        # The order thriftpy2 passes the arguments in (declaration order).
        arguments = list(args_spec.values())
        declared, bad = declared_errors(service, name)
        method_problems = list(bad.values())
        index: int | None = None
        if declaration.scopes is None:
            expected, besides, after = len(arguments), "", "after self"
        else:
            index = next(
                (i for i, arg in enumerate(arguments) if arg[1] == declaration.token), None
            )
            if index is None or arguments[index][0] != TType.STRING:
                problems.append(f"{name}: the IDL has no `string {declaration.token}` argument")
                continue
            missing = [n for n in GUARD_EXCEPTIONS if n not in declared and n not in bad]
            if missing:
                method_problems.append(
                    f"{name}: does not declare {', '.join(missing)} (a guarded method must "
                    f"declare, each with a `string message` field, every exception the guard "
                    f"raises: {', '.join(GUARD_EXCEPTIONS)})"
                )
            expected, after = len(arguments) - 1, "after the principal"
            besides = f" besides `{declaration.token}`"
        taken = _arguments_taken(declaration.func, principal=declaration.scopes is not None)
        if taken != expected:
            shown = "a variable number of" if taken is None else str(taken)
            method_problems.append(
                f"{name}: takes {shown} arguments {after}, the IDL declares {expected}{besides}"
            )
        if method_problems:
            problems.extend(method_problems)
            continue
        table = error_table(declared)
        label = f"{cls.__qualname__}.{name}"
        if index is None:
            bound[name] = _bind_public(declaration, table, label)
        else:
            bound[name] = _bind_guarded(declaration, index, table, label)
    if problems:
        raise TypeError(
            f"{cls.__qualname__} does not guard {getattr(service, '__name__', service)}: "
            + "; ".join(problems)
        )
    return bound


def _arguments_taken(func: Callable[..., Any], *, principal: bool) -> int | None:
    """How many IDL arguments ``func`` takes (after self and the principal); None for *args."""
    params = list(inspect.signature(func).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) - (2 if principal else 1)


# -- the call: what runs on every request ------------------------------------------


def _undeclared(label: str, exc: AuthError) -> None:
    # The internal error's class only: neither the token nor the message.
    log.error(
        "handler bug: %s raised %s, but the method's IDL declares no %s; "
        "the call is refused as an internal error",
        label,
        type(exc).__name__,
        idl_name(type(exc)) or "exception for it",
    )


def _bind_guarded(
    declaration: _Declaration,
    index: int,
    table: Mapping[type[AuthError], Any],
    label: str,
) -> Callable[..., Any]:
    func = declaration.func
    needed = declaration.scopes
    assert needed is not None
    token_name = declaration.token
    if len(needed) == 1:
        (only,) = needed
        missing_message = f"this call needs the scope {only}"
    else:
        missing_message = "this call needs one of the scopes " + " ".join(sorted(needed))
    no_token = object()

    @functools.wraps(func)
    def guarded(self: Any, token: Any = no_token, /, *args: Any, **kwargs: Any) -> Any:
        try:
            if token is no_token:  # called with keywords only
                token = kwargs.pop(token_name, None)
            # RFC 6750 3.1: "If the request lacks any authentication
            # information [...], the resource server SHOULD NOT include
            # an error code or other error information."
            if not token or token.__class__ is not str:
                raise self._guard_refusal("missing access token")
            if len(token) > MAX_TOKEN_CHARS:
                raise self._guard_refusal("access token too large")
            principal = self._verify(token)
            if not principal.subject:
                # Ownership is decided by the subject: a verifier (perhaps a
                # user's own) that returns none must not make resources ownerless.
                raise self._guard_refusal("token has no subject")
            call = current_call()
            if call is not None:
                call.subject = principal.subject
            # RFC 6750 3.1: "insufficient_scope: The request requires
            # higher privileges than provided by the access token."
            if needed.isdisjoint(principal.scopes):
                raise Forbidden(missing_message)
            return func(self, principal, *args, **kwargs)
        except AuthError as exc:
            mapped = thrift_error(exc, table)
            if mapped is None:
                _undeclared(label, exc)
                raise
            raise mapped from exc

    if index == 0:
        bound = guarded
    else:
        # The token is not the first IDL argument: take it out, then as above
        # (one more call, only for these methods).
        @functools.wraps(func)
        def bound(self: Any, /, *args: Any, **kwargs: Any) -> Any:
            if len(args) > index:
                return guarded(self, args[index], *args[:index], *args[index + 1 :], **kwargs)
            return guarded(self, kwargs.pop(token_name, None), *args, **kwargs)

    setattr(bound, _GUARD_ATTR, declaration)
    return bound


def _bind_public(
    declaration: _Declaration, table: Mapping[type[AuthError], Any], label: str
) -> Callable[..., Any]:
    func = declaration.func

    @functools.wraps(func)
    def open_call(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(self, *args, **kwargs)
        except AuthError as exc:
            mapped = thrift_error(exc, table)
            if mapped is None:
                _undeclared(label, exc)
                raise
            raise mapped from exc

    setattr(open_call, _GUARD_ATTR, declaration)
    return open_call
