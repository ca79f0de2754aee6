"""Translation of internal errors into the IDL's exceptions, in one place."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from auth_rpc import errors
from auth_rpc.idl import common_thrift

__all__ = ["ERROR_MAP", "map_errors", "to_thrift"]

#: Every internal error class and the IDL exception it becomes.
ERROR_MAP: dict[type[errors.AuthError], Any] = {
    errors.TokenRejected: common_thrift.Unauthenticated,
    errors.InvalidCredentials: common_thrift.Unauthenticated,
    errors.Forbidden: common_thrift.PermissionDenied,
    errors.InvalidInput: common_thrift.InvalidArgument,
    errors.NotFoundError: common_thrift.NotFound,
    errors.Throttled: common_thrift.RateLimited,
    errors.DependencyUnavailable: common_thrift.Unavailable,
}


def to_thrift(exc: errors.AuthError) -> Exception:
    """The IDL exception for ``exc`` (its message only; nothing internal)."""
    for cls in type(exc).__mro__:
        target = ERROR_MAP.get(cls)
        if target is not None:
            if isinstance(exc, errors.Throttled):
                return target(message=exc.message, retry_after_ms=exc.retry_after_ms)
            return target(message=exc.message)
    raise TypeError(f"no IDL mapping for {type(exc).__name__}")


F = TypeVar("F", bound=Callable[..., Any])


def map_errors(func: F) -> F:
    """Decorate a Thrift handler method so internal errors leave as IDL exceptions."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.AuthError as exc:
            raise to_thrift(exc) from exc

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature
