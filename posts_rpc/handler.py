"""The Thrift handler of ``service Posts``: validation, ownership, and the store.

Every method is guarded (:mod:`auth_rpc.verify.guard`, with the scopes of
:mod:`posts_rpc.guard`): the token is checked before anything else, and the
method receives the verified principal. Then, in this
order: the arguments are validated (``InvalidArgument`` naming the field),
the post is looked up (``NotFound``), ownership is checked
(``PermissionDenied``), and the store is called (``Unavailable`` if it fails).

NotFound before PermissionDenied: telling a non-owner that a post exists
leaks nothing, since any ``posts:read`` token can read every post.

Validation (a field a client left out arrives as ``None`` and is invalid):

- ``title``: after trimming white space at both ends (what is stored), 1..200
  characters, none of them a control character (C0, DEL, C1: a title is one
  line of text);
- ``body``: at most 65,536 bytes of UTF-8; may be empty; no NUL character
  (C clients and many tools treat NUL as the end of a string; other control
  characters, such as newlines and tabs, are allowed);
- ``post_id``: positive; ``before_id``: 0 (from the newest) or positive;
  ``limit``: 0 (meaning 20) to 100.

Ownership: the author of a post is its creator's token subject (``sub``).
``update_post`` and ``delete_post`` accept a token with ``posts:write`` for
one's own posts, and a token with ``posts:admin`` for any post (``posts:admin``
alone suffices; it need not also carry ``posts:write``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from auth_rpc.errors import Forbidden, InvalidInput, NotFoundError
from auth_rpc.idl import posts_thrift
from auth_rpc.serving.rpc import Preencoded
from auth_rpc.verify.guard import GuardedHandler, requires
from auth_rpc.verify.principal import Principal, TokenVerifier
from posts_rpc.guard import SCOPE_ADMIN, SCOPE_READ, SCOPE_WRITE
from posts_rpc.store import PostRow, PostStore

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_BODY_BYTES",
    "MAX_PAGE_SIZE",
    "MAX_TITLE_CHARS",
    "PostsHandler",
]

MAX_TITLE_CHARS = 200
MAX_BODY_BYTES = 65_536
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
_MAX_I64 = 2**63 - 1

_LIMIT_RULE = f"must be 0 (meaning {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_Post = posts_thrift.Post
_PostPage = posts_thrift.PostPage


def _page_builder(limit: int) -> Callable[[list[PostRow]], Any]:
    """Makes the PostPage from up to ``limit + 1`` rows (the store may reuse it: never mutated)."""
    return _BUILDERS[limit]


def _make_builder(limit: int) -> Callable[[list[PostRow]], Any]:
    def build(rows: list[PostRow]) -> Any:
        if len(rows) > limit:
            del rows[limit:]
            next_before_id = rows[-1].id
        else:
            next_before_id = 0
        page = _PostPage(posts=[_Post(*row) for row in rows], next_before_id=next_before_id)
        # The page may be served many times from the store's cache: encode it once.
        return Preencoded(posts_thrift.Posts, "list_posts", page)

    return build


_BUILDERS = {limit: _make_builder(limit) for limit in range(1, MAX_PAGE_SIZE + 1)}


class PostsHandler(GuardedHandler, service=posts_thrift.Posts):
    """Implements ``service Posts`` over a :class:`~posts_rpc.store.PostStore`.

    Raises (as IDL exceptions, through the guard) ``Unauthenticated``,
    ``PermissionDenied``, ``InvalidArgument``, ``NotFound`` and ``Unavailable``
    as the IDL declares for each method.
    """

    def __init__(self, store: PostStore, verifier: TokenVerifier) -> None:
        super().__init__(verifier)
        self.store = store

    @requires(SCOPE_WRITE)
    def create_post(self, principal: Principal, title: Any, body: Any) -> Any:
        row = self.store.create(
            author=principal.subject, title=_title(title), body=_body(body)
        )
        return _to_post(row)

    @requires(SCOPE_READ)
    def get_post(self, principal: Principal, post_id: Any) -> Any:
        row = self.store.get(_post_id(post_id))
        if row is None:
            raise NotFoundError("no such post")
        return _to_post(row)

    @requires(SCOPE_READ)
    def list_posts(self, principal: Principal, limit: Any, before_id: Any) -> Any:
        if limit.__class__ is not int or not 0 <= limit <= MAX_PAGE_SIZE:
            raise InvalidInput("limit", _LIMIT_RULE)
        if before_id.__class__ is not int or not 0 <= before_id <= _MAX_I64:
            raise InvalidInput("before_id", "must be 0 (from the newest) or a post id")
        limit = limit or DEFAULT_PAGE_SIZE
        # One more than asked: whether a next page exists is then known exactly.
        return self.store.list_page_view(limit + 1, before_id, _page_builder(limit))

    @requires(SCOPE_WRITE, SCOPE_ADMIN)
    def update_post(self, principal: Principal, post_id: Any, title: Any, body: Any) -> Any:
        post_id = _post_id(post_id)
        title = _title(title)
        body = _body(body)
        self._check_owner(principal, post_id)
        row = self.store.update(post_id, title=title, body=body)
        if row is None:  # deleted meanwhile
            raise NotFoundError("no such post")
        return _to_post(row)

    @requires(SCOPE_WRITE, SCOPE_ADMIN)
    def delete_post(self, principal: Principal, post_id: Any) -> None:
        post_id = _post_id(post_id)
        self._check_owner(principal, post_id)
        if not self.store.delete(post_id):  # deleted meanwhile
            raise NotFoundError("no such post")

    def _check_owner(self, principal: Principal, post_id: int) -> None:
        """Raise ``NotFoundError`` or ``Forbidden`` unless ``principal`` may change the post."""
        row = self.store.get(post_id)
        if row is None:
            raise NotFoundError("no such post")
        if row.author == principal.subject:
            # The guard let the call in with posts:write or posts:admin;
            # either covers one's own posts.
            return
        if SCOPE_ADMIN not in principal.scopes:
            raise Forbidden("only the author or a posts:admin token may change this post")


def _to_post(row: PostRow) -> Any:
    # PostRow's fields are in the order of the IDL's Post struct.
    return _Post(*row)


def _post_id(value: Any) -> int:
    if value.__class__ is not int or not 0 < value <= _MAX_I64:
        raise InvalidInput("post_id", "must be a positive post id")
    return int(value)


def _title(value: Any) -> str:
    if value.__class__ is not str:
        raise InvalidInput("title", "is required")
    title = value.strip()
    if not title:
        raise InvalidInput("title", "must not be empty")
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidInput("title", f"must be at most {MAX_TITLE_CHARS} characters")
    if _CONTROL.search(title):
        raise InvalidInput("title", "must not contain control characters")
    if not _encodable(title):
        raise InvalidInput("title", "must be valid UTF-8")
    return title


def _body(value: Any) -> str:
    if value.__class__ is not str:
        raise InvalidInput("body", "is required")
    # A character is at most 4 bytes of UTF-8: short bodies need no encoding.
    if len(value) * 4 > MAX_BODY_BYTES:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates: not representable in UTF-8
            raise InvalidInput("body", "must be valid UTF-8") from None
        if size > MAX_BODY_BYTES:
            raise InvalidInput("body", f"must be at most {MAX_BODY_BYTES} bytes of UTF-8")
    elif not _encodable(value):
        raise InvalidInput("body", "must be valid UTF-8")
    if "\x00" in value:
        raise InvalidInput("body", "must not contain NUL characters")
    return value


def _encodable(value: str) -> bool:
    """Whether ``value`` is representable in UTF-8 (no lone surrogates)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
