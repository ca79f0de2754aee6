"""Translation of internal errors into the IDL's exceptions, in one place.

:data:`ERROR_NAMES` is the one definition: each internal error class of
:mod:`auth_rpc.errors` and the name of the Thrift exception (declared in
``common.thrift``) it becomes. It is applied two ways:

- onto the package's own classes (:data:`auth_rpc.idl.common_thrift`):
  :data:`ERROR_MAP`, :func:`to_thrift` and :func:`map_errors`, for services
  whose IDL is loaded by :mod:`auth_rpc.idl` (``service Auth``);
- onto the classes *a method of any service declares*: :func:`declared_errors`
  finds them by name and fields in the method's ``<method>_result.thrift_spec``,
  :func:`error_table` turns them into a table, and :func:`thrift_error` maps an
  error with it. The token guard (:mod:`auth_rpc.verify.guard`) does this
  once per method at class definition. It matters because thriftpy2 sends a
  declared exception only if it is an instance of the very class in the
  method's result struct, and an IDL loaded with plain ``thriftpy2.load``
  carries its own copy of ``common.thrift``'s classes.

An exception's ``message`` is the internal error's message only (safe to show
a client by :class:`auth_rpc.errors.AuthError`'s contract); nothing else of
the internal error leaves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from thriftpy2.thrift import TType

from auth_rpc import errors
from auth_rpc.idl import common_thrift

__all__ = [
    "ERROR_FIELDS",
    "ERROR_MAP",
    "ERROR_NAMES",
    "declared_errors",
    "error_table",
    "idl_name",
    "map_errors",
    "thrift_error",
    "to_thrift",
]

#: Every internal error class and the name of the IDL exception it becomes.
ERROR_NAMES: dict[type[errors.AuthError], str] = {
    errors.TokenRejected: "Unauthenticated",
    errors.InvalidCredentials: "Unauthenticated",
    errors.Forbidden: "PermissionDenied",
    errors.InvalidInput: "InvalidArgument",
    errors.NotFoundError: "NotFound",
    errors.Throttled: "RateLimited",
    errors.DependencyUnavailable: "Unavailable",
}

_STRING = frozenset({TType.STRING})
_INTEGER = frozenset({TType.I16, TType.I32, TType.I64})

#: The fields (name -> accepted Thrift types) an IDL exception needs for the
#: mapping to construct it; every name of :data:`ERROR_NAMES` is here.
ERROR_FIELDS: dict[str, dict[str, frozenset[int]]] = {
    "Unauthenticated": {"message": _STRING},
    "PermissionDenied": {"message": _STRING},
    "InvalidArgument": {"message": _STRING},
    "NotFound": {"message": _STRING},
    "Unavailable": {"message": _STRING},
    "RateLimited": {"message": _STRING, "retry_after_ms": _INTEGER},
}


def error_table(classes: Mapping[str, Any]) -> dict[type[errors.AuthError], Any]:
    """Every internal error class whose IDL exception name is in ``classes``, with that class.

    ``classes`` maps IDL exception names to exception classes (e.g. those
    :func:`declared_errors` found); internal errors whose name is missing are
    left out, and :func:`thrift_error` returns ``None`` for them.
    """
    return {error: classes[name] for error, name in ERROR_NAMES.items() if name in classes}


#: Every internal error class and the package's own IDL exception class it becomes.
ERROR_MAP: dict[type[errors.AuthError], Any] = error_table(
    {name: getattr(common_thrift, name) for name in ERROR_FIELDS}
)


def idl_name(error: type[errors.AuthError]) -> str | None:
    """The name of the IDL exception ``error`` (or its nearest mapped base) becomes."""
    for cls in error.__mro__:
        name = ERROR_NAMES.get(cls)
        if name is not None:
            return name
    return None


def thrift_error(
    exc: errors.AuthError, table: Mapping[type[errors.AuthError], Any]
) -> Exception | None:
    """The exception of ``table`` for ``exc`` (its message only), or ``None`` if unmapped."""
    for cls in type(exc).__mro__:
        target = table.get(cls)
        if target is not None:
            if isinstance(exc, errors.Throttled):
                return target(message=exc.message, retry_after_ms=exc.retry_after_ms)
            return target(message=exc.message)
    return None


def to_thrift(
    exc: errors.AuthError, table: Mapping[type[errors.AuthError], Any] = ERROR_MAP
) -> Exception:
    """The IDL exception for ``exc`` (its message only; nothing internal).

    Raises ``TypeError`` if ``table`` (by default the package's own classes)
    has no mapping for it.
    """
    mapped = thrift_error(exc, table)
    if mapped is None:
        raise TypeError(f"no IDL mapping for {type(exc).__name__}")
    return mapped


def declared_errors(service: Any, method: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The exceptions ``method`` of ``service`` declares that the mapping can raise.

    Looks at ``<method>_result.thrift_spec`` (the method's ``throws``) for
    exceptions named as in :data:`ERROR_FIELDS`, whatever module declares
    them, and checks their fields. Returns ``(found, problems)``: ``found``
    maps each usable exception's name to its class; ``problems`` maps the
    name of each declared but unusable one (a field missing or of another
    type, or two exceptions of that name) to a description naming the method.
    """
    spec = getattr(getattr(service, f"{method}_result", None), "thrift_spec", None)
    if not isinstance(spec, Mapping):
        return {}, {"": f"{method}: the service has no {method}_result struct"}
    found: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for entry in spec.values():
        if len(entry) < 3 or entry[1] == "success":
            continue
        cls = entry[2]
        name = getattr(cls, "__name__", None)
        if name not in ERROR_FIELDS:
            continue
        if name in found and found[name] is not cls:
            problems[name] = f"{method}: declares two different exceptions named {name}"
            continue
        fields = {
            field[1]: field[0]
            for field in getattr(cls, "thrift_spec", {}).values()
            if len(field) >= 2
        }
        missing = [
            f"`{_type_name(types)} {field}`"
            for field, types in ERROR_FIELDS[name].items()
            if fields.get(field) not in types
        ]
        if missing:
            problems[name] = f"{method}: its exception {name} has no field " + ", ".join(missing)
            continue
        found[name] = cls
    for name in problems:
        found.pop(name, None)
    return found, problems


def _type_name(types: frozenset[int]) -> str:
    return "string" if types == _STRING else "i64"


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
