"""Who a verified token speaks for, and the interfaces that produce it.

:class:`Principal` is what every verifier returns and what a Posts handler is
given. :class:`TokenVerifier` is the pluggable part (a ``Protocol``: users may
bring their own); :class:`RevocationCheck` is how a local-mode verifier learns
that a token id was revoked (nothing by default). :class:`StatusReference`
is a token's entry in a Token Status List (its ``status`` claim), which the
local and jwks verifiers check on every call
(:mod:`auth_rpc.verify.statuslist`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["NoRevocations", "Principal", "RevocationCheck", "StatusReference", "TokenVerifier"]


class StatusReference(NamedTuple):
    """A token's ``status.status_list`` claim: its entry ``idx`` in the list at ``uri``."""

    uri: str
    idx: int


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified identity behind an access token."""

    subject: str
    scopes: frozenset[str]
    expires_at: int  # unix seconds
    token_id: str  # the jti
    client_id: str
    issuer: str = ""
    audience: tuple[str, ...] = ()
    #: The token's Status List entry (local and jwks modes; ``None`` without a
    #: ``status`` claim or in the remote modes). Not part of equality.
    status: StatusReference | None = field(default=None, compare=False, repr=False)

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


@runtime_checkable
class TokenVerifier(Protocol):
    """Checks an access token.

    ``verify`` returns the :class:`Principal` or raises
    :class:`auth_rpc.errors.TokenRejected` (the token is not acceptable) or
    :class:`auth_rpc.errors.DependencyUnavailable` (cannot decide now; the
    caller must refuse, never accept).
    """

    def verify(self, token: str) -> Principal: ...

    def close(self) -> None: ...


@runtime_checkable
class RevocationCheck(Protocol):
    """Tells whether a token id has been revoked."""

    def is_revoked(self, token_id: str) -> bool: ...


class NoRevocations:
    """The default for local verification: no revocation list is known."""

    def is_revoked(self, token_id: str) -> bool:
        return False
