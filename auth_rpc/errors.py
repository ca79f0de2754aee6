"""Internal errors, free of Thrift and HTTP.

Token and account logic raise these; the edges (the Thrift handlers through
:func:`auth_rpc.verify.rpc_errors.map_errors`, the HTTP app) translate them once into
the IDL's exceptions or OAuth error responses.

"Reject this input" and "this service cannot decide" are different branches:
:class:`TokenRejected` and :class:`InvalidCredentials` mean the caller is not
authenticated; :class:`DependencyUnavailable` means something needed to decide
is unreachable, and the call is refused (fail closed), never accepted.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "DependencyUnavailable",
    "Forbidden",
    "InvalidCredentials",
    "InvalidInput",
    "NotFoundError",
    "Throttled",
    "TokenRejected",
    "storage_failure",
]


class AuthError(Exception):
    """Base of every error this package raises on purpose.

    ``message`` is safe to show a client: it never contains a token, a
    password or a key.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TokenRejected(AuthError):
    """The token is missing, malformed, badly signed, expired, revoked, or not for us."""


class InvalidCredentials(AuthError):
    """Wrong username, password, client id or client secret (one message for all)."""


class Forbidden(AuthError):
    """The caller is known but lacks the scope, or does not own the resource."""


class InvalidInput(AuthError):
    """A request field is out of range or malformed; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(AuthError):
    """No such resource."""


class Throttled(AuthError):
    """Too many attempts; the caller may retry after ``retry_after_ms``."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class DependencyUnavailable(AuthError):
    """Something needed to decide (Auth service, JWKS, introspection, database) is unreachable."""


def storage_failure(exc: BaseException) -> str:
    """What a database error says, for the log: its class and SQLite's (or the OS's) own message.

    "disk is full", "database is locked", "attempt to write a readonly
    database", "database disk image is malformed" must reach the operator:
    SQLite's messages carry no statement parameters (no token, no password),
    and an ``OSError``'s names at most a path of the data directory.
    """
    detail = str(exc).strip()
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
