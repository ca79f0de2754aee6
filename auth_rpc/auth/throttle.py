"""Throttling of guesses: per username for logins, per client id for client tokens.

The rule: failures of one key form a streak. Once a streak reaches ``limit``
(5) failures, the next attempt must wait ``base_delay_s * 2 ** (failures -
limit)`` seconds after the last failure (60 s, 120 s, 240 s, ...), capped at
``max_delay_s`` (15 minutes). Attempts refused while waiting are not counted,
do not check the password, and cost nothing. A streak ends ``window_s`` (15
minutes) after its delay has run out (so a guesser at the cap gets one guess
per 15 minutes, not a fresh five), and a success ends it at once, so the real
owner is never locked out for good: at worst they wait out the delay an
attacker's guesses earned (at most 15 minutes).

The rule is the same for existing and unknown names (the key is the name as
given), so a refusal reveals nothing about whether an account exists.

Concurrency: no more attempts of one key may be in flight at once than
failures remain before the limit (at least one), so that parallel guesses
cannot overshoot it: a fresh key allows 5 concurrent attempts, a key with 4
failures one.

With a :class:`StreakStore` (the Auth service passes one on its database,
:class:`SqliteStreakStore`) the store alone holds the count, shared by every
process on it (``--workers N``) and kept across restarts. Each attempt is
*reserved* before its password is checked, in one transaction that reads the
streak and the reservations in flight, refuses if the key must wait or if one
more attempt in flight could overshoot the limit (the rule above, counted over
all processes), and records the reservation. Its outcome then updates the
streak in another transaction (``failures = failures + 1``, never an
overwrite: a failure in one process cannot erase another's) and drops the
reservation. A reservation expires ``reservation_ttl_s`` (60 s) after it was
made, so that a process that crashed mid-attempt holds nothing for long. If
the store cannot be read or written, the attempt is refused
(DependencyUnavailable): fail closed.

Without a store, state is in memory and bounded: at most ``max_keys`` names
are tracked; when full, the names whose last failure is oldest are dropped
first (their streaks end first). ``clock`` is injected for tests.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from auth_rpc.auth.db import AnyDatabase
from auth_rpc.errors import DependencyUnavailable, Throttled
from auth_rpc.serving.sqlstore import POSTGRESQL

__all__ = ["Attempt", "SqliteStreakStore", "StreakStore", "Throttle"]

log = logging.getLogger("auth_rpc.auth.throttle")


@dataclass
class _Entry:
    failures: int = 0  # in the current streak
    last: float = 0.0  # time of the streak's last failure
    in_flight: int = 0


class StreakStore(Protocol):
    """Where failure streaks and the attempts in flight are shared between processes.

    Every method may raise DependencyUnavailable.
    """

    def load(self, kind: str, key: str) -> tuple[int, float] | None:
        """``(failures, time of the last)`` of ``key``'s streak, or ``None``."""
        ...

    def reserve(
        self,
        kind: str,
        key: str,
        *,
        now: float,
        expires_at: float,
        admit: Callable[[int, float, int], None],
    ) -> str:
        """Atomically: call ``admit(failures, last, in_flight)`` (it raises Throttled to
        refuse; reservations expired by ``now`` do not count) and record a
        reservation until ``expires_at``; return its id."""
        ...

    def finish(
        self,
        kind: str,
        key: str,
        reservation: str,
        *,
        outcome: bool | None,
        now: float,
        ended: Callable[[int, float], bool],
    ) -> int:
        """Atomically: drop the reservation and apply the outcome - a failure adds
        one to the streak (a new streak of one if ``ended(failures, last)``), a
        success ends it, ``None`` leaves it. Returns the streak's failures."""
        ...


class Attempt:
    """One guess in progress; report its outcome with :meth:`succeeded` or :meth:`failed`."""

    __slots__ = ("outcome",)

    def __init__(self) -> None:
        self.outcome: bool | None = None

    def succeeded(self) -> None:
        self.outcome = True

    def failed(self) -> None:
        self.outcome = False


