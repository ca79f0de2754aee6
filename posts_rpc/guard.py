"""The scopes of ``service Posts``.

Every method of ``service Posts`` takes the caller's access token as its first
argument (``1: string token``) and is guarded by the library's token guard,
:mod:`auth_rpc.verify.guard` (:class:`~auth_rpc.verify.guard.GuardedHandler`,
:func:`~auth_rpc.verify.guard.requires`), which verifies the token, checks
the scope and maps errors for any Thrift service. What is about Posts is
here: the scope names, and which method needs which (see
:class:`posts_rpc.handler.PostsHandler`):

- ``posts:read`` for ``get_post`` and ``list_posts``;
- ``posts:write`` for ``create_post``;
- ``posts:write`` *or* ``posts:admin`` for ``update_post`` and
  ``delete_post``, where ``posts:write`` covers one's own posts and
  ``posts:admin`` alone suffices for any post.
"""

from __future__ import annotations

__all__ = ["SCOPE_ADMIN", "SCOPE_READ", "SCOPE_WRITE"]

SCOPE_READ = "posts:read"
SCOPE_WRITE = "posts:write"
SCOPE_ADMIN = "posts:admin"
