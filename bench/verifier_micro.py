"""Microbenchmark: the cost of one token check per verifier mode, cold and cached.

Usage: ``python -m bench.verifier_micro [--window 1.0] [--rounds 3] [--no-pin]``

- ``local`` (HS256, EdDSA, RS256, ES256): keys and tokens made here, in process.
- ``jwks``, ``introspect``, ``thrift``: against a real ``auth-rpc serve`` started
  here as a separate process (EdDSA keys) on 127.0.0.1, with a registered
  client; the token is a client-credentials token from ``Auth.client_token``.
  ``jwks EdDSA`` checks the signature only (``status_list="off"``, as before
  Token Status Lists); ``jwks +status`` also reads the token's bit in its
  Status List (the default), fetched once and refreshed in the background.
  The local cases' tokens are made here, without a Status List entry.

"cold" is ``cache_ttl_s=0``: every call does the full check (signature, or one
round trip to the Auth service; the JWKS keys themselves stay cached). "cached"
is a cache hit (TTL 300 s). Each figure is the median over ``--rounds`` windows
of ``--window`` seconds of a closed loop in this one thread, after a warm-up,
with the spread (min..max) across rounds. By default the Auth service is pinned
to CPU 0 and this process to CPU 1 (as ``make bench`` pins, docs/benchmarks.md); ``--no-pin``
leaves both to the scheduler. Every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from auth_rpc.idl import auth_thrift
from auth_rpc.serving.transport import open_client, parse_hostport
from auth_rpc.verify.principal import TokenVerifier
from auth_rpc.verify.verifiers import (
    IntrospectionVerifier,
    JwksVerifier,
    LocalVerifier,
    ThriftVerifier,
)

ISS = "https://bench.issuer"
AUD = "posts"


def _pem(private_key: Any) -> bytes:
    data: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _local_cases() -> Iterator[tuple[str, Callable[[float], TokenVerifier], str]]:
    now = int(time.time())
    claims = {
        "iss": ISS, "sub": "alice", "aud": AUD, "iat": now, "exp": now + 900,
        "jti": "bench-1", "scope": "posts:read posts:write", "client_id": "bench",
    }
    headers = {"typ": "at+jwt", "kid": "k1"}
    secret = os.urandom(32)
    yield (
        "local HS256",
        lambda ttl: LocalVerifier(
            issuer=ISS, audience=AUD, hs256_secret=secret, cache_ttl_s=ttl, status_list="off"
        ),
        jwt.encode(claims, secret, algorithm="HS256", headers=headers),
    )
    keys: dict[str, Any] = {
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
    }
    for alg, key in keys.items():
        pem = _pem(key)
        yield (
            f"local {alg}",
            functools.partial(_local_pem, pem),
            jwt.encode(claims, key, algorithm=alg, headers=headers),
        )


def _local_pem(pem: bytes, ttl: float) -> TokenVerifier:
    return LocalVerifier(
        issuer=ISS, audience=AUD, public_key_pem=pem, cache_ttl_s=ttl, status_list="off"
    )


class AuthProcess:
    """``auth-rpc serve`` in a child process with one registered client."""

    def __init__(self, data_dir: Path, cpu: int | None) -> None:
        exe = [sys.executable, "-m", "auth_rpc.auth.cli"]
        scope = "posts:read posts:write"
        out = subprocess.run(
            [*exe, "add-client", "bench", "--data-dir", str(data_dir), "--scope", scope,
             "--introspect"],
            check=True, capture_output=True, text=True,
        ).stdout
        self.client_secret = out.strip().splitlines()[-1]
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.proc = subprocess.Popen(
            [*pin, *exe, "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
             "--port", "0", "--http-port", "0", "--audience", AUD, "--log-level", "WARNING"],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("auth-rpc ready:"):
            self.stop()
            raise RuntimeError(f"auth-rpc did not start: {line!r}")
        fields = dict(part.split("=", 1) for part in line.split()[2:])
        self.thrift = parse_hostport(fields["thrift"])
        self.http = fields["http"]
        self.issuer = fields["issuer"]

    def client_token(self) -> str:
        client = open_client(auth_thrift.Auth, *self.thrift)
        try:
            token: str = client.client_token("bench", self.client_secret, "").access_token
            return token
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _remote_cases(auth: AuthProcess) -> Iterator[tuple[str, Callable[[float], TokenVerifier], str]]:
    token = auth.client_token()
    yield (
        "jwks EdDSA",
        lambda ttl: JwksVerifier(
            jwks_url=f"{auth.http}/.well-known/jwks.json", issuer=auth.issuer, audience=AUD,
            cache_ttl_s=ttl, status_list="off",
        ),
        token,
    )
    yield (
        "jwks +status",
        lambda ttl: JwksVerifier(
            jwks_url=f"{auth.http}/.well-known/jwks.json", issuer=auth.issuer, audience=AUD,
            cache_ttl_s=ttl,
        ),
        token,
    )
    yield (
        "introspect",
        lambda ttl: IntrospectionVerifier(
            introspect_url=f"{auth.http}/introspect", client_id="bench",
            client_secret=auth.client_secret, issuer=auth.issuer, audience=AUD, cache_ttl_s=ttl,
        ),
        token,
    )
    host, port = auth.thrift
    yield (
        "thrift",
        lambda ttl: ThriftVerifier(
            host=host, port=port, issuer=auth.issuer, audience=AUD, cache_ttl_s=ttl
        ),
        token,
    )


def _per_call_us(verify: Callable[[str], Any], token: str, window_s: float) -> float:
    calls = 0
    first = time.perf_counter()
    verify(token)
    batch = max(1, min(200, int(0.005 / max(time.perf_counter() - first, 1e-9))))
    start = time.perf_counter()
    deadline = start + window_s
    while True:
        for _ in range(batch):
            verify(token)
        calls += batch
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=1.0, help="seconds per window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    args = parser.parse_args(argv)
    pin = not args.no_pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    print(
        f"# verifier microbenchmark: {args.rounds} rounds x {args.window:.1f}s windows; "
        + ("auth-rpc pinned to CPU 0, this process to CPU 1" if pin else "unpinned")
    )
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        auth = AuthProcess(Path(tmp), 0 if pin else None)
        stack.callback(auth.stop)
        cases = [*_local_cases(), *_remote_cases(auth)]
        verifiers: dict[tuple[str, str], TokenVerifier] = {}
        for name, build, token in cases:
            for kind, ttl in (("cold", 0.0), ("cached", 300.0)):
                v = build(ttl)
                stack.callback(v.close)
                v.verify(token)  # warm up: connections, keys, cache entry
                warm_until = time.perf_counter() + 0.2
                while time.perf_counter() < warm_until:
                    v.verify(token)
                verifiers[(name, kind)] = v
        results: dict[tuple[str, str], list[float]] = {key: [] for key in verifiers}
        # Reference points measured in the same rounds (the machine's speed right now).
        ref_secret = os.urandom(32)
        ref_token = jwt.encode({"sub": "a"}, ref_secret, algorithm="HS256")
        ref_dict = {ref_token: 1}
        refs: dict[str, tuple[Callable[[str], Any], list[float]]] = {
            "ref: PyJWT decode HS256": (
                lambda t: jwt.decode(t, ref_secret, algorithms=["HS256"]), []
            ),
            "ref: dict.get": (ref_dict.get, []),
        }
        for _ in range(args.rounds):
            for _name, (fn, xs) in refs.items():
                xs.append(_per_call_us(fn, ref_token, args.window))
            for name, _build, token in cases:
                for kind in ("cold", "cached"):
                    v = verifiers[(name, kind)]
                    results[(name, kind)].append(_per_call_us(v.verify, token, args.window))
        print(f"{'mode':<14} {'cold us/check':>22} {'cached us/check':>22}")
        for name, _build, _token in cases:
            cells = []
            for kind in ("cold", "cached"):
                xs = results[(name, kind)]
                cells.append(f"{statistics.median(xs):9.2f} ({min(xs):.2f}..{max(xs):.2f})")
            print(f"{name:<14} {cells[0]:>22} {cells[1]:>22}")
        for name, (_fn, xs) in refs.items():
            print(f"{name:<24} {statistics.median(xs):9.2f} ({min(xs):.2f}..{max(xs):.2f})")
        print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
