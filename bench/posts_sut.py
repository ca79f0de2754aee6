"""The Posts service as the bench runs it: ``python -m bench.posts_sut``.

The same composition as ``posts-rpc serve`` (a :class:`PostsServer` with the
verifier :func:`auth_rpc.verify.verifiers.make_verifier` builds from the same
settings), plus what only a benchmark may do:

- ``--verify off``: the token check switched off, through the server's
  bench-only constructor argument (the real command line has no such flag);
- the store is a fresh SQLite file in a temporary directory, seeded with the
  20 posts every configuration returns (``bench.data``), removed at exit;
- ``--fill-cache N``: before serving, verify N distinct HS256 tokens through
  the server's own verifier, so that its cache holds N entries, and report the
  process's RSS before and after on the ready line.

Prints ``bench-ready port=P [cached=N baseline_rss_mb=X rss_mb=Y fill_s=S]``;
stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from auth_rpc.errors import TokenRejected
from auth_rpc.serving.runner import run_until_signal
from auth_rpc.verify.principal import Principal, TokenVerifier
from auth_rpc.verify.verifiers import JwksVerifier, make_verifier
from bench.data import AUTHOR, PAGE_SIZE, SCOPE, post_dicts
from bench.procs import rss_mb
from posts_rpc.server import PostsServer

__all__ = ["main", "seed"]


def seed(store: Any) -> None:
    """Add the 20 posts every configuration serves to an empty ``PostStore``."""
    for post in reversed(post_dicts(PAGE_SIZE)):  # oldest first: ids ascend
        store.create(author=post["author"], title=post["title"], body=post["body"])


class PyJwtDecodeOnly:
    """Bench only: PyJWT's ``jwt.decode`` alone (signature, exp, iss, aud), no cache.

    The reference the cold local rows are compared with in the same run: the
    same service, the same tokens, with the check replaced by a bare decode.
    """

    def __init__(self, key: Any, alg: str, issuer: str, audience: str) -> None:
        self._key, self._algs, self._iss, self._aud = key, [alg], issuer, audience

    def verify(self, token: str) -> Principal:
        import jwt

        try:
            claims = jwt.decode(token, self._key, algorithms=self._algs,
                                audience=self._aud, issuer=self._iss)
        except jwt.PyJWTError:
            raise TokenRejected("invalid token") from None
        return Principal(subject=claims["sub"], scopes=frozenset(claims["scope"].split()),
                         expires_at=int(claims["exp"]), token_id=claims["jti"],
                         client_id=claims.get("client_id", ""), issuer=self._iss,
                         audience=(self._aud,))

    def close(self) -> None:
        pass


def _verifier(args: argparse.Namespace) -> TokenVerifier | None:
    if args.verify == "off":
        return None
    if args.verify == "pyjwt":
        if args.public_key:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            return PyJwtDecodeOnly(load_pem_public_key(args.public_key.read_bytes()), "EdDSA",
                                   args.issuer, args.audience)
        secret = args.hs256_secret_file.read_bytes().rstrip(b"\r\n")
        return PyJwtDecodeOnly(secret, "HS256", args.issuer, args.audience)
    settings: dict[str, Any] = {
        "issuer": args.issuer,
        "audience": args.audience,
        "cache_ttl_s": args.cache_ttl,
    }
    if args.cache_size:
        settings["cache_size"] = args.cache_size
    if args.verify == "local":
        # The bench mints these tokens itself, without a Token Status List entry.
        settings["status_list"] = "off"
        if args.public_key:
            settings["public_key_file"] = args.public_key
        else:
            settings["hs256_secret_file"] = args.hs256_secret_file
    elif args.verify == "jwks":
        settings["jwks_url"] = args.jwks_url
        # The bench mints these tokens itself (with the Auth service's key), without a
        # Token Status List entry: with the default ("required") every call was refused.
        # The "jwks +status" row passes --status-list required, with a token the Auth
        # service issued (it carries its entry), to measure the bit read per call.
        settings["status_list"] = args.status_list
    elif args.verify == "introspect":
        settings["introspect_url"] = args.introspect_url
        settings["client_id"] = args.client_id
        settings["client_secret_file"] = args.client_secret_file
    else:
        settings["auth_addr"] = args.auth_addr
    verifier = make_verifier(args.verify, **settings)
    if isinstance(verifier, JwksVerifier):
        verifier.prefetch()
    return verifier


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _fill_cache(verifier: TokenVerifier, secret: bytes, args: argparse.Namespace) -> float:
    """Verify ``args.fill_cache`` distinct HS256 tokens (or as many as fit before
    ``args.fill_deadline``); returns the seconds it took.

    Tokens are made one at a time (a minimal HS256 JWS, the same claims as
    ``bench.data.mint``) and dropped after verification: what stays in memory
    is what the verifier keeps.
    """
    header = _b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": "bench-hs"}).encode())
    now = int(time.time())
    started = time.monotonic()
    deadline = started + args.fill_deadline if args.fill_deadline else float("inf")
    for n in range(args.fill_cache):
        if n % 1000 == 0 and time.monotonic() > deadline:
            break
        claims = {
            "iss": args.issuer, "sub": AUTHOR, "aud": args.audience, "exp": now + 3600,
            "iat": now, "nbf": now, "jti": f"fill-{n:08d}-{now}", "scope": SCOPE,
            "client_id": "bench",
        }
        signing_input = f"{header}.{_b64(json.dumps(claims).encode())}"
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        verifier.verify(f"{signing_input}.{_b64(signature)}")
    return time.monotonic() - started


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.posts_sut")
    parser.add_argument("--verify", required=True,
                        choices=("off", "local", "jwks", "introspect", "thrift", "pyjwt"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--issuer", default="urn:bench")
    parser.add_argument("--audience", default="posts")
    parser.add_argument("--cache-ttl", type=float, default=30.0)
    parser.add_argument("--cache-size", type=int, default=0, help="0: the verifier's default")
    parser.add_argument("--public-key", type=Path)
    parser.add_argument("--hs256-secret-file", type=Path)
    parser.add_argument("--jwks-url")
    parser.add_argument("--introspect-url")
    parser.add_argument("--client-id")
    parser.add_argument("--client-secret-file", type=Path)
    parser.add_argument("--auth-addr")
    parser.add_argument("--status-list", default="off",
                        choices=("required", "if-present", "off"),
                        help="jwks mode: read each token's Token Status List bit (default off)")
    parser.add_argument("--fill-cache", type=int, default=0, metavar="N")
    parser.add_argument("--fill-deadline", type=float, default=0.0, metavar="SECONDS",
                        help="stop filling after this long (0: no limit); cached= says how far")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="cProfile every connection thread; write merged stats at exit")
    return parser


def _install_profiler(out: Path) -> Callable[[], None]:
    """Profile each connection's thread (cProfile is per thread); returns the dumper.

    Wraps ``RpcServer._serve_connection`` in this process only: the serving
    layer, the codec, the guard, the verifier and the store all run inside it.
    """
    import cProfile
    import pstats
    import threading

    from auth_rpc.serving.rpc import RpcServer

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    original = RpcServer._serve_connection

    def profiled(self: RpcServer, conn: Any) -> None:
        profile = cProfile.Profile()
        profile.enable()
        try:
            original(self, conn)
        finally:
            profile.disable()
            with lock:
                profiles.append(profile)

    RpcServer._serve_connection = profiled  # type: ignore[method-assign]  # bench only

    def dump() -> None:
        with lock:
            if not profiles:
                return
            stats = pstats.Stats(profiles[0])
            for profile in profiles[1:]:
                stats.add(profile)
        stats.dump_stats(str(out))

    return dump


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.fill_cache:
        if args.verify != "local" or not args.hs256_secret_file:
            raise SystemExit("--fill-cache needs --verify local --hs256-secret-file")
        args.cache_size = max(args.cache_size, args.fill_cache)
        args.cache_ttl = max(args.cache_ttl, 3600.0)
    dump_profile = _install_profiler(args.profile) if args.profile else None
    data_dir = Path(tempfile.mkdtemp(prefix="bench-posts-"))
    verifier = _verifier(args)
    try:
        server = PostsServer(
            data_dir=data_dir, verifier=verifier, host=args.host, port=args.port,
            _unsafe_skip_auth_for_benchmarks=verifier is None,
        )
        seed(server.store)
        ready = f"bench-ready port={{port}} verify={args.verify}"
        if args.fill_cache:
            assert verifier is not None
            baseline = rss_mb(os.getpid())
            secret = args.hs256_secret_file.read_bytes().rstrip(b"\r\n")
            took = _fill_cache(verifier, secret, args)
            cached = len(getattr(verifier, "cache", ()))
            ready += (
                f" cached={cached} baseline_rss_mb={baseline:.1f} "
                f"rss_mb={rss_mb(os.getpid()):.1f} fill_s={took:.2f}"
            )
        server.start()
    except BaseException:
        if verifier is not None:
            verifier.close()
        shutil.rmtree(data_dir, ignore_errors=True)
        raise

    def stop() -> None:
        server.stop()
        if verifier is not None:
            verifier.close()
        if dump_profile is not None:
            dump_profile()

    try:
        return run_until_signal(ready.format(port=server.port), stop)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
