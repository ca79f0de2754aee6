"""The Posts service: a Thrift ``service Posts`` whose every call is authorized by an access token.

Each method takes the caller's RFC 9068 access token as its first argument;
the library's token guard (:mod:`auth_rpc.verify.guard`) verifies it with a
pluggable :class:`~auth_rpc.verify.principal.TokenVerifier` (local key, JWKS,
RFC 7662 introspection or the Auth service over Thrift; see
:mod:`auth_rpc.verify.verifiers`), checks the scope the method needs
(``posts:read``, ``posts:write``, ``posts:admin``: :mod:`posts_rpc.guard`)
and hands the handler a principal. :mod:`posts_rpc.handler` validates every
field and enforces ownership; :mod:`posts_rpc.store` keeps the
posts durably in SQLite, or in PostgreSQL shared by replicas, behind a small
interface; :class:`PostsServer` puts them together on a hardened Thrift
listener, and ``posts-rpc serve`` (:mod:`posts_rpc.cli`) runs it from the command line.
"""

from __future__ import annotations

from auth_rpc.verify.guard import GuardedHandler, requires
from posts_rpc.guard import SCOPE_ADMIN, SCOPE_READ, SCOPE_WRITE
from posts_rpc.handler import PostsHandler
from posts_rpc.server import PostsServer
from posts_rpc.store import PostgresPostStore, PostRow, PostStore, SqlitePostStore

__all__ = [
    "SCOPE_ADMIN",
    "SCOPE_READ",
    "SCOPE_WRITE",
    "GuardedHandler",
    "PostRow",
    "PostStore",
    "PostgresPostStore",
    "PostsHandler",
    "PostsServer",
    "SqlitePostStore",
    "requires",
]
