"""``python -m bench.run``: the benchmark behind ``make bench``.

What it does, in one run (loopback only, bounded in time, every process it
starts stopped at the end, also on Ctrl-C or an error):

- the server under test runs in its own process pinned to CPU 0; the client
  processes (one persistent connection each, closed loop of
  ``list_posts(limit=20)``) are pinned to CPU 1, and so are the helper services
  (the Auth service of the remote modes, the peer's auth app): the server's
  CPU figure is then the server's alone;
- every round runs every configuration once, in a fixed order, at 1 and then
  8 clients: a warm-up, then a measurement window; a last round runs
  unpinned, reported separately;
- per configuration and concurrency: calls/s, p50/p99 latency (recorded by the
  clients), server CPU per call (user+sys of the server over the window /
  calls), peak server RSS; medians over the rounds and the spread; ratios
  against the limit and against the check-off service taken within each round,
  then the median;
- the targets of issue 6 with MET / NOT MET, and the RSS of a server whose
  verifier cache holds 100,000 tokens;
- writes ``bench/out/results.json`` and ``bench/out/bench.png``.

Flags: ``--quick`` (one short round: a smoke test), ``--only CONFIG...``
(configuration ids or prefixes), ``--rounds``, ``--window``, ``--warmup``,
``--clients``, ``--no-unpinned``, ``--no-rss``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.data import AUDIENCE, ISSUER, mint
from bench.loadgen import ClientPool, Target, TokenSpec
from bench.procs import (
    ServerProcess,
    all_cpus,
    cpu_seconds,
    peak_rss_mb,
    set_affinity,
    stop_all,
)
from bench.stats import Measurement, Summary, measurement, summarize

__all__ = ["CONFIGS", "Config", "main"]

OUT_DIR = Path(__file__).resolve().parent / "out"
READY = "bench-ready"
PY = sys.executable

# -- configurations ------------------------------------------------------------


@dataclass
class Env:
    """What the configurations share in one run: keys, helper services, CPUs."""

    work: Path
    logs: Path
    server_cpus: set[int] | None
    client_cpus: set[int] | None
    window_s: float
    warmup_s: float
    hs256_secret: bytes = b""
    hs256_file: Path = Path()
    ed_private_pem: bytes = b""
    ed_public_file: Path = Path()
    peer_secret_file: Path = Path()
    auth: AuthInfo | None = None
    peer_auth_url: str = ""
    helpers: list[ServerProcess] = field(default_factory=list)
    fixed_tokens: dict[str, TokenSpec] = field(default_factory=dict)  # warm: one per config
    posts_workers: bool = False  # whether the Posts server takes --workers


@dataclass(frozen=True)
class AuthInfo:
    """The Auth service of the remote modes, as the bench uses it."""

    thrift_addr: str
    http_url: str
    issuer: str
    audience: str
    key_pem: bytes
    kid: str
    alg: str
    client_id: str
    client_secret_file: Path


@dataclass(frozen=True)
class Config:
    """One configuration of the server under test."""

    id: str
    label: str
    kind: str  # "thrift" or "http"
    family: str  # limit | off | local | remote | peer
    argv: Callable[[Env], list[str]]
    tokens: Callable[[Env, int, str], TokenSpec]
    warm: bool | None = None
    needs: str = ""  # "posts", "auth", "flask"
    rate_cap: int = 0  # most calls/s expected cold (sizes the token pool)
    unpinned: bool = True  # also in the unpinned round
    ready_prefix: str = "bench-ready"  # how the server's ready line starts


def _secret_file(env: Env, name: str, data: bytes) -> Path:
    path = env.work / name
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _hs256_claims() -> dict[str, Any]:
    return {"issuer": ISSUER, "audience": AUDIENCE}


def _warm_hs256(env: Env) -> TokenSpec:
    return TokenSpec(fixed=mint(env.hs256_secret, "HS256", kid="bench-hs"))


def _pool(cap: int, env: Env, n: int) -> int:
    """Tokens per client for a cold window: none reused within one server's life.

    ``cap`` is the most calls/s expected from 8 clients; one client, waiting
    for each reply, makes at most ~6,000 calls/s here.
    """
    rate = cap if n > 1 else min(cap, 6_000)
    return math.ceil(rate * (env.warmup_s + env.window_s + 0.2) / n * 1.1) + 16


def _tokens_hs256(warm: bool, cap: int) -> Callable[[Env, int, str], TokenSpec]:
    def spec(env: Env, n: int, tag: str) -> TokenSpec:
        if warm:
            return _warm_hs256(env)
        return TokenSpec(
            alg="HS256", key=env.hs256_secret, kid="bench-hs", claims=_hs256_claims(),
            count=_pool(cap, env, n), tag=tag,
        )
    return spec


def _tokens_eddsa(warm: bool, cap: int) -> Callable[[Env, int, str], TokenSpec]:
    def spec(env: Env, n: int, tag: str) -> TokenSpec:
        if warm:
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            key = load_pem_private_key(env.ed_private_pem, None)
            return TokenSpec(fixed=mint(key, "EdDSA", kid="bench-ed"))
        return TokenSpec(
            alg="EdDSA", key=env.ed_private_pem, kid="bench-ed", claims=_hs256_claims(),
            count=_pool(cap, env, n), tag=tag,
        )
    return spec


def _tokens_auth(warm: bool, cap: int) -> Callable[[Env, int, str], TokenSpec]:
    def spec(env: Env, n: int, tag: str) -> TokenSpec:
        auth = env.auth
        assert auth is not None
        claims: dict[str, Any] = {"issuer": auth.issuer, "audience": auth.audience}
        if warm:
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            key: Any = auth.key_pem
            if auth.alg != "HS256":
                key = load_pem_private_key(auth.key_pem, None)
            return TokenSpec(fixed=mint(key, auth.alg, kid=auth.kid, **claims))
        return TokenSpec(
            alg=auth.alg, key=auth.key_pem, kid=auth.kid, claims=claims,
            count=_pool(cap, env, n), tag=tag,
        )
    return spec


def _tokens_issued(env: Env, n: int, tag: str) -> TokenSpec:
    """One access token the Auth service issued (client credentials over /token): it
    carries a Token Status List entry, as every token of a real deployment does."""
    import requests

    auth = env.auth
    assert auth is not None
    reply = requests.post(
        f"{auth.http_url}/token",
        data={"grant_type": "client_credentials", "scope": "posts:read"},
        auth=(auth.client_id, auth.client_secret_file.read_text().strip()),
        timeout=30,
    )
    reply.raise_for_status()
    return TokenSpec(fixed=str(reply.json()["access_token"]))


def _tokens_peer(env: Env, n: int, tag: str) -> TokenSpec:
    return TokenSpec(fixed=mint(env.peer_secret_file.read_bytes(), "HS256"))


def _posts_argv(*verify: str) -> Callable[[Env], list[str]]:
    def argv(env: Env) -> list[str]:
        return [PY, "-m", "bench.posts_sut", *verify]
    return argv


def _local_hs256(env: Env) -> list[str]:
    return [PY, "-m", "bench.posts_sut", "--verify", "local",
            "--hs256-secret-file", str(env.hs256_file), "--issuer", ISSUER, "--audience", AUDIENCE]


def _pyjwt_alone(alg: str) -> Callable[[Env], list[str]]:
    def argv(env: Env) -> list[str]:
        key = (["--hs256-secret-file", str(env.hs256_file)] if alg == "HS256"
               else ["--public-key", str(env.ed_public_file)])
        return [PY, "-m", "bench.posts_sut", "--verify", "pyjwt", *key,
                "--issuer", ISSUER, "--audience", AUDIENCE]
    return argv


def _local_eddsa(env: Env) -> list[str]:
    return [PY, "-m", "bench.posts_sut", "--verify", "local",
            "--public-key", str(env.ed_public_file), "--issuer", ISSUER, "--audience", AUDIENCE]


def _remote(mode: str) -> Callable[[Env], list[str]]:
    def argv(env: Env) -> list[str]:
        auth = env.auth
        assert auth is not None
        verify = mode.removesuffix("+status")
        base = [PY, "-m", "bench.posts_sut", "--verify", verify,
                "--issuer", auth.issuer, "--audience", auth.audience]
        if verify == "jwks":
            status = ["--status-list", "required"] if mode.endswith("+status") else []
            return [*base, "--jwks-url", f"{auth.http_url}/.well-known/jwks.json", *status]
        if mode == "introspect":
            return [*base, "--introspect-url", f"{auth.http_url}/introspect",
                    "--client-id", auth.client_id,
                    "--client-secret-file", str(auth.client_secret_file)]
        return [*base, "--auth-addr", auth.thrift_addr]
    return argv


def _posts_cli_workers(n: int) -> Callable[[Env], list[str]]:
    """``posts-rpc serve --workers n`` (the real command), local HS256, on a seeded store."""
    def argv(env: Env) -> list[str]:
        from bench.posts_sut import seed
        from posts_rpc.server import DB_FILE_NAME
        from posts_rpc.store import SqlitePostStore

        data_dir = env.work / f"posts-{n}w-{secrets.token_hex(4)}"
        data_dir.mkdir(mode=0o700)
        store = SqlitePostStore.open(data_dir / DB_FILE_NAME)
        try:
            seed(store)
        finally:
            store.close()
        return [PY, "-c", "import sys; from posts_rpc.cli import main; sys.exit(main())",
                "serve", "--data-dir", str(data_dir), "--port", "0", "--verify", "local",
                "--hs256-secret-file", str(env.hs256_file), "--issuer", ISSUER,
                "--status-list", "off",  # bench-made tokens, without a Status List entry
                "--audience", AUDIENCE, "--workers", str(n), "--log-level", "WARNING"]
    return argv


def _seeded_posts_dir(env: Env, name: str) -> Path:
    from bench.posts_sut import seed
    from posts_rpc.server import DB_FILE_NAME
    from posts_rpc.store import SqlitePostStore

    data_dir = env.work / f"{name}-{secrets.token_hex(4)}"
    data_dir.mkdir(mode=0o700)
    store = SqlitePostStore.open(data_dir / DB_FILE_NAME)
    try:
        seed(store)
    finally:
        store.close()
    return data_dir


def _posts_behind_haproxy(
    replicas: int, *, postgresql: bool = False, haproxy: bool = True
) -> Callable[[Env], list[str]]:
    """``replicas`` ``posts-rpc serve`` processes on one seeded data directory behind
    HAProxy (``bench.haproxied``: the repository's configuration); local HS256.
    ``postgresql``: on one seeded PostgreSQL instead (started by ``bench.haproxied``,
    its CPU counted with the server's); ``haproxy=False``: one replica, direct."""
    def argv(env: Env) -> list[str]:
        options = [*(["--postgresql"] if postgresql else []),
                   *([] if haproxy else ["--no-haproxy"])]
        store = [] if postgresql else [
            "--data-dir", str(_seeded_posts_dir(env, f"posts-haproxy-{replicas}r"))]
        return [PY, "-m", "bench.haproxied", "--replicas", str(replicas), *options, "--",
                *store, "--verify", "local",
                "--hs256-secret-file", str(env.hs256_file), "--issuer", ISSUER,
                "--status-list", "off", "--audience", AUDIENCE, "--log-level", "WARNING"]
    return argv


def _peer_argv(env: Env) -> list[str]:
    return [PY, "-m", "bench.gateway", "gateway", "--auth-url", env.peer_auth_url]


# Most calls/s expected cold at 8 clients (sizes the token pools): above what one
# CPU can do for each (an HS256 check ~36 us, EdDSA ~142 us, a remote round trip).
HS_CAP, ED_CAP, THRIFT_CAP, INTROSPECT_CAP = 14_000, 8_000, 4_000, 2_000

CONFIGS: list[Config] = [
    Config("limit", "limit: bare thriftpy2", "thrift", "limit",
           lambda env: [PY, "-m", "bench.bare"], _tokens_hs256(True, 0)),
    Config("off", "Posts, check off", "thrift", "off",
           _posts_argv("--verify", "off"), _tokens_hs256(True, 0), needs="posts"),
    Config("hs256-warm", "Posts local HS256 warm", "thrift", "local", _local_hs256,
           _tokens_hs256(True, 0), warm=True, needs="posts"),
    Config("hs256-cold", "Posts local HS256 cold", "thrift", "local", _local_hs256,
           _tokens_hs256(False, HS_CAP), warm=False, needs="posts", rate_cap=HS_CAP,
           unpinned=False),
    Config("pyjwt-hs256-cold", "Posts, PyJWT decode alone HS256", "thrift", "pyjwt",
           _pyjwt_alone("HS256"), _tokens_hs256(False, HS_CAP), warm=False, needs="posts",
           rate_cap=HS_CAP, unpinned=False),
    Config("eddsa-warm", "Posts local EdDSA warm", "thrift", "local", _local_eddsa,
           _tokens_eddsa(True, 0), warm=True, needs="posts"),
    Config("eddsa-cold", "Posts local EdDSA cold", "thrift", "local", _local_eddsa,
           _tokens_eddsa(False, ED_CAP), warm=False, needs="posts", rate_cap=ED_CAP,
           unpinned=False),
    Config("pyjwt-eddsa-cold", "Posts, PyJWT decode alone EdDSA", "thrift", "pyjwt",
           _pyjwt_alone("EdDSA"), _tokens_eddsa(False, ED_CAP), warm=False, needs="posts",
           rate_cap=ED_CAP, unpinned=False),
    Config("jwks-warm", "Posts jwks warm", "thrift", "remote", _remote("jwks"),
           _tokens_auth(True, 0), warm=True, needs="auth", unpinned=False),
    Config("jwks-status-warm", "Posts jwks warm +status", "thrift", "remote",
           _remote("jwks+status"), _tokens_issued, warm=True, needs="auth", unpinned=False),
    Config("jwks-cold", "Posts jwks cold", "thrift", "remote", _remote("jwks"),
           _tokens_auth(False, ED_CAP), warm=False, needs="auth", rate_cap=ED_CAP,
           unpinned=False),
    Config("introspect-warm", "Posts introspect warm", "thrift", "remote", _remote("introspect"),
           _tokens_auth(True, 0), warm=True, needs="auth", unpinned=False),
    Config("introspect-cold", "Posts introspect cold", "thrift", "remote",
           _remote("introspect"), _tokens_auth(False, INTROSPECT_CAP), warm=False, needs="auth",
           rate_cap=INTROSPECT_CAP, unpinned=False),
    Config("thrift-warm", "Posts thrift warm", "thrift", "remote", _remote("thrift"),
           _tokens_auth(True, 0), warm=True, needs="auth", unpinned=False),
    Config("thrift-cold", "Posts thrift cold", "thrift", "remote", _remote("thrift"),
           _tokens_auth(False, THRIFT_CAP), warm=False, needs="auth", rate_cap=THRIFT_CAP,
           unpinned=False),
    Config("peer", "peer: Flask gateway + /validate", "http", "peer", _peer_argv, _tokens_peer,
           needs="flask"),
]

# Measured only when the Posts server has --workers: 1 against 2 workers, both
# with the server and the clients on every CPU (pinning both workers to one CPU
# would measure nothing).
WORKER_CONFIGS: list[Config] = [
    Config("hs256-warm-1w", "posts-rpc --workers 1, HS256 warm", "thrift", "workers",
           _posts_cli_workers(1), _tokens_hs256(True, 0), warm=True, needs="workers",
           ready_prefix="posts-rpc ready"),
    Config("hs256-warm-2w", "posts-rpc --workers 2, HS256 warm", "thrift", "workers",
           _posts_cli_workers(2), _tokens_hs256(True, 0), warm=True, needs="workers",
           ready_prefix="posts-rpc ready"),
]


# 2 Posts replicas behind HAProxy against 1 behind it and against the direct
# connection (posts-rpc --workers 1), all on one SQLite data directory, server
# side and clients on every CPU: on two cores this measures HAProxy's overhead
# more than scaling (the replicas and HAProxy share the cores with the clients).
TOPOLOGY_CONFIGS: list[Config] = [
    Config("topo-direct", "posts-rpc, direct, HS256 warm", "thrift", "topology",
           _posts_cli_workers(1), _tokens_hs256(True, 0), warm=True, needs="haproxy",
           ready_prefix="posts-rpc ready"),
    Config("topo-haproxy-1r", "HAProxy + 1 posts-rpc, HS256 warm", "thrift", "topology",
           _posts_behind_haproxy(1), _tokens_hs256(True, 0), warm=True, needs="haproxy"),
    Config("topo-haproxy-2r", "HAProxy + 2 posts-rpc, HS256 warm", "thrift", "topology",
           _posts_behind_haproxy(2), _tokens_hs256(True, 0), warm=True, needs="haproxy"),
    # The same on PostgreSQL (one server started for each row, its CPU counted with
    # the server side's): direct, then 1 and 2 replicas behind HAProxy.
    Config("topo-pg-direct", "posts-rpc on PostgreSQL, direct, HS256 warm", "thrift",
           "topology", _posts_behind_haproxy(1, postgresql=True, haproxy=False),
           _tokens_hs256(True, 0), warm=True, needs="postgresql"),
    Config("topo-pg-haproxy-1r", "HAProxy + 1 posts-rpc on PostgreSQL, HS256 warm", "thrift",
           "topology", _posts_behind_haproxy(1, postgresql=True), _tokens_hs256(True, 0),
           warm=True, needs="haproxy+postgresql"),
    Config("topo-pg-haproxy-2r", "HAProxy + 2 posts-rpc on PostgreSQL, HS256 warm", "thrift",
           "topology", _posts_behind_haproxy(2, postgresql=True), _tokens_hs256(True, 0),
           warm=True, needs="haproxy+postgresql"),
]
#: Families measured with the server and the clients on every CPU, at the most clients only.
UNPINNED_FAMILIES = ("workers", "topology")


# -- helper services ---------------------------------------------------------------

_T0 = time.monotonic()


def _say(message: str) -> None:
    """A progress line on standard error, with the seconds since the start."""
    print(f"bench [{time.monotonic() - _T0:5.1f}s] {message}", file=sys.stderr, flush=True)



def _ready_fields(line: str) -> dict[str, str]:
    fields = {}
    for word in line.split():
        key, sep, value = word.partition("=")
        if sep:
            fields[key] = value
    return fields


def _port_of(ready_line: str) -> int:
    """The port a ready line names: ``port=P`` (bench servers) or ``thrift=HOST:PORT``."""
    fields = _ready_fields(ready_line)
    return int(fields["port"] if "port" in fields else fields["thrift"].rpartition(":")[2])


def _start(name: str, argv: list[str], cpus: set[int] | None, env: Env,
           prefix: str = READY) -> ServerProcess:
    return ServerProcess(
        name, argv, cpus=cpus, log_path=env.logs / f"{name}.log", ready_prefix=prefix
    ).start()


def _auth_cli() -> list[str]:
    return [PY, "-c", "import sys; from auth_rpc.auth.cli import main; sys.exit(main())"]


def _ensure_auth(env: Env) -> AuthInfo:
    """Start the Auth service (EdDSA) on the clients' CPU, once per run."""
    if env.auth is not None:
        return env.auth
    from bench.authkey import signing_key

    data_dir = env.work / "auth-data"
    client_id = "bench-posts"
    out = subprocess.run(
        [*_auth_cli(), "add-client", client_id, "--data-dir", str(data_dir),
         "--scope", "posts:read", "--introspect"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    secret_file = _secret_file(env, "introspect-secret", out.strip().splitlines()[-1].encode())
    proc = _start(
        "auth",
        [*_auth_cli(), "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
         "--port", "0", "--http-port", "0", "--audience", AUDIENCE, "--log-level", "WARNING"],
        env.client_cpus, env, prefix="auth-rpc ready",
    )
    env.helpers.append(proc)
    fields = _ready_fields(proc.ready_line)
    pem, kid, alg = signing_key(data_dir)
    env.auth = AuthInfo(
        thrift_addr=fields["thrift"], http_url=fields["http"], issuer=fields["issuer"],
        audience=fields.get("audience", AUDIENCE), key_pem=pem, kid=kid, alg=alg,
        client_id=client_id, client_secret_file=secret_file,
    )
    return env.auth


def _ensure_peer_auth(env: Env) -> None:
    if env.peer_auth_url:
        return
    proc = _start(
        "peer-auth",
        [PY, "-m", "bench.gateway", "auth", "--secret-file", str(env.peer_secret_file)],
        env.client_cpus, env,
    )
    env.helpers.append(proc)
    env.peer_auth_url = f"http://127.0.0.1:{_ready_fields(proc.ready_line)['port']}"


# -- measuring -----------------------------------------------------------------------


def _busy_s() -> dict[str, float]:
    """Busy CPU seconds since boot, of the machine (``"all"``) and of each CPU (``/proc/stat``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *parts = line.split()
            ticks = [int(v) for v in parts[:8]]
            idle = ticks[3] + ticks[4]  # idle, iowait
            out["all" if name == "cpu" else name[3:]] = (sum(ticks) - idle) / tick
    return out


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def measure_phase(
    pool: ClientPool, server: ServerProcess, target: Target, tokens: TokenSpec, n: int,
    *, warmup_s: float, window_s: float, helper_pids: Sequence[int] = (),
    client_cpus: set[int] | None = None,
) -> Measurement:
    """One window: ``n`` clients against ``server``; raises ``RuntimeError`` on failure."""
    pool.prepare(n, target, tokens)
    t0 = time.monotonic() + 0.05
    t_measure = t0 + warmup_s
    t_end = t_measure + window_s
    pool.go(n, t0, t_measure, t_end)
    others = [*pool.pids[:n], *helper_pids, os.getpid()]
    _sleep_until(t_measure)
    cpu0 = cpu_seconds(server.pid)
    mine0 = sum(cpu_seconds(p, descendants=False) for p in others)
    busy0 = _busy_s()
    _sleep_until(t_end)
    cpu1 = cpu_seconds(server.pid)
    mine1 = sum(cpu_seconds(p, descendants=False) for p in others)
    busy1 = _busy_s()
    results = pool.results()
    server_cpu = cpu1 - cpu0
    return measurement(
        results,
        window_s=window_s,
        server_cpu_s=server_cpu,
        client_cpu_s=mine1 - mine0,
        other_cpu_s=(busy1["all"] - busy0["all"]) - server_cpu - (mine1 - mine0),
        client_cpus_busy_s=(
            sum(busy1[str(c)] - busy0[str(c)] for c in client_cpus) / len(client_cpus)
            if client_cpus else float("nan")
        ),
        peak_rss_mb=peak_rss_mb(server.pid),
    )


@dataclass
class Run:
    """Everything measured: ``samples[round_kind][config_id][clients]`` -> one per round."""

    samples: dict[str, dict[str, dict[int, list[Measurement]]]] = field(default_factory=dict)
    ratios: dict[str, dict[str, dict[int, dict[str, list[float]]]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    #: Parts left out because the machine was too slow for the budget: reported, not a failure.
    skipped: list[str] = field(default_factory=list)
    #: /proc/loadavg's 1-minute figure when the run started (other load on the machine).
    load_at_start: float | None = None
    failed: dict[str, dict[str, dict[int, str]]] = field(default_factory=dict)
    rss_100k: dict[str, Any] = field(default_factory=dict)

    def add(self, kind: str, config: str, clients: int, m: Measurement) -> None:
        self.samples.setdefault(kind, {}).setdefault(config, {}).setdefault(clients, []).append(m)


def _tokens_for(env: Env, config: Config, n: int, tag: str) -> TokenSpec:
    """The clients' tokens: one token per configuration for the whole run, or a pool."""
    if config.rate_cap:
        return config.tokens(env, n, tag)
    if config.id not in env.fixed_tokens:
        env.fixed_tokens[config.id] = config.tokens(env, n, tag)
    return env.fixed_tokens[config.id]


def _launch_round(
    kind: str, configs: Sequence[Config], env: Env, run: Run, round_no: int
) -> dict[str, ServerProcess]:
    """Start every server of the round at once, unpinned; pin each once it is ready.

    Starting them in parallel (imports, SQLite seeding) saves most of a second
    per configuration; an idle server blocks in ``accept`` and costs nothing
    while another is measured.
    """
    launched: dict[str, ServerProcess] = {}
    for config in configs:
        label = f"{kind} round {round_no}: {config.id}"
        try:
            if config.needs == "auth":
                _ensure_auth(env)
            if config.family == "peer":
                _ensure_peer_auth(env)
            cpus = None if config.family in UNPINNED_FAMILIES else env.server_cpus
            launched[config.id] = ServerProcess(
                config.id, config.argv(env), cpus=cpus,
                log_path=env.logs / f"{config.id}.log", ready_prefix=config.ready_prefix,
            ).launch()
        except Exception as exc:
            run.failures.append(f"{label}: could not start: {exc}")
            _say(f"{label}: could not start: {exc}")
    ready: dict[str, ServerProcess] = {}
    for config_id, server in launched.items():
        try:
            ready[config_id] = server.wait_ready()
        except Exception as exc:
            run.failures.append(f"{kind} round {round_no}: {config_id}: could not start: {exc}")
            _say(f"{config_id}: could not start: {exc}")
    return ready


def _round(
    kind: str, configs: Sequence[Config], env: Env, pool: ClientPool, run: Run,
    clients: Sequence[int], round_no: int,
) -> None:
    """Every configuration once, in order; ratios against limit/off within this round."""
    configs = [c for c in configs if kind != "unpinned" or c.unpinned]
    this: dict[str, dict[int, Measurement]] = {}
    servers = _launch_round(kind, configs, env, run, round_no)
    try:
        for config in configs:
            server = servers.get(config.id)
            if server is None:
                continue
            label = f"{kind} round {round_no}: {config.id}"
            _say(label)
            port = _port_of(server.ready_line)
            target = (
                Target("http", url=f"http://127.0.0.1:{port}/posts")
                if config.kind == "http" else Target("thrift", port=port)
            )
            for n in clients:
                if config.family in UNPINNED_FAMILIES and n != max(clients):
                    continue
                tag = f"{config.id}-{kind}-c{n}"
                try:
                    m = measure_phase(
                        pool, server, target, _tokens_for(env, config, n, tag), n,
                        warmup_s=env.warmup_s, window_s=env.window_s,
                        helper_pids=[h.pid for h in env.helpers],
                        client_cpus=(
                            None if config.family in UNPINNED_FAMILIES else env.client_cpus
                        ),
                    )
                except Exception as exc:
                    run.failures.append(f"{label} at {n} clients: {exc}")
                    run.failed.setdefault(kind, {}).setdefault(config.id, {})[n] = str(exc)
                    _say(f"{label} at {n} clients failed: {exc}")
                    continue
                run.add(kind, config.id, n, m)
                this.setdefault(config.id, {})[n] = m
                _say(
                    f"  {n} clients: {m.calls_per_s:,.0f} calls/s, "
                    f"p99 {m.p99_us:,.0f} us, {m.server_cpu_us_per_call:.0f} us CPU/call"
                )
            # Reaped below; its shutdown (joins, mostly sleeping) overlaps the
            # next configuration's connection set-up, not a measurement window.
            server.begin_stop()
    finally:
        stop_all(list(servers.values()))
    for config_id, by_n in this.items():
        for n, m in by_n.items():
            for ref in ("limit", "off", "peer", "hs256-warm-1w", "topo-direct", "topo-haproxy-1r",
                        "topo-pg-direct", "topo-pg-haproxy-1r"):
                base = this.get(ref, {}).get(n)
                if base is not None and base.calls_per_s > 0:
                    by_config = run.ratios.setdefault(kind, {}).setdefault(config_id, {})
                    entry = by_config.setdefault(n, {})
                    entry.setdefault(f"x_{ref}", []).append(m.calls_per_s / base.calls_per_s)
                    if base.p99_us > 0:
                        entry.setdefault(f"p99_x_{ref}", []).append(m.p99_us / base.p99_us)
                    if m.server_cpu_us_per_call > 0:
                        # Capacity by CPU: calls per server CPU second, relative.
                        entry.setdefault(f"cpu_x_{ref}", []).append(
                            base.server_cpu_us_per_call / m.server_cpu_us_per_call
                        )


def measure_rss_100k(env: Env, count: int, deadline_s: float) -> dict[str, Any]:
    """RSS of a Posts server (local HS256) whose verifier cache holds ``count`` tokens.

    The filling stops after ``deadline_s`` (on a loaded machine); then the
    result says how many were cached and extrapolates linearly.
    """
    argv = [*_local_hs256(env), "--fill-cache", str(count),
            "--fill-deadline", f"{deadline_s:.0f}"]
    server = ServerProcess(
        "rss-100k", argv, cpus=env.server_cpus, log_path=env.logs / "rss-100k.log",
        ready_prefix=READY, ready_timeout_s=deadline_s + 60.0,
    ).start()
    try:
        fields = _ready_fields(server.ready_line)
        cached = int(fields.get("cached", "0"))
        baseline = float(fields.get("baseline_rss_mb", "0"))
        rss = float(fields.get("rss_mb", "0"))
        result: dict[str, Any] = {
            "tokens": count,
            "cached": cached,
            "baseline_rss_mb": baseline,
            "rss_mb": rss,
            "peak_rss_mb": peak_rss_mb(server.pid),
            "fill_s": float(fields.get("fill_s", "0")),
        }
        if 0 < cached < count:
            result["extrapolated_rss_mb"] = baseline + (rss - baseline) * count / cached
        return result
    finally:
        server.stop()


# -- reporting -------------------------------------------------------------------------


def _load_1min() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0%}"


def _fmt_ratio(values: Sequence[float] | None) -> str:
    return f"{_median(values):.2f}" if values else "-"


def table(run: Run, kind: str, configs: Sequence[Config]) -> tuple[str, dict[str, Any]]:
    """The table of one round kind, and the same figures as data."""
    header = (
        f"{'configuration':<42} {'cl':>2} {'calls/s':>8} {'spread':>7} {'p50 us':>8} "
        f"{'p99 us':>8} {'CPU us/call':>11} {'srv busy':>8} {'cli busy':>8} {'RSS MB':>7} "
        f"{'x limit':>7} "
        f"{'x off':>6}"
    )
    lines = [header, "-" * len(header)]
    data: dict[str, Any] = {}
    by_id = {c.id: c for c in configs}
    samples = run.samples.get(kind, {})
    failed = run.failed.get(kind, {})
    order = [c.id for c in configs if c.id in samples or c.id in failed]
    for config_id in order:
        by_n = samples.get(config_id, {})
        config = by_id.get(config_id)
        label = config.label if config else config_id
        for n in sorted({*by_n, *failed.get(config_id, {})}):
            if n not in by_n:
                reason = failed[config_id][n]
                lines.append(f"{label:<42} {n:>2} FAILED in every round: {reason[:120]}")
                data.setdefault(config_id, {})[str(n)] = {"label": label, "failed": reason}
                continue
            s: Summary = summarize(by_n[n])
            ratios = run.ratios.get(kind, {}).get(config_id, {}).get(n, {})
            flags = ""
            if s.errors:
                flags += f" ({s.errors} errors)"
            if s.pool_wrapped:
                flags += " (token pool wrapped: some hits)"
            lines.append(
                f"{label:<42} {n:>2} {s.calls_per_s:>8,.0f} {s.spread:>6.0%} {s.p50_us:>8,.0f} "
                f"{s.p99_us:>8,.0f} {s.server_cpu_us_per_call:>11,.1f} "
                f"{s.server_cpu_share:>8.0%} {_pct(s.client_cpus_busy):>8} {s.peak_rss_mb:>7.1f} "
                f"{_fmt_ratio(ratios.get('x_limit')):>7} {_fmt_ratio(ratios.get('x_off')):>6}"
                f"{flags}"
            )
            data.setdefault(config_id, {})[str(n)] = {
                **s.as_dict(),
                "label": label,
                "ratios": {k: _median(v) for k, v in ratios.items()},
                "samples": [m.as_dict() for m in by_n[n]],
            }
    return "\n".join(lines), data


def check_costs(run: Run, clients: int) -> list[str]:
    """Per Posts configuration: its server CPU per call over the check-off service's."""
    pinned = run.samples.get("pinned", {})
    off = pinned.get("off", {}).get(clients)
    if not off:
        return []
    base = summarize(off).server_cpu_us_per_call
    lines = [f"  {'check-off service':<28} {base:8.1f} us per call"]
    for config in CONFIGS:
        samples = pinned.get(config.id, {}).get(clients)
        if config.family not in ("local", "remote", "pyjwt") or not samples:
            continue
        cpu = summarize(samples).server_cpu_us_per_call
        lines.append(f"  {config.id:<28} {cpu - base:+8.1f} us per call")
    return lines


@dataclass(frozen=True)
class TargetResult:
    name: str
    measured: str
    met: bool | None  # None: not measured

    def line(self) -> str:
        verdict = "NOT MEASURED" if self.met is None else ("MET" if self.met else "NOT MET")
        return f"  {verdict:<12} {self.name}: {self.measured}"


def targets(run: Run, clients: int) -> list[TargetResult]:
    """Issue 6, item 2, at ``clients`` clients, from the pinned rounds."""
    ratios = run.ratios.get("pinned", {})

    def ratio(config_id: str, key: str) -> float | None:
        values = ratios.get(config_id, {}).get(clients, {}).get(key)
        return _median(values) if values else None

    pinned = run.samples.get("pinned", {})

    def clients_saturated(*config_ids: str) -> bool:
        for config_id in config_ids:
            samples = pinned.get(config_id, {}).get(clients)
            if samples and summarize(samples).client_cpus_busy >= 0.95:
                return True
        return False

    def with_cpu(config_id: str, ref: str, value: float) -> str:
        text = f"{value:.2f}x calls/s"
        by_cpu = ratio(config_id, f"cpu_x_{ref}")
        if by_cpu is not None:
            text += f", {by_cpu:.2f}x by server CPU per call"
        if clients_saturated(config_id, ref):
            text += " (the clients' CPU was saturated: trust the CPU figure)"
        return text

    out: list[TargetResult] = []
    warm = [c.id for c in CONFIGS if c.warm]
    for config_id in warm:
        value = ratio(config_id, "x_off")
        name = f"{config_id} >= 0.95 x check-off"
        if value is None:
            out.append(TargetResult(name, "not measured", None))
        else:
            out.append(TargetResult(name, with_cpu(config_id, "off", value), value >= 0.95))
    for config_id in warm:
        value = ratio(config_id, "p99_x_off")
        name = f"{config_id} p99 <= 1.5 x check-off p99"
        if value is None:
            out.append(TargetResult(name, "not measured", None))
        else:
            out.append(TargetResult(name, f"{value:.2f}x", value <= 1.5))
    for config_id in ("hs256-warm", "eddsa-warm"):
        value = ratio(config_id, "x_limit")
        out.append(
            TargetResult(
                f"{config_id} >= 0.70 x limit",
                "not measured" if value is None else with_cpu(config_id, "limit", value),
                None if value is None else value >= 0.70,
            )
        )
        value = ratio(config_id, "x_peer")
        out.append(
            TargetResult(
                f"{config_id} >= 10 x peer",
                "not measured" if value is None else f"{value:.1f}x",
                None if value is None else value >= 10.0,
            )
        )
    # Issue 12: reading the token's Token Status List bit on every warm jwks call costs
    # at most 2 us of server CPU per call (no round trip per call).
    a, b = pinned.get("jwks-status-warm", {}).get(clients), pinned.get("jwks-warm", {}).get(clients)
    name = "jwks-status-warm costs <= 2 us more server CPU per call than jwks-warm"
    if a and b:
        extra = summarize(a).server_cpu_us_per_call - summarize(b).server_cpu_us_per_call
        out.append(TargetResult(name, f"{extra:+.1f} us per call", extra <= 2.0))
    else:
        out.append(TargetResult(name, "not measured", None))
    # Issue 14: a cold check's cost (server CPU per call over the check-off service's)
    # against PyJWT's decode alone of the same kind of tokens, in the same rounds.
    off = pinned.get("off", {}).get(clients)
    for cold, ref, bound in (("hs256-cold", "pyjwt-hs256-cold", 1.5),
                             ("eddsa-cold", "pyjwt-eddsa-cold", 1.25),
                             ("jwks-cold", "pyjwt-eddsa-cold", 1.25)):
        name = f"{cold} cost <= {bound} x PyJWT decode alone ({ref})"
        a, b = pinned.get(cold, {}).get(clients), pinned.get(ref, {}).get(clients)
        if not (off and a and b):
            out.append(TargetResult(name, "not measured", None))
            continue
        base = summarize(off).server_cpu_us_per_call
        cost = summarize(a).server_cpu_us_per_call - base
        ref_cost = summarize(b).server_cpu_us_per_call - base
        if ref_cost <= 0:
            out.append(TargetResult(name, f"reference cost {ref_cost:+.1f} us: noise", None))
            continue
        out.append(TargetResult(
            name, f"{cost / ref_cost:.2f}x ({cost:+.1f} us against {ref_cost:+.1f} us per call)",
            cost <= bound * ref_cost))
    rss = run.rss_100k
    if rss and rss.get("cached", 0) < rss.get("tokens", 0):
        out.append(
            TargetResult(
                "RSS <= 100 MB with 100,000 tokens cached",
                f"only {rss.get('cached', 0):,} cached in {rss.get('fill_s', 0):.0f} s: "
                f"{rss.get('rss_mb', 0):.1f} MB; extrapolated to {rss.get('tokens', 0):,}: "
                f"{rss.get('extrapolated_rss_mb', 0):.1f} MB",
                None,
            )
        )
    elif rss:
        mb = max(rss.get("rss_mb", 0.0), rss.get("peak_rss_mb", 0.0))
        out.append(
            TargetResult(
                "RSS <= 100 MB with 100,000 tokens cached",
                f"{mb:.1f} MB (peak; {rss.get('cached', 0):,} cached, "
                f"{rss.get('baseline_rss_mb', 0):.1f} MB before filling)",
                mb <= 100.0 and rss.get("cached", 0) >= rss.get("tokens", 0),
            )
        )
    else:
        out.append(TargetResult("RSS <= 100 MB with 100,000 tokens cached", "not measured", None))
    return out


# -- main ---------------------------------------------------------------------------------


def _available(need: str) -> str:
    """Empty when a configuration's dependency is present, else why not."""
    if need == "posts" and importlib.util.find_spec("posts_rpc.server") is None:
        return "posts_rpc.server is not there yet"
    if need == "auth":
        for module in ("posts_rpc.server", "auth_rpc.auth.service"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not there yet"
    if need == "flask" and importlib.util.find_spec("flask") is None:
        return "flask is not installed (pip install -e '.[bench]')"
    if need == "workers":
        return "" if _posts_has_workers() else "the Posts server has no --workers option"
    if "postgresql" in need.split("+"):
        from auth_rpc.testing import find_postgresql_bindir

        if find_postgresql_bindir() is None:
            return "PostgreSQL is not installed (apt-get install postgresql)"
    if "haproxy" in need.split("+"):
        from auth_rpc.serving.haproxy import find_haproxy

        if find_haproxy() is None:
            return "HAProxy is not installed (apt-get install haproxy)"
        return "" if _posts_has_workers() else "the Posts server has no --workers option"
    return ""


def _posts_has_workers() -> bool:
    """Whether ``posts-rpc serve`` can pre-fork workers (``serving.runner.run_workers``)."""
    if importlib.util.find_spec("posts_rpc.cli") is None:
        return False
    import auth_rpc.serving.runner

    return hasattr(auth_rpc.serving.runner, "run_workers")


def _select(
    only: Sequence[str] | None, with_workers: bool, with_topology: bool = True
) -> list[Config]:
    configs = [*CONFIGS, *(WORKER_CONFIGS if with_workers else []),
               *(TOPOLOGY_CONFIGS if with_topology else [])]
    if not only:
        return configs
    chosen = [c for c in configs if any(c.id == o or c.id.startswith(o) for o in only)]
    unknown = [o for o in only if not any(c.id == o or c.id.startswith(o) for c in configs)]
    if unknown:
        raise SystemExit(
            f"bench: unknown configuration(s) {', '.join(unknown)}; "
            f"choose from {', '.join(c.id for c in configs)}"
        )
    return chosen


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    parser.add_argument("--only", nargs="+", metavar="CONFIG", help="configuration ids or prefixes")
    parser.add_argument("--rounds", type=int, default=3, help="pinned rounds (default 3)")
    parser.add_argument("--window", type=float, default=1.5, help="seconds measured (default 1.5)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="seconds of warm-up (default 0.5)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    parser.add_argument("--no-unpinned", action="store_true", help="skip the unpinned round")
    parser.add_argument("--no-rss", action="store_true", help="skip the 100,000-token RSS step")
    parser.add_argument("--no-workers", action="store_true", help="skip 1 vs 2 workers")
    parser.add_argument("--no-topology", action="store_true",
                        help="skip 2 Posts replicas behind HAProxy vs 1 vs direct")
    parser.add_argument("--rss-tokens", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where results go")
    parser.add_argument("--budget", type=float, default=285.0,
                        help="seconds; rounds that would end later are skipped (default 285)")
    return parser


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("thriftpy2", "PyJWT", "cryptography", "waitress", "flask", "requests"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _make_keys(env: Env) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    # Printable secrets: a secret file loses a trailing newline when read.
    env.hs256_secret = secrets.token_urlsafe(32).encode()
    env.hs256_file = _secret_file(env, "hs256-secret", env.hs256_secret)
    key = Ed25519PrivateKey.generate()
    env.ed_private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    env.ed_public_file = env.work / "ed25519-public.pem"
    env.ed_public_file.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    env.peer_secret_file = _secret_file(env, "peer-secret", secrets.token_urlsafe(32).encode())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.rounds, args.window, args.warmup = 1, 0.5, 0.2
        args.no_unpinned = args.no_rss = args.no_workers = args.no_topology = True
    global _T0
    started = _T0 = time.monotonic()
    cpus = sorted(all_cpus())
    pinned = len(cpus) >= 2
    server_cpus = {cpus[0]} if pinned else None
    client_cpus = {cpus[1]} if pinned else None
    configs = _select(args.only, with_workers=not args.no_workers,
                      with_topology=not args.no_topology)
    skipped: list[str] = []
    runnable = []
    for config in configs:
        why = _available(config.needs)
        if why:
            skipped.append(f"{config.id}: {why}")
        else:
            runnable.append(config)
    main_configs = [c for c in runnable if c.family not in UNPINNED_FAMILIES]
    worker_configs = [c for c in runnable if c.family == "workers"]
    topology_configs = [c for c in runnable if c.family == "topology"]

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    env = Env(
        work=work, logs=args.out / "logs", server_cpus=server_cpus, client_cpus=client_cpus,
        window_s=args.window, warmup_s=args.warmup,
    )
    shutil.rmtree(env.logs, ignore_errors=True)
    run = Run(load_at_start=_load_1min())
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C must stop the run even when started with SIGINT ignored (``cmd &``).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    env.logs.mkdir(parents=True, exist_ok=True)
    print(
        f"bench: {len(main_configs)} configurations x clients {args.clients}, "
        f"{args.rounds} pinned round(s) of {args.warmup:g} s warm-up + {args.window:g} s; "
        f"server on CPU {server_cpus or 'any'}, clients on CPU {client_cpus or 'any'}",
        file=sys.stderr,
    )
    interrupted = False
    try:
        _make_keys(env)
        with ClientPool(max(args.clients), cpus=client_cpus) as pool:
            round_s: float | None = None
            # Time kept for what follows the pinned rounds (RSS step, unpinned round).
            unpinned_n = sum(1 for c in main_configs if c.unpinned)
            reserve = (0.0 if args.no_rss else 10.0) + (
                0.0 if args.no_unpinned else unpinned_n * (args.warmup + args.window + 0.2) + 5.0
            )
            for round_no in range(1, args.rounds + 1):
                t = time.monotonic()
                if round_s and t - started + round_s + reserve > args.budget:
                    run.skipped.append(
                        f"pinned round {round_no} skipped: it would end after the "
                        f"{args.budget:g} s budget"
                    )
                    break
                _round("pinned", main_configs, env, pool, run, args.clients, round_no)
                if worker_configs:  # 1 against 2 workers: server and clients on every CPU
                    pool.set_affinity(set(cpus))
                    _round("workers", worker_configs, env, pool, run, args.clients, round_no)
                    if client_cpus:
                        pool.set_affinity(client_cpus)
                if topology_configs:  # the same way: HAProxy and replicas share every CPU
                    pool.set_affinity(set(cpus))
                    _round("topology", topology_configs, env, pool, run, args.clients, round_no)
                    if client_cpus:
                        pool.set_affinity(client_cpus)
                round_s = time.monotonic() - t
            if not args.rss_tokens or args.no_rss or _available("posts"):
                pass
            else:
                unpinned_s = 0.0 if args.no_unpinned else unpinned_n * (
                    args.warmup + args.window + 0.2) + 5.0
                deadline_s = min(90.0, max(
                    15.0, args.budget - (time.monotonic() - started) - unpinned_s - 10.0))
                _say(f"RSS with {args.rss_tokens:,} tokens cached (at most {deadline_s:.0f} s)")
                try:
                    run.rss_100k = measure_rss_100k(env, args.rss_tokens, deadline_s)
                except Exception as exc:
                    run.failures.append(f"RSS step: {exc}")
            unpinned_est = unpinned_n * (args.warmup + args.window + 0.2) + 5.0
            if not args.no_unpinned and pinned and (
                time.monotonic() - started + unpinned_est > args.budget
            ):
                run.skipped.append("unpinned round skipped: it would end after the budget")
            elif not args.no_unpinned and pinned:
                every = set(cpus)
                pool.set_affinity(every)
                for helper in env.helpers:
                    set_affinity(helper.pid, every)
                env.server_cpus = env.client_cpus = None
                _round("unpinned", main_configs, env, pool, run, [max(args.clients)], 1)
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted; stopping every process", file=sys.stderr)
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        shutil.rmtree(work, ignore_errors=True)

    elapsed = time.monotonic() - started
    report = _report(run, args, runnable, skipped, server_cpus, client_cpus, elapsed)
    print(report["text"])
    (args.out / "results.json").write_text(json.dumps(report["data"], indent=2) + "\n")
    try:
        from bench.chart import draw

        draw(report["data"], args.out / "bench.png")
    except ImportError:
        print("bench: matplotlib is not installed; no chart", file=sys.stderr)
    return 130 if interrupted else (1 if run.failures else 0)


def _topology_lines(run: Run, table_data: dict[str, Any]) -> list[str]:
    """The HAProxy rows' ratios and per-call overhead, and what they mean on this machine."""
    lines = []
    ratios = run.ratios.get("topology", {})
    for config_id, ref in (("topo-haproxy-1r", "topo-direct"), ("topo-haproxy-2r", "topo-direct"),
                           ("topo-haproxy-2r", "topo-haproxy-1r"),
                           ("topo-pg-direct", "topo-direct"),
                           ("topo-pg-haproxy-1r", "topo-pg-direct"),
                           ("topo-pg-haproxy-2r", "topo-pg-direct"),
                           ("topo-pg-haproxy-2r", "topo-pg-haproxy-1r")):
        for n, entry in sorted(ratios.get(config_id, {}).items()):
            if entry.get(f"x_{ref}"):
                lines.append(f"{config_id} / {ref} at {n} clients: "
                             f"{_median(entry[f'x_{ref}']):.2f}x calls/s (median of rounds)")
    for n_key, direct in table_data.get("topo-direct", {}).items():
        behind = table_data.get("topo-haproxy-1r", {}).get(n_key, {})
        if "p50_us" in direct and "p50_us" in behind:
            lines.append(
                f"HAProxy's overhead per call at {n_key} clients (1 replica behind it vs direct): "
                f"{behind['p50_us'] - direct['p50_us']:+,.0f} us p50 latency, "
                f"{behind['server_cpu_us_per_call'] - direct['server_cpu_us_per_call']:+,.1f} us "
                "server-side CPU (HAProxy's included)"
            )
    for n_key, sqlite in table_data.get("topo-direct", {}).items():
        pg = table_data.get("topo-pg-direct", {}).get(n_key, {})
        if "server_cpu_us_per_call" in sqlite and "server_cpu_us_per_call" in pg:
            lines.append(
                f"PostgreSQL vs SQLite, one posts-rpc direct, at {n_key} clients: "
                f"{pg['server_cpu_us_per_call']:,.1f} vs {sqlite['server_cpu_us_per_call']:,.1f} "
                "us server CPU per list_posts call (PostgreSQL's processes included; the page "
                "is served from the replica's cache on both)"
            )
    cpus = os.cpu_count() or 0
    lines.append(
        f"On {cpus} CPU(s) shared by the clients, HAProxy and the replicas, this measures "
        "HAProxy's overhead more than scaling: a second replica gains only by using the core "
        "that one replica (one process, one GIL) leaves idle, as --workers 2 does, and every "
        "replica competes with HAProxy and the clients for the same cores; replicas on their "
        "own machines are what scales (docs/deploy.md)."
    )
    return lines


def _report(
    run: Run, args: argparse.Namespace, configs: Sequence[Config], skipped: Sequence[str],
    server_cpus: set[int] | None, client_cpus: set[int] | None, elapsed: float,
) -> dict[str, Any]:
    parts: list[str] = []
    data: dict[str, Any] = {
        "settings": {
            "rounds": args.rounds, "window_s": args.window, "warmup_s": args.warmup,
            "clients": args.clients, "server_cpus": sorted(server_cpus or []),
            "client_cpus": sorted(client_cpus or []), "elapsed_s": round(elapsed, 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "versions": _versions(),
        },
        "tables": {},
    }
    rounds = max(
        (len(ms) for by_n in run.samples.get("pinned", {}).values() for ms in by_n.values()),
        default=0,
    )
    parts.append(
        f"Pinned: server on CPU {sorted(server_cpus or [])}, client processes (and the Auth "
        f"service, the peer's auth app) on CPU {sorted(client_cpus or [])}; one persistent "
        f"connection per client; median of {rounds} round(s) of {args.window:g} s after "
        f"{args.warmup:g} s warm-up; spread = (max-min)/median calls/s over rounds; ratios "
        "taken within each round, then the median. The limit (bare thriftpy2) sets "
        "TCP_NODELAY on accepted sockets: thriftpy2's own server does not, and a 5 KiB page "
        "would then wait ~40 ms for the client's delayed ACK."
    )
    for kind, title in (
        ("pinned", "PINNED"),
        ("workers", "1 vs 2 WORKERS (server and clients on every CPU)"),
        ("topology", "POSTS REPLICAS BEHIND HAPROXY (server side and clients on every CPU)"),
        ("unpinned", "UNPINNED (one round; nothing pinned)"),
    ):
        if kind not in run.samples:
            continue
        text, table_data = table(run, kind, configs)
        data["tables"][kind] = table_data
        parts.append(f"\n{title}\n{text}")
        if kind == "workers":
            two = run.ratios.get("workers", {}).get("hs256-warm-2w", {})
            for n, entry in sorted(two.items()):
                if entry.get("x_hs256-warm-1w"):
                    parts.append(
                        f"2 workers / 1 worker at {n} clients: "
                        f"{_median(entry['x_hs256-warm-1w']):.2f}x calls/s (median of rounds)"
                    )
        if kind == "topology":
            parts.extend(_topology_lines(run, table_data))
    max_clients = max(args.clients)
    cost_lines = check_costs(run, max_clients)
    if cost_lines:
        parts.append(
            f"\nCOST OF THE CHECK ({max_clients} clients, pinned): server CPU per call minus the "
            "check-off service's (medians)"
        )
        parts.extend(cost_lines)
    target_results = targets(run, max_clients)
    parts.append(f"\nTARGETS (issues 6, 12 and 14, {max_clients} clients, pinned rounds)")
    parts.extend(t.line() for t in target_results)
    data["targets"] = [
        {"name": t.name, "measured": t.measured, "met": t.met} for t in target_results
    ]
    data["rss_100k"] = run.rss_100k
    others = [
        m.other_cpu_share
        for by_config in run.samples.get("pinned", {}).values()
        for ms in by_config.values()
        for m in ms
    ]
    if others and max(others) > 0.15:
        parts.append(
            f"\nWARNING: other processes used up to {max(others):.0%} of a CPU during some "
            "windows (median "
            f"{_median(others):.0%}); figures from a busy machine are noisy."
        )
    if skipped:
        parts.append("\nNot run: " + "; ".join(skipped))
    load_end = _load_1min()
    data["loadavg_1min"] = {"start": run.load_at_start, "end": load_end}
    if run.load_at_start is not None and load_end is not None:
        parts.append(
            f"\nLoad average (1 min, /proc/loadavg) at start {run.load_at_start:.2f}, at end "
            f"{load_end:.2f}"
            + (" -- ABOVE the CPU count: these figures were taken under other load."
               if max(run.load_at_start, load_end) > (os.cpu_count() or 1) else "")
        )
    if run.skipped:
        parts.append(
            "\nSkipped (the machine was too slow or busy for the budget; not a failure):\n  "
            + "\n  ".join(run.skipped)
        )
    if run.failures:
        parts.append("\nFailures:\n  " + "\n  ".join(run.failures))
    parts.append(f"\nWhole run: {elapsed:.0f} s. Results: {args.out / 'results.json'}")
    data["skipped"] = list(skipped)
    data["failures"] = run.failures
    data["budget_skipped"] = run.skipped
    return {"text": "\n".join(parts), "data": data}


if __name__ == "__main__":
    sys.exit(main())
