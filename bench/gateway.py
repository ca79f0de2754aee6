"""The peer: the HTTP architecture of a common tutorial, for comparison.

Two Flask apps, each served by waitress in its own process:

- ``auth``: ``POST /validate`` reads ``Authorization: Bearer <JWT>`` and
  decodes it with PyJWT (HS256, audience checked); 200 with the subject and
  scopes, or 401;
- ``gateway``: ``GET /posts?limit=N`` forwards the caller's ``Authorization``
  header to the auth app's ``/validate`` (one HTTP call per request, over a
  persistent ``requests.Session`` per waitress thread), then returns the same
  20 posts as JSON (``{"posts": [...], "next_before_id": 0}``).

Run as ``python -m bench.gateway auth --secret-file F`` or
``python -m bench.gateway gateway --auth-url URL``; each prints
``bench-ready port=P``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import jwt
import requests
import waitress
from flask import Flask, jsonify, request

from bench.data import AUDIENCE, PAGE_SIZE, post_dicts

__all__ = ["main", "make_auth_app", "make_gateway_app"]


def make_auth_app(secret: bytes, *, audience: str = AUDIENCE) -> Flask:
    """The tutorial's auth service: ``POST /validate`` decodes the bearer JWT."""
    app = Flask("bench-auth")

    @app.post("/validate")
    def validate() -> Any:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return jsonify(error="missing token"), 401
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"], audience=audience)
        except jwt.InvalidTokenError:
            return jsonify(error="invalid token"), 401
        return jsonify(sub=claims.get("sub"), scope=claims.get("scope", ""))

    return app


def make_gateway_app(auth_url: str) -> Flask:
    """The tutorial's gateway: validate through the auth service, then answer."""
    app = Flask("bench-gateway")
    posts = post_dicts(100)
    local = threading.local()
    validate_url = auth_url.rstrip("/") + "/validate"

    def session() -> requests.Session:
        current: requests.Session | None = getattr(local, "session", None)
        if current is None:
            current = local.session = requests.Session()
        return current

    @app.get("/posts")
    def list_posts() -> Any:
        reply = session().post(
            validate_url,
            headers={"Authorization": request.headers.get("Authorization", "")},
            timeout=5,
        )
        if reply.status_code != 200:
            return jsonify(error="unauthenticated"), 401
        limit = request.args.get("limit", default=PAGE_SIZE, type=int) or PAGE_SIZE
        if not 1 <= limit <= 100:
            return jsonify(error="limit out of range"), 400
        return jsonify(posts=posts[:limit], next_before_id=0)

    return app


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway")
    parser.add_argument("role", choices=("auth", "gateway"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--secret-file", type=Path, help="auth: the HS256 secret")
    parser.add_argument("--auth-url", help="gateway: base URL of the auth app")
    args = parser.parse_args(argv)
    if args.role == "auth":
        if args.secret_file is None:
            parser.error("auth needs --secret-file")
        app = make_auth_app(args.secret_file.read_bytes())
    else:
        if not args.auth_url:
            parser.error("gateway needs --auth-url")
        app = make_gateway_app(args.auth_url)
    server = waitress.create_server(  # type: ignore[attr-defined]  # missing from types-waitress
        app, host=args.host, port=args.port, threads=args.threads
    )
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"bench-ready port={server.effective_port}", flush=True)
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
