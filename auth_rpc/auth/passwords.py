"""Password and client-secret hashing (argon2id) and constant-time compares.

Parameters: argon2id, ``memory_cost=19456`` KiB (19 MiB), ``time_cost=2``,
``parallelism=1`` - OWASP's minimum recommendation for argon2id - with a
16-byte salt and a 32-byte hash. Hashes made with weaker parameters are
upgraded on the next successful login (:meth:`SecretHasher.needs_rehash`).

An unknown user must cost the same time as a wrong password:
:meth:`SecretHasher.verify` with ``stored_hash=None`` verifies against a dummy
hash made at startup, with the same parameters, and returns ``False``.

Admission (:class:`HashAdmission`). Each hash takes ~19 MiB and tens of
milliseconds of one core, and anyone may ask for one (a login for a made-up
name costs a dummy verification, and distinct names are never throttled), so
hashing is admitted, not queued without end:

- at most ``max_concurrent`` (4) hashes run at once;
- at most ``max_waiting`` (8) more wait for a slot, in order of arrival, each
  for at most ``acquire_timeout_s`` (2 s);
- at most ``per_source`` (2) of them, running or waiting, come from one source
  address (the Thrift peer, the HTTP ``REMOTE_ADDR`` - behind the TLS front,
  the TLS client's address; an IPv6 address counts by its /64, which one
  holder controls).

Anything beyond is refused at once with :class:`~auth_rpc.errors.Throttled`
(``RateLimited`` with ``retry_after_ms`` 1000 over Thrift, HTTP 429 with
``Retry-After: 1``). So a flood from one address cannot starve the logins of
others (it holds at most ``per_source`` slots), and a flood from many gets
quick refusals rather than everyone waiting seconds. Callers that must not
hold anything else while waiting (the login throttle's reservation of an
attempt) take the slot first with :meth:`SecretHasher.admit`; hashing inside
it uses that slot. The bounds are per process (``--workers N``: N times them).

Memory. argon2 allocates its 19 MiB in the thread that hashes, with malloc.
glibc serves a block that large with mmap at first, but raises its mmap
threshold to the size of the first such block freed, so later ones come from
the thread's malloc arena and stay resident when freed: every thread that
ever hashed (one per Thrift connection, eight waitress threads) kept ~19 MiB
for good (Auth grew from 41 to 620 MiB after 100 concurrent failed logins).
Two measures: hashing runs only on a pool of ``max_concurrent`` threads (at
most that many arenas ever touch the buffers), and :func:`tune_malloc` fixes
glibc's ``M_MMAP_THRESHOLD`` at 1 MiB (``mallopt`` through ctypes, once per
process, glibc only; it also stops the threshold from adapting for the rest of
the process), so each buffer is mmapped and returned to the system when freed.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import ipaddress
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from auth_rpc.errors import Throttled
from auth_rpc.serving.rpc import tune_malloc

__all__ = [
    "ARGON2_PARAMETERS",
    "HashAdmission",
    "SecretHasher",
    "constant_time_equals",
    "source_key",
    "tune_malloc",
]

log = logging.getLogger("auth_rpc.auth.passwords")

#: The argon2id parameters of new hashes.
ARGON2_PARAMETERS: dict[str, int] = {
    "time_cost": 2,
    "memory_cost": 19456,
    "parallelism": 1,
    "hash_len": 32,
    "salt_len": 16,
}


#: How long a refused caller is asked to wait before trying again.
RETRY_AFTER_MS = 1000
BUSY = "server busy, retry later"
SOURCE_BUSY = "too many password checks from this address at once; retry later"

T = TypeVar("T")


def source_key(source: str | None) -> str:
    """The admission key of a source address: the address, an IPv6 one by its /64.

    ``None`` or ``""`` (no address known: an admin command, a direct call) is
    ``"-"``, one source of its own.
    """
    if not source:
        return "-"
    try:
        address = ipaddress.ip_address(source.partition("%")[0])
    except ValueError:
        return source[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class HashAdmission:
    """Slots for hashing: bounded in total, in waiting and per source (module docstring).

    :meth:`acquire` returns the source's key (give it back to :meth:`release`)
    or raises Throttled. Thread safe.
    """

    def __init__(self, *, slots: int, max_waiting: int, per_source: int, wait_s: float) -> None:
        if slots < 1 or max_waiting < 0 or per_source < 1 or wait_s <= 0:
            raise ValueError("invalid hashing admission settings")
        self.slots = slots
        self.max_waiting = max_waiting
        self.per_source = per_source
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._busy = 0
        self._queue: deque[object] = deque()
        self._by_source: dict[str, int] = {}
        self._refused = 0
        self._reported_at = float("-inf")
        #: Refusals since start, for the metrics: (too many from one source, all busy).
        self.refused_source = 0
        self.refused_busy = 0

    def acquire(self, source: str | None) -> str:
        """Take a slot for ``source``, waiting briefly if all are busy. Raises Throttled."""
        key = source_key(source)
        with self._cond:
            held = self._by_source.get(key, 0)
            if held >= self.per_source:
                self.refused_source += 1
                self._refuse()
                raise Throttled(SOURCE_BUSY, RETRY_AFTER_MS)
            if self._busy < self.slots and not self._queue:
                self._busy += 1
                self._by_source[key] = held + 1
                return key
            if len(self._queue) >= self.max_waiting:
                self.refused_busy += 1
                self._refuse()
                raise Throttled(BUSY, RETRY_AFTER_MS)
            ticket = object()
            self._queue.append(ticket)
            self._by_source[key] = held + 1
            deadline = time.monotonic() + self.wait_s
            while self._queue[0] is not ticket or self._busy >= self.slots:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._queue.remove(ticket)
                    self._drop(key)
                    self._cond.notify_all()
                    self.refused_busy += 1
                    self._refuse()
                    raise Throttled(BUSY, RETRY_AFTER_MS)
                self._cond.wait(remaining)
            self._queue.popleft()
            self._busy += 1
            self._cond.notify_all()  # the next in line may find a free slot too
            return key

    def release(self, key: str) -> None:
        with self._cond:
            self._busy -= 1
            self._drop(key)
            self._cond.notify_all()

    def _drop(self, key: str) -> None:
        left = self._by_source.get(key, 0) - 1
        if left > 0:
            self._by_source[key] = left
        else:
            self._by_source.pop(key, None)

    def _refuse(self) -> None:
        # One warning per 10 s at most, with the count: a flood must not flood the log.
        self._refused += 1
        now = time.monotonic()
        if now - self._reported_at >= 10.0:
            log.warning(
                "password hashing saturated: %d attempt(s) refused (retry after %d ms)",
                self._refused, RETRY_AFTER_MS,
            )
            self._refused = 0
            self._reported_at = now

    def snapshot(self) -> tuple[int, int, int]:
        """``(running, waiting, sources)`` now (for tests and reports)."""
        with self._cond:
            return self._busy, len(self._queue), len(self._by_source)


def constant_time_equals(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets in time independent of where they differ."""
    a_bytes = a.encode("utf-8") if isinstance(a, str) else a
    b_bytes = b.encode("utf-8") if isinstance(b, str) else b
    return hmac.compare_digest(a_bytes, b_bytes)


