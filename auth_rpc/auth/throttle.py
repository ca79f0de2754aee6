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

State is in memory and bounded: at most ``max_keys`` names are tracked; when
full, the names whose last failure is oldest are dropped first (their
streaks end first). With a :class:`StreakStore` (the Auth service passes
one on its database) every streak is also written there and read back
before each attempt, so that the processes of ``--workers N`` share one
count and a restart forgets nothing. ``clock`` is injected for tests.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from auth_rpc.auth.db import Database
from auth_rpc.errors import DependencyUnavailable, Throttled

__all__ = ["Attempt", "SqliteStreakStore", "StreakStore", "Throttle"]

log = logging.getLogger("auth_rpc.auth.throttle")


@dataclass
class _Entry:
    failures: int = 0  # in the current streak
    last: float = 0.0  # time of the streak's last failure
    in_flight: int = 0


class StreakStore(Protocol):
    """Where failure streaks are shared between processes."""

    def load(self, kind: str, key: str) -> tuple[int, float] | None:
        """``(failures, time of the last)`` of ``key``'s streak, or ``None``."""
        ...

    def save(self, kind: str, key: str, failures: int, last: float) -> None:
        """Record the streak (``failures=0`` forgets it)."""
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
    ) -> None:
        if limit < 1 or window_s <= 0 or base_delay_s <= 0 or max_delay_s < base_delay_s:
            raise ValueError("invalid throttle settings")
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
        """Raise Throttled if an attempt for ``key`` must wait now."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._refuse_if_needed(entry, self._clock())

    def _refuse_if_needed(self, entry: _Entry, now: float) -> None:
        self._prune(entry, now)
        count = entry.failures
        if count >= self.limit:
            wait = entry.last + self.delay_s(count) - now
            if wait > 0:
                raise Throttled(f"too many failed {self._what}; retry later",
                                max(1, math.ceil(wait * 1000)))
        if entry.in_flight >= max(1, self.limit - count):
            raise Throttled(f"too many concurrent {self._what}; retry later", 1000)

    @contextmanager
    def attempt(self, key: str) -> Iterator[Attempt]:
        """Guard one guess: raises Throttled first if it must wait.

        The body reports the outcome on the yielded :class:`Attempt`; an
        unreported outcome (an exception) counts as neither.
        """
        shared = self._load(key)
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry()
                self._entries[key] = entry
            if shared is not None and shared[1] >= entry.last:
                # Another process (or a previous run) saw the latest failures.
                entry.failures, entry.last = shared
            elif shared is None and self._store is not None and not entry.in_flight:
                entry.failures = 0  # ended elsewhere (a success in another worker)
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
                streak = (entry.failures, entry.last)
                if not entry.failures and entry.in_flight == 0:
                    self._entries.pop(key, None)
                self._evict()
            if attempt.outcome is not None:
                self._save(key, *streak)

    def _load(self, key: str) -> tuple[int, float] | None:
        if self._store is None:
            return None
        try:
            return self._store.load(self._what, key)
        except DependencyUnavailable:
            log.warning("throttle state unreadable; using this process's count")
            return None

    def _save(self, key: str, failures: int, last: float) -> None:
        if self._store is None:
            return
        try:
            self._store.save(self._what, key, failures, last)
        except DependencyUnavailable:
            log.warning("throttle state not saved; this process still counts it")

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

    def __init__(self, db: Database) -> None:
        self._db = db

    def load(self, kind: str, key: str) -> tuple[int, float] | None:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT failures, last FROM throttle_streaks WHERE kind = ? AND key = ?",
                (kind, key),
            ).fetchone()
        return (int(row[0]), float(row[1])) if row else None

    def save(self, kind: str, key: str, failures: int, last: float) -> None:
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
        return removed
