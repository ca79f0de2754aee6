"""The Posts service process: a store, a token verifier, the handler, a listener.

:class:`PostsServer` composes :class:`~posts_rpc.store.SqlitePostStore`
(``DATA_DIR/posts.db``) or :class:`~posts_rpc.store.PostgresPostStore`
(``database_url``), the caller's :class:`~auth_rpc.verify.principal.TokenVerifier`,
:class:`~posts_rpc.handler.PostsHandler` and an
:class:`~auth_rpc.serving.rpc.RpcServer`; it is what ``posts-rpc serve`` runs and
what tests and other programs embed in-process::

    server = PostsServer(data_dir=tmp, verifier=LocalVerifier(...)).start()
    ... server.port ...
    server.stop()          # then verifier.close()

Switching the token check off exists for one purpose, measuring what the
check costs (``bench/``): the keyword-only, underscore-prefixed constructor
argument ``_unsafe_skip_auth_for_benchmarks=True`` replaces the verifier by
one that accepts any non-empty token as a fixed principal holding every
Posts scope. The command line never passes it and has no flag for it; it
logs a warning when used.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from auth_rpc.idl import posts_thrift
from auth_rpc.serving.metrics import CallCounts, ServiceMetrics
from auth_rpc.serving.private_files import private_dir
from auth_rpc.serving.rpc import RpcServer, ServerSettings
from auth_rpc.verify.principal import Principal, TokenVerifier
from posts_rpc.guard import SCOPE_ADMIN, SCOPE_READ, SCOPE_WRITE
from posts_rpc.handler import PostsHandler
from posts_rpc.store import PostgresPostStore, PostStore, SqlitePostStore

__all__ = ["DB_FILE_NAME", "PostsServer"]

log = logging.getLogger("posts_rpc.server")

DB_FILE_NAME = "posts.db"


class PostsServer:
    """The Posts service on one Thrift listener.

    Give ``data_dir`` (the store ``DATA_DIR/posts.db`` is opened, created
    with mode 0600 in a directory made with mode 0700, and closed by
    :meth:`stop`), or ``database_url`` (``postgresql://...``: the store is
    that database's, opened and closed here likewise), or ``store`` (the
    caller's; not closed here). The verifier
    is always the caller's: close it after :meth:`stop`.

    ``start()`` binds (``port=0`` picks a free port, then readable from
    :attr:`port`) and serves from background threads; ``stop()`` stops
    accepting, lets calls in flight finish, and closes the store it opened.
    Usable as a context manager.

    ``metrics`` (a :class:`~auth_rpc.serving.metrics.ServiceMetrics`) turns
    on the counts it exposes: calls by method and outcome, latencies,
    connections, token checks (the handler's guard and the verifier); serve
    ``metrics.render()`` where it may be scraped (``posts-rpc serve
    --metrics-port``). Without it, calls and connections are not counted.

    Raises ``ValueError`` for a bad combination of arguments and
    :class:`~auth_rpc.errors.DependencyUnavailable` when the store cannot
    be opened (:class:`~auth_rpc.serving.private_files.UnsafeFile`, one of
    its subclasses, when another user owns the data directory or the store,
    or group or others may write them).
    """

    def __init__(
        self,
        *,
        verifier: TokenVerifier | None,
        data_dir: Path | str | None = None,
        store: PostStore | None = None,
        database_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        settings: ServerSettings | None = None,
        clock: Callable[[], float] = time.time,
        sock: socket.socket | None = None,
        metrics: ServiceMetrics | None = None,
        _unsafe_skip_auth_for_benchmarks: bool = False,
    ) -> None:
        if sum(x is not None for x in (data_dir, store, database_url)) != 1:
            raise ValueError("give exactly one of data_dir, database_url and store")
        if _unsafe_skip_auth_for_benchmarks:
            log.warning("TOKEN CHECKS ARE OFF: every non-empty token is accepted (benchmarks only)")
            verifier = _AcceptAnyToken()
        elif verifier is None:
            raise ValueError("a token verifier is required")
        self.verifier = verifier
        self._owns_store = store is None
        if database_url is not None:
            store = PostgresPostStore.open(database_url, clock=clock)
        elif store is None:
            assert data_dir is not None
            directory = Path(data_dir)
            private_dir(directory, "data directory")  # refuses one another user could write
            store = SqlitePostStore.open(directory / DB_FILE_NAME, clock=clock)
        self.store: PostStore = store
        try:
            self.handler = PostsHandler(store, verifier)
            self.rpc = RpcServer(
                posts_thrift.Posts,
                self.handler,
                host=host,
                port=port,
                settings=settings,
                name="posts",
                sock=sock,
                counts=CallCounts() if metrics is not None else None,
            )
        except BaseException:
            self._close_store()
            raise
        self.metrics = metrics
        if metrics is not None:
            metrics.add_source(self.rpc.metrics_snapshot)
            metrics.add_source(self.handler.metrics_snapshot)

    def start(self) -> PostsServer:
        """Bind and serve; raises ``OSError`` if the address cannot be bound."""
        try:
            self.rpc.start()
        except BaseException:
            self._close_store()
            raise
        return self

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        return self.rpc.port

    @property
    def host(self) -> str:
        return self.rpc.host

    @property
    def address(self) -> tuple[str, int]:
        return self.rpc.address

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, finish calls in flight (within ``grace_s``), close the store.

        Safe to call more than once.
        """
        self.rpc.stop(grace_s)
        self._close_store()

    def wait(self) -> None:
        """Block until :meth:`stop` has finished."""
        self.rpc.wait()

    def __enter__(self) -> PostsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _close_store(self) -> None:
        if self._owns_store:
            self.store.close()


class _AcceptAnyToken:
    """The benchmark-only verifier: any token is a principal with every Posts scope."""

    _PRINCIPAL = Principal(
        subject="benchmark",
        scopes=frozenset({SCOPE_READ, SCOPE_WRITE, SCOPE_ADMIN}),
        expires_at=2**62,
        token_id="benchmark",  # noqa: S106 - a label, not a secret
        client_id="benchmark",
    )

    def verify(self, token: str) -> Principal:
        return self._PRINCIPAL

    def close(self) -> None:
        pass
