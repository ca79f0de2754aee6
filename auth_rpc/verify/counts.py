"""What token checks count for the metrics: refusals by reason, dependencies down.

A refusal's message (``TokenRejected.message``) is mapped to one of a fixed
set of reason labels (:data:`REASONS`); a message not in the table counts as
``other``. The label never quotes the message: a remote verifier's message
comes from elsewhere, and nothing from a token ever becomes a label.
"""

from __future__ import annotations

from auth_rpc.serving.metrics import Counts, Snapshot

__all__ = ["REASONS", "TokenCheckCounts", "refusal_reason"]

#: Every reason label ``token_checks_refused_total`` may carry.
REASONS = (
    "missing", "too_large", "malformed", "signature", "algorithm", "unknown_key", "expired",
    "not_yet_valid", "lifetime", "issuer", "audience", "type", "claims", "revoked", "status",
    "not_active", "refresh_token", "other",
)  # fmt: skip

_BY_MESSAGE: dict[str, str] = {
    "missing token": "missing",
    "missing access token": "missing",
    "token too large": "too_large",
    "access token too large": "too_large",
    "malformed token": "malformed",
    "invalid token": "malformed",
    "unsupported critical header": "malformed",
    "token lacks a key id": "malformed",
    "bad signature": "signature",
    "invalid token signature": "signature",
    "algorithm not allowed": "algorithm",
    "unknown signing key": "unknown_key",
    "token expired": "expired",
    "token not yet valid": "not_yet_valid",
    "token issued in the future": "not_yet_valid",
    "invalid token lifetime": "lifetime",
    "token lifetime too long": "lifetime",
    "wrong issuer": "issuer",
    "token has no issuer": "issuer",
    "wrong audience": "audience",
    "token has no audience": "audience",
    "not an access token": "type",
    "not a status list token": "type",
    "missing claim": "claims",
    "token has no subject": "claims",
    "token revoked": "revoked",
    "token suspended": "revoked",
    "token status not valid": "revoked",
    "invalid status claim": "status",
    "token has no status claim": "status",
    "status index out of range": "status",
    "status list not allowed": "status",
    "unknown status list": "status",
    "token not active": "not_active",
    "invalid refresh token": "refresh_token",
    "refresh token expired": "refresh_token",
    "refresh token reused; the session is revoked": "refresh_token",
}


def refusal_reason(message: str) -> str:
    """The reason label of a refusal message (one of :data:`REASONS`)."""
    reason = _BY_MESSAGE.get(message)
    if reason is not None:
        return reason
    if message.startswith(("invalid ", "token lacks the ")) and message.endswith(" claim"):
        return "claims"
    return "other"


class TokenCheckCounts:
    """Refusals by reason and undecidable checks, in plain integers."""

    __slots__ = ("refused", "unavailable")

    def __init__(self) -> None:
        self.refused = Counts()
        self.unavailable = 0

    def refusal(self, message: str) -> None:
        self.refused.add(refusal_reason(message))

    def snapshot(self) -> Snapshot:
        return {
            "token_checks_refused": self.refused.snapshot(),
            "token_checks_unavailable": {(): self.unavailable},
        }
