"""What every configuration serves and how the bench mints its tokens.

Each server under test returns the same page: 20 posts with ~200-byte bodies,
newest first. Tokens follow RFC 9068 (``typ: at+jwt``) with the claims the
verifiers require.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

__all__ = [
    "AUDIENCE",
    "AUTHOR",
    "BODY_BYTES",
    "ISSUER",
    "PAGE_SIZE",
    "SCOPE",
    "mint",
    "post_dicts",
]

PAGE_SIZE = 20
BODY_BYTES = 200
AUTHOR = "bench-user"
ISSUER = "http://127.0.0.1/bench-issuer"
AUDIENCE = "posts"
SCOPE = "posts:read posts:write"
_T0_MS = 1_700_000_000_000


def post_dicts(count: int = PAGE_SIZE) -> list[dict[str, Any]]:
    """``count`` posts, newest (highest id) first, each body ``BODY_BYTES`` long."""
    posts = []
    for i in range(count, 0, -1):
        body = (f"Post {i}: " + "lorem ipsum dolor sit amet " * 10)[:BODY_BYTES]
        posts.append(
            {
                "id": i,
                "author": AUTHOR,
                "title": f"Benchmark post number {i}",
                "body": body,
                "created_at": _T0_MS + i,
                "updated_at": _T0_MS + i,
            }
        )
    return posts


def mint(
    key: Any,
    alg: str,
    *,
    kid: str = "",
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    subject: str = AUTHOR,
    scope: str = SCOPE,
    client_id: str = "bench",
    ttl_s: int = 3600,
    jti: str | None = None,
    now: float | None = None,
) -> str:
    """One RFC 9068 access token signed with ``key`` (a secret or a private key)."""
    iat = int(time.time() if now is None else now)
    headers: dict[str, Any] = {"typ": "at+jwt"}
    if kid:
        headers["kid"] = kid
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "exp": iat + ttl_s,
        "iat": iat,
        "nbf": iat,
        "jti": jti or uuid.uuid4().hex,
        "scope": scope,
        "client_id": client_id,
    }
    return jwt.encode(claims, key, algorithm=alg, headers=headers)