class SecretHasher:
    """argon2id hashing with a dummy hash for unknown accounts and admission (module docstring).

    :meth:`hash` and :meth:`verify` take a slot for ``source`` themselves,
    unless called inside :meth:`admit` (then they use its slot). The hashing
    itself runs on the hasher's own pool of ``max_concurrent`` threads; call
    :meth:`close` when done with the hasher.
    """

    def __init__(
        self,
        *,
        time_cost: int = ARGON2_PARAMETERS["time_cost"],
        memory_cost: int = ARGON2_PARAMETERS["memory_cost"],
        parallelism: int = ARGON2_PARAMETERS["parallelism"],
        max_concurrent: int = 4,
        max_waiting: int = 8,
        per_source: int = 2,
        acquire_timeout_s: float = 2.0,
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
        self.admission = HashAdmission(
            slots=max_concurrent,
            max_waiting=max_waiting,
            per_source=per_source,
            wait_s=acquire_timeout_s,
        )
        # Made on first use, so that a hasher made before fork (auth-rpc serve
        # --workers opens the service once first) has no threads to lose.
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closed = False
        self._admitted: contextvars.ContextVar[bool] = contextvars.ContextVar(
            f"hasher_admitted_{id(self)}", default=False
        )
        tune_malloc()
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

    @contextlib.contextmanager
    def admit(self, source: str | None = None) -> Iterator[None]:
        """Hold a hashing slot for ``source`` (an address; ``None``: unknown) for the block.

        Raises Throttled at once when ``source`` already holds ``per_source``
        slots or ``max_waiting`` callers wait, or after ``acquire_timeout_s``
        without a slot; nothing is held then. :meth:`hash` and :meth:`verify`
        inside the block use this slot (on this thread).
        """
        if self._admitted.get():
            yield
            return
        key = self.admission.acquire(source)
        token = self._admitted.set(True)
        try:
            yield
        finally:
            self._admitted.reset(token)
            self.admission.release(key)

    def _run(self, func: Callable[..., T], *args: object) -> T:
        with self._pool_lock:
            if self._closed:
                raise Throttled(BUSY, RETRY_AFTER_MS)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.admission.slots, thread_name_prefix="argon2"
                )
            pool = self._pool
        with self.admit():  # no-op inside admit(); else a slot of the unknown source
            return pool.submit(func, *args).result()

    def hash(self, secret: str, *, source: str | None = None) -> str:
        """The argon2id hash (PHC string) of ``secret``. Raises Throttled when saturated."""
        with self.admit(source):
            return self._run(self._hasher.hash, secret)

    def verify(self, stored_hash: str | None, secret: str, *, source: str | None = None) -> bool:
        """Whether ``secret`` matches ``stored_hash``.

        ``stored_hash=None`` (no such account) verifies against the dummy hash
        and returns ``False``: the same work as a wrong password. A corrupt
        stored hash counts as a mismatch. Raises Throttled when saturated.
        """
        target = self._dummy_hash if stored_hash is None else stored_hash
        with self.admit(source):
            ok = self._run(self._check, target, secret)
        return ok and stored_hash is not None

    def _check(self, target: str, secret: str) -> bool:  # on the pool
        try:
            return bool(self._hasher.verify(target, secret))
        except InvalidHashError:
            log.error("a stored hash is not a valid argon2 hash")
            return False
        except VerificationError:  # includes VerifyMismatchError
            return False

    def close(self) -> None:
        """Stop the hashing threads (after the hashes in progress). Idempotent."""
        with self._pool_lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether ``stored_hash`` was made with other parameters than the current ones."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except (InvalidHashError, ValueError):
            return False
