"""Auth replicas telling each other what changed (PostgreSQL ``LISTEN``/``NOTIFY``).

A store that changes something another replica keeps in memory sends a
notification on :data:`CHANNEL` in the same transaction (:func:`notify`;
PostgreSQL delivers it when the transaction commits, and never if it rolls
back; on SQLite nothing is sent). The payload is a topic, optionally with a
name: ``keys`` (a key added, scheduled, superseded or retired), ``client:<id>``
(a client disabled, enabled, removed, its secret, scopes, audiences or
permission changed), ``user:<name>`` (the same for a user).

A :class:`ChangeFeed` is one replica's listener
(:class:`~auth_rpc.serving.sqlstore.Listener`, one connection per process):
it calls the subscribers of a topic with the name, or with ``None`` for
"anything may have changed": after its connection was lost (at once, and again
when it is back, since what changed in between is unknown). Subscribers must
not trust memory while :attr:`ChangeFeed.live` is false: they read the
database per request instead. :attr:`ChangeFeed.generation` counts every
notification and loss, for the check-then-remember race (read the generation,
read the database, remember only if the generation is unchanged).

This is inside the trust boundary: only Auth replicas (who hold the
database credentials) listen. Verifiers keep reading the JWK Set and the
Token Status Lists over HTTP, never the database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from auth_rpc.serving.sqlstore import Listener

__all__ = ["CHANNEL", "ChangeFeed", "notify"]

log = logging.getLogger("auth_rpc.auth.changes")

#: The channel every Auth replica listens on.
CHANNEL = "auth_rpc_changes"
TOPICS = ("keys", "client", "user")

Subscriber = Callable[[str | None], None]


def notify(db: Any, conn: Any, topic: str, name: str | None = None) -> None:
    """Tell the other replicas, when the current transaction commits, that ``topic`` changed."""
    if topic not in TOPICS:
        raise ValueError(f"unknown change topic {topic!r}")
    db.notify(conn, CHANNEL, topic if name is None else f"{topic}:{name}")


class ChangeFeed:
    """One replica's subscription to :data:`CHANNEL` (inert without a database URL)."""

    def __init__(self, url: str | None, *, name: str = "auth-changes") -> None:
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._lock = threading.Lock()
        self.generation = 0
        self.received = 0
        self._listener: Listener | None = None
        if url is not None:
            self._listener = Listener(
                url, [CHANNEL], self._on_note, name=name, on_lost=self._on_lost
            )

    def subscribe(self, topic: str, callback: Subscriber) -> None:
        """Call ``callback(name)`` on each change of ``topic`` (``None``: anything changed)."""
        if topic not in TOPICS:
            raise ValueError(f"unknown change topic {topic!r}")
        with self._lock:
            self._subscribers.setdefault(topic, []).append(callback)

    def start(self, *, timeout_s: float = 10.0) -> ChangeFeed:
        """Start listening (returns once ``LISTEN`` is in force, or after ``timeout_s``)."""
        if self._listener is not None:
            self._listener.start(timeout_s=timeout_s)
            if not self._listener.listening:
                log.warning("not listening for changes yet: reading the database per request")
        return self

    @property
    def live(self) -> bool:
        """Whether notifications arrive now (never on SQLite)."""
        return self._listener is not None and self._listener.listening

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()

    def _on_note(self, channel: str, payload: str | None) -> None:
        self.generation += 1
        self.received += 1
        if payload is None:
            self._everything()
            return
        topic, _, name = payload.partition(":")
        with self._lock:
            callbacks = list(self._subscribers.get(topic, ()))
        for callback in callbacks:
            self._call(callback, name or None)

    def _on_lost(self) -> None:
        self.generation += 1
        self._everything()

    def _everything(self) -> None:
        with self._lock:
            callbacks = [c for topic in TOPICS for c in self._subscribers.get(topic, ())]
        for callback in callbacks:
            self._call(callback, None)

    @staticmethod
    def _call(callback: Subscriber, name: str | None) -> None:
        try:
            callback(name)
        except Exception:  # one subscriber's bug must not silence the others
            log.exception("a change subscriber failed")