class Throttle:
    """Failure counting with growing delays, per key (see the module docstring)."""

    def __init__(
        self,
        *,
        limit: int = 5,
        window_s: float = 15 * 60,
        base_delay_s: float = 60.0,
        max_delay_s: float = 15 * 60,
        max_keys: int = 50_000,
        clock: Callable[[], float] = time.time,
        what: str = "attempts",
        store: StreakStore | None = None,
        reservation_ttl_s: float = 60.0,
    ) -> None:
        if limit < 1 or window_s <= 0 or base_delay_s <= 0 or max_delay_s < base_delay_s:
            raise ValueError("invalid throttle settings")
        if reservation_ttl_s <= 0:
            raise ValueError("invalid throttle settings")
        self.reservation_ttl_s = reservation_ttl_s
        self.limit = limit
        self.window_s = window_s
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.max_keys = max_keys
        self._clock = clock
        self._what = what
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._store = store
        #: Attempts refused since start, for the metrics: waiting after failures, too
        #: many at once.
        self.refused_failures = 0
        self.refused_concurrent = 0

    def delay_s(self, failures: int) -> float:
        """The wait after the last failure when ``failures`` happened within the window."""
        if failures < self.limit:
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * 2 ** min(failures - self.limit, 30))

    def _prune(self, entry: _Entry, now: float) -> None:
        # A streak ends window_s after its delay has run out, not after its last
        # failure: else, once the delay reaches its cap (= the window), every
        # wait would also end the streak and give a fresh ``limit`` guesses.
        if entry.failures and now - entry.last > self.window_s + self.delay_s(entry.failures):
            entry.failures = 0

    def check(self, key: str) -> None:
        """Raise Throttled if an attempt for ``key`` must wait now (reserves nothing).

        A cheap refusal before anything costly (waiting for a hashing slot).
        """
        if self._store is not None:
            shared = self._store.load(self._what, key)
            if shared is not None:
                self._refuse_if_waiting(*shared, self._clock())
            return
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._refuse_if_needed(entry, self._clock())

    def _refuse_if_needed(self, entry: _Entry, now: float) -> None:
        self._prune(entry, now)
        self._admit(entry.failures, entry.last, entry.in_flight, now)

    def _ended(self, failures: int, last: float, now: float) -> bool:
        """Whether a streak of ``failures`` whose last was at ``last`` is over at ``now``."""
        return bool(failures) and now - last > self.window_s + self.delay_s(failures)

    def _refuse_if_waiting(self, failures: int, last: float, now: float) -> None:
        if self._ended(failures, last, now):
            return
        if failures >= self.limit:
            wait = last + self.delay_s(failures) - now
            if wait > 0:
                self.refused_failures += 1
                raise Throttled(f"too many failed {self._what}; retry later",
                                max(1, math.ceil(wait * 1000)))

    def _admit(self, failures: int, last: float, in_flight: int, now: float) -> None:
        """Raise Throttled unless one more attempt may start (the module docstring's rule)."""
        if self._ended(failures, last, now):
            failures = 0
        self._refuse_if_waiting(failures, last, now)
        if in_flight >= max(1, self.limit - failures):
            self.refused_concurrent += 1
            raise Throttled(f"too many concurrent {self._what}; retry later", 1000)

    @contextmanager
    def attempt(self, key: str) -> Iterator[Attempt]:
        """Guard one guess: raises Throttled first if it must wait.

        The body reports the outcome on the yielded :class:`Attempt`; an
        unreported outcome (an exception) counts as neither. With a store, the
        attempt is reserved there first (module docstring); DependencyUnavailable
        when the store fails.
        """
        if self._store is not None:
            with self._shared_attempt(self._store, key) as attempt:
                yield attempt
            return
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry()
                self._entries[key] = entry
            try:
                self._refuse_if_needed(entry, now)
            except Throttled:
                if not entry.failures and entry.in_flight == 0:
                    self._entries.pop(key, None)
                raise
            entry.in_flight += 1
        attempt = Attempt()
        try:
            yield attempt
        finally:
            with self._lock:
                entry.in_flight -= 1
                if attempt.outcome is False:
                    now = self._clock()
                    self._prune(entry, now)
                    entry.failures += 1
                    entry.last = now
                    self._entries[key] = entry  # re-insert if evicted meanwhile
                    self._entries.move_to_end(key)
                    if entry.failures >= self.limit:
                        log.info("throttling %s after %d failures", self._what, entry.failures)
                elif attempt.outcome is True:
                    entry.failures = 0
                if not entry.failures and entry.in_flight == 0:
                    self._entries.pop(key, None)
                self._evict()

    @contextmanager
    def _shared_attempt(self, store: StreakStore, key: str) -> Iterator[Attempt]:
        now = self._clock()
        reservation = store.reserve(
            self._what,
            key,
            now=now,
            expires_at=now + self.reservation_ttl_s,
            admit=lambda failures, last, in_flight: self._admit(failures, last, in_flight, now),
        )
        attempt = Attempt()
        try:
            yield attempt
        finally:
            done = self._clock()
            try:
                failures = store.finish(
                    self._what,
                    key,
                    reservation,
                    outcome=attempt.outcome,
                    now=done,
                    ended=lambda failures, last: self._ended(failures, last, done),
                )
            except DependencyUnavailable:
                # The reservation expires by itself; the failure is lost (the
                # store is down, so every attempt is refused meanwhile).
                log.error("throttle state not written; the attempt's reservation will expire")
            else:
                if attempt.outcome is False and failures >= self.limit:
                    log.info("throttling %s after %d failures", self._what, failures)

    def _evict(self) -> None:
        # Entries are kept in order of their last failure (move_to_end), so the
        # front holds the streaks that ended first: O(1) per eviction.
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class SqliteStreakStore:
    """A :class:`StreakStore` in the Auth service's database (table ``throttle_streaks``)."""

    def __init__(self, db: AnyDatabase) -> None:
        self._db = db

    def load(self, kind: str, key: str) -> tuple[int, float] | None:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT failures, last FROM throttle_streaks WHERE kind = ? AND key = ?",
                (kind, key),
            ).fetchone()
        return (int(row[0]), float(row[1])) if row else None

    def reserve(
        self,
        kind: str,
        key: str,
        *,
        now: float,
        expires_at: float,
        admit: Callable[[int, float, int], None],
    ) -> str:
        reservation = secrets.token_hex(8)
        # BEGIN IMMEDIATE (SQLite) or the key's lock (PostgreSQL): no other
        # process or replica writes between the reads and the insert.
        with self._db.transaction() as conn:
            self._db.lock(conn, f"throttle:{kind}:{key}")
            conn.execute(
                "DELETE FROM throttle_reservations WHERE kind = ? AND key = ? AND expires_at <= ?",
                (kind, key, now),
            )
            row = conn.execute(
                "SELECT failures, last FROM throttle_streaks WHERE kind = ? AND key = ?",
                (kind, key),
            ).fetchone()
            (in_flight,) = conn.execute(
                "SELECT COUNT(*) FROM throttle_reservations WHERE kind = ? AND key = ?",
                (kind, key),
            ).fetchone()
            failures, last = (int(row[0]), float(row[1])) if row else (0, 0.0)
            admit(failures, last, int(in_flight))  # Throttled rolls the transaction back
            conn.execute(
                "INSERT INTO throttle_reservations (kind, key, reservation, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (kind, key, reservation, expires_at),
            )
        return reservation

    def finish(
        self,
        kind: str,
        key: str,
        reservation: str,
        *,
        outcome: bool | None,
        now: float,
        ended: Callable[[int, float], bool],
    ) -> int:
        with self._db.transaction() as conn:
            self._db.lock(conn, f"throttle:{kind}:{key}")
            conn.execute(
                "DELETE FROM throttle_reservations WHERE kind = ? AND key = ? AND reservation = ?",
                (kind, key, reservation),
            )
            if outcome is True:
                conn.execute(
                    "DELETE FROM throttle_streaks WHERE kind = ? AND key = ?", (kind, key)
                )
                return 0
            row = conn.execute(
                "SELECT failures, last FROM throttle_streaks WHERE kind = ? AND key = ?",
                (kind, key),
            ).fetchone()
            if outcome is None:
                return int(row[0]) if row else 0
            if row is None or ended(int(row[0]), float(row[1])):
                conn.execute(
                    "INSERT INTO throttle_streaks (kind, key, failures, last) VALUES (?, ?, 1, ?) "
                    "ON CONFLICT (kind, key) DO UPDATE SET failures = 1, last = excluded.last",
                    (kind, key, now),
                )
                return 1
            larger = "GREATEST" if self._db.dialect == POSTGRESQL else "max"
            conn.execute(
                f"UPDATE throttle_streaks SET failures = failures + 1, "  # noqa: S608 - constant
                f"last = {larger}(last, ?) "
                "WHERE kind = ? AND key = ?",
                (now, kind, key),
            )
            return int(row[0]) + 1

    def save(self, kind: str, key: str, failures: int, last: float) -> None:
        """Overwrite a streak (tests, tools; attempts use :meth:`reserve` and :meth:`finish`)."""
        with self._db.transaction() as conn:
            if failures:
                conn.execute(
                    "INSERT INTO throttle_streaks (kind, key, failures, last) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (kind, key) DO UPDATE SET failures = excluded.failures, "
                    "last = excluded.last",
                    (kind, key, failures, last),
                )
            else:
                conn.execute(
                    "DELETE FROM throttle_streaks WHERE kind = ? AND key = ?", (kind, key)
                )

    def purge(self, *, before: float) -> int:
        """Forget streaks whose last failure is before ``before``; returns how many."""
        with self._db.transaction() as conn:
            removed: int = conn.execute(
                "DELETE FROM throttle_streaks WHERE last < ?", (before,)
            ).rowcount
            conn.execute("DELETE FROM throttle_reservations WHERE expires_at < ?", (before,))
        return removed
