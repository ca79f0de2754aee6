"""Password and client-secret hashing (argon2id) and constant-time compares.

Parameters: argon2id, ``memory_cost=19456`` KiB (19 MiB), ``time_cost=2``,
``parallelism=1`` - OWASP's minimum recommendation for argon2id - with a
16-byte salt and a 32-byte hash. Hashes made with weaker parameters are
upgraded on the next successful login (:meth:`SecretHasher.needs_rehash`).

An unknown user must cost the same time as a wrong password:
:meth:`SecretHasher.verify` with ``stored_hash=None`` verifies against a dummy
hash made at startup, with the same parameters, and returns ``False``.

Each hash takes ~19 MiB and tens of milliseconds of one core, so the number
of hashes computed at once is bounded (``max_concurrent``); a caller that
cannot get a slot within ``acquire_timeout_s`` gets
:class:`~auth_rpc.errors.Throttled` instead of piling up memory.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from auth_rpc.errors import Throttled

__all__ = ["ARGON2_PARAMETERS", "SecretHasher", "constant_time_equals"]

log = logging.getLogger("auth_rpc.auth.passwords")

#: The argon2id parameters of new hashes.
ARGON2_PARAMETERS: dict[str, int] = {
    "time_cost": 2,
    "memory_cost": 19456,
    "parallelism": 1,
    "hash_len": 32,
    "salt_len": 16,
}


def constant_time_equals(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets in time independent of where they differ."""
    a_bytes = a.encode("utf-8") if isinstance(a, str) else a
    b_bytes = b.encode("utf-8") if isinstance(b, str) else b
    return hmac.compare_digest(a_bytes, b_bytes)


class SecretHasher:
    """argon2id hashing with a dummy hash for unknown accounts and bounded concurrency."""

    def __init__(
        self,
        *,
        time_cost: int = ARGON2_PARAMETERS["time_cost"],
        memory_cost: int = ARGON2_PARAMETERS["memory_cost"],
        parallelism: int = ARGON2_PARAMETERS["parallelism"],
        max_concurrent: int = 4,
        acquire_timeout_s: float = 10.0,
    ) -> None:
        if memory_cost < 19456 or time_cost < 2 or parallelism < 1:
            raise ValueError("argon2id parameters below OWASP's minimum (19 MiB, t=2, p=1)")
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            hash_len=ARGON2_PARAMETERS["hash_len"],
            salt_len=ARGON2_PARAMETERS["salt_len"],
            type=argon2.Type.ID,
        )
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._acquire_timeout_s = acquire_timeout_s
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(32))

    @property
    def parameters(self) -> dict[str, int]:
        """The argon2id parameters in use (for reports)."""
        p = self._hasher
        return {
            "time_cost": p.time_cost,
            "memory_cost": p.memory_cost,
            "parallelism": p.parallelism,
        }

    def _acquire(self) -> None:
        if not self._slots.acquire(timeout=self._acquire_timeout_s):
            log.warning("all password hashing slots busy; refusing an attempt")
            raise Throttled("server busy, retry later", 1000)

    def hash(self, secret: str) -> str:
        """The argon2id hash (PHC string) of ``secret``. Raises Throttled when saturated."""
        self._acquire()
        try:
            return self._hasher.hash(secret)
        finally:
            self._slots.release()

    def verify(self, stored_hash: str | None, secret: str) -> bool:
        """Whether ``secret`` matches ``stored_hash``.

        ``stored_hash=None`` (no such account) verifies against the dummy hash
        and returns ``False``: the same work as a wrong password. A corrupt
        stored hash counts as a mismatch. Raises Throttled when saturated.
        """
        target = self._dummy_hash if stored_hash is None else stored_hash
        ok: bool
        self._acquire()
        try:
            ok = self._hasher.verify(target, secret)
        except InvalidHashError:
            log.error("a stored hash is not a valid argon2 hash")
            ok = False
        except VerificationError:  # includes VerifyMismatchError
            ok = False
        finally:
            self._slots.release()
        return ok and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether ``stored_hash`` was made with other parameters than the current ones."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except (InvalidHashError, ValueError):
            return False
