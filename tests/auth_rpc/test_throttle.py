"""The throttle on its own: streaks, doubling delays, cap, ageing, concurrency, bounds."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from auth_rpc.auth.throttle import Throttle
from auth_rpc.errors import Throttled


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failures(throttle: Throttle, key: str, n: int) -> None:
    for _ in range(n):
        with throttle.attempt(key) as attempt:
            attempt.failed()


def retry_after(throttle: Throttle, key: str) -> int:
    with pytest.raises(Throttled) as info, throttle.attempt(key):
        pass
    return info.value.retry_after_ms


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def throttle(clock: Clock) -> Throttle:
    return Throttle(clock=clock)


def test_four_failures_are_free(throttle: Throttle) -> None:
    failures(throttle, "k", 4)
    throttle.check("k")
    with throttle.attempt("k"):
        pass


def test_fifth_failure_throttles_for_a_minute(throttle: Throttle, clock: Clock) -> None:
    failures(throttle, "k", 5)
    assert retry_after(throttle, "k") == 60_000
    clock.now += 59.5
    assert retry_after(throttle, "k") == 500
    with pytest.raises(Throttled):
        throttle.check("k")
    clock.now += 0.5
    throttle.check("k")


def test_delay_doubles_then_caps(throttle: Throttle, clock: Clock) -> None:
    failures(throttle, "k", 5)
    seen = []
    for _ in range(7):
        ms = retry_after(throttle, "k")
        seen.append(ms)
        clock.now += ms / 1000
        failures(throttle, "k", 1)
    assert seen == [60_000, 120_000, 240_000, 480_000, 900_000, 900_000, 900_000]


def test_refused_attempts_do_not_count(throttle: Throttle, clock: Clock) -> None:
    failures(throttle, "k", 5)
    for _ in range(20):
        retry_after(throttle, "k")
    clock.now += 60
    with throttle.attempt("k") as attempt:
        attempt.succeeded()
    failures(throttle, "k", 4)
    throttle.check("k")


def test_streak_ends_after_the_window(throttle: Throttle, clock: Clock) -> None:
    failures(throttle, "k", 4)
    clock.now += 15 * 60 + 1
    failures(throttle, "k", 4)
    throttle.check("k")
    assert len(throttle) == 1


def test_success_resets_and_forgets(throttle: Throttle) -> None:
    failures(throttle, "k", 4)
    with throttle.attempt("k") as attempt:
        attempt.succeeded()
    assert len(throttle) == 0
    failures(throttle, "k", 4)
    throttle.check("k")


def test_an_exception_counts_as_nothing(throttle: Throttle) -> None:
    failures(throttle, "k", 4)
    with pytest.raises(RuntimeError), throttle.attempt("k"):
        raise RuntimeError
    throttle.check("k")


def test_keys_are_independent(throttle: Throttle) -> None:
    failures(throttle, "a", 5)
    throttle.check("b")
    with pytest.raises(Throttled):
        throttle.check("a")


def test_parallel_attempts_cannot_overshoot_the_limit(throttle: Throttle) -> None:
    failures(throttle, "k", 3)
    with throttle.attempt("k"), throttle.attempt("k"):
        # Two guesses in flight would reach the limit: a third must wait.
        assert retry_after(throttle, "k") == 1000
    with throttle.attempt("k"):  # released again
        pass


def test_a_fresh_key_allows_limit_concurrent_attempts(throttle: Throttle) -> None:
    with contextlib.ExitStack() as stack:
        for _ in range(5):
            stack.enter_context(throttle.attempt("k"))
        assert retry_after(throttle, "k") == 1000
    assert len(throttle) == 0  # nothing counted, nothing kept


def test_state_is_bounded(clock: Clock) -> None:
    throttle = Throttle(clock=clock, max_keys=100)
    for i in range(1000):
        failures(throttle, f"user{i}", 1)
    assert len(throttle) <= 100
    # The most recent failures are kept.
    failures(throttle, "user999", 4)
    with pytest.raises(Throttled):
        throttle.check("user999")


def test_aged_entries_are_evicted_first(clock: Clock) -> None:
    throttle = Throttle(clock=clock, max_keys=10)
    failures(throttle, "attacked", 5)
    clock.now += 16 * 60  # its streak ended
    for i in range(11):
        failures(throttle, f"user{i}", 1)
    assert len(throttle) <= 10


@pytest.mark.parametrize(
    "kwargs",
    [{"limit": 0}, {"window_s": 0}, {"base_delay_s": 0}, {"max_delay_s": 1.0}],
)
def test_settings_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Throttle(**kwargs)


def test_at_the_cap_waiting_out_the_delay_does_not_reset_the_streak(
    throttle: Throttle, clock: Clock
) -> None:
    """A guesser at the 15-minute cap gets one guess per wait, never a fresh five."""
    failures(throttle, "alice", 5)
    for _ in range(10):  # 60, 120, ... s: keep guessing as soon as allowed
        wait_s = retry_after(throttle, "alice") / 1000
        clock.now += wait_s
        failures(throttle, "alice", 1)
    assert retry_after(throttle, "alice") == 15 * 60 * 1000
    clock.now += 15 * 60
    failures(throttle, "alice", 1)  # the one guess the wait allowed...
    assert retry_after(throttle, "alice") == 15 * 60 * 1000  # ...and the cap again
    # The streak ends a window after the delay has run out: then five guesses again.
    clock.now += 15 * 60 + 15 * 60 + 1
    failures(throttle, "alice", 4)
    with throttle.attempt("alice") as attempt:
        attempt.succeeded()  # and the owner gets in


# -- shared through the database (--workers N) ------------------------------------


@pytest.fixture
def store(tmp_path: Any) -> Any:
    from auth_rpc.auth.db import Database
    from auth_rpc.auth.throttle import SqliteStreakStore

    db = Database.open(tmp_path / "t.sqlite3")
    yield SqliteStreakStore(db)
    db.close()


def workers(store: Any, clock: Clock, n: int = 2) -> list[Throttle]:
    """``n`` throttles on one store: the processes of ``--workers n``."""
    return [Throttle(clock=clock, store=store, what="logins") for _ in range(n)]


def test_workers_add_failures_up_not_over_each_other(store: Any, clock: Clock) -> None:
    """Regression: each process wrote its own count over the shared one (last writer
    wins), so two workers failing at once counted one failure."""
    a, b = workers(store, clock)
    with a.attempt("alice") as first, b.attempt("alice") as second:
        first.failed()
        second.failed()
    assert store.load("logins", "alice")[0] == 2
    for _ in range(3):
        with (a if _ % 2 else b).attempt("alice") as attempt:
            attempt.failed()
    for throttle in (a, b):
        assert retry_after(throttle, "alice") == 60_000


def test_attempts_in_flight_are_counted_over_all_workers(store: Any, clock: Clock) -> None:
    """Regression: the in-flight limit was per process, so N workers let 5 x N guesses
    be checked at once."""
    a, b = workers(store, clock)
    with contextlib.ExitStack() as stack:
        for i in range(5):
            stack.enter_context((a, b)[i % 2].attempt("alice"))
        for throttle in (a, b):
            with pytest.raises(Throttled, match="too many concurrent"):
                stack.enter_context(throttle.attempt("alice"))
    with a.attempt("alice"):  # all released
        pass
    failures(b, "alice", 3)
    # Two left before the limit, so a third in flight must wait.
    with (
        a.attempt("alice"),
        b.attempt("alice"),
        pytest.raises(Throttled, match="too many concurrent"),
        a.attempt("alice"),
    ):
        pass


def test_reservations_of_a_crashed_worker_expire(store: Any, clock: Clock) -> None:
    a, b = workers(store, clock)
    attempts = [a.attempt("alice") for _ in range(5)]
    for attempt in attempts:
        attempt.__enter__()  # a worker that dies mid-attempt never finishes them
    with pytest.raises(Throttled, match="too many concurrent"), b.attempt("alice"):
        pass
    clock.now += a.reservation_ttl_s
    with b.attempt("alice") as attempt:
        attempt.failed()
    assert store.load("logins", "alice")[0] == 1


def test_a_success_in_one_worker_ends_the_streak_for_all(store: Any, clock: Clock) -> None:
    a, b = workers(store, clock)
    failures(a, "alice", 4)
    with b.attempt("alice") as attempt:
        attempt.succeeded()
    assert store.load("logins", "alice") is None
    failures(a, "alice", 4)
    b.check("alice")
    failures(b, "alice", 1)
    with pytest.raises(Throttled):
        a.check("alice")
    clock.now += 60 + 15 * 60 + 1  # delay and window over: a fresh streak
    failures(a, "alice", 1)
    assert store.load("logins", "alice")[0] == 1
