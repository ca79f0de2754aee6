"""``posts-rpc``: run the Posts service.

    posts-rpc migrate --data-dir DIR --database-url postgresql://...
    posts-rpc serve (--data-dir DIR | --database-url postgresql://...)
                    [--host H] [--port P] --verify MODE --issuer ISS
                    [--audience AUD] [--cache-ttl SECONDS] [--framed]
                    [--tls-cert F --tls-key F [--tls-client-ca F]]
                    [--max-connections N] [--max-connections-per-peer N]
                    [--idle-timeout SECONDS] [--max-message-bytes N]
                    [--workers N] [--log-level LEVEL] [--log-format text|json]
                    [--metrics-port P]
      MODE local:      --public-key FILE | --jwks-file FILE | --hs256-secret-file FILE
                       [--auth-tls-ca F]
      MODE jwks:       --jwks-url URL [--auth-tls-ca F]
      local and jwks:  [--status-list required|if-present|off] [--status-list-prefix URL]
                       [--status-max-age SECONDS] [--status-refresh SECONDS]
      MODE introspect: --introspect-url URL --client-id ID --client-secret-file FILE
                       [--auth-tls-ca F]
      MODE thrift:     --auth-addr HOST:PORT [--auth-tls-ca F] [--auth-framed]

Posts are kept in SQLite in ``DIR/posts.db``, or with ``--database-url`` (or
the environment variable ``POSTS_RPC_DATABASE_URL``) in PostgreSQL, where
several replicas share them; ``--database-url`` wins over ``--data-dir``.
``migrate`` copies the posts of ``DIR/posts.db`` into an empty PostgreSQL
database (ids kept; stop the service first).

In the local and jwks modes every token must carry a Token Status List entry
(``status`` claim) whose bit is read on every call from the list fetched from
the Auth service (``--status-list-prefix``, default ``<issuer>/statuslists/``)
and refreshed every ``ttl`` (at most ``--status-refresh`` seconds, default 1):
a revoked token is refused within about a second. A list the Auth service has
not confirmed for ``--status-max-age`` seconds (default 60) fails calls closed
(``Unavailable``). ``--status-list if-present`` also accepts tokens without
the claim (another issuer's); ``off`` ignores it.

``--framed`` and ``--tls-*`` configure the Posts listener; ``--auth-tls-ca``
(the CA to trust for the Auth service's certificate, whose hostname is
checked too) and ``--auth-framed`` configure the connection to the Auth
service. Secrets are read from files only, never from the command line.

Before that, the verifier's dependency is checked once: introspection
credentials refused (401/403), or a ``--jwks-url`` answering something not a
JWK Set, is one error line and exit 1; an endpoint only unreachable is a
warning. ``--log-format json`` logs one JSON object per line.

``--metrics-port P`` (off by default; 0 = any free port) serves the metrics
in the Prometheus text format at ``http://HOST:P/metrics`` (``HOST`` is
``--host``), plain HTTP without authentication: keep it reachable by the
monitoring system only. With ``--workers N`` every worker answers for the
whole service (see :mod:`auth_rpc.serving.metrics`).

Prints one ready line (``posts-rpc ready: thrift=HOST:PORT verify=MODE ...``)
once it serves; stops cleanly on SIGTERM and SIGINT (stops accepting,
finishes calls in flight) and exits 0. Exit codes: 0 success, 1 could not
start (the message says why), 2 usage.

There is deliberately no flag to switch token checks off (see
:mod:`posts_rpc.server`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from auth_rpc import __version__
from auth_rpc.errors import AuthError, DependencyUnavailable
from auth_rpc.serving.metrics import MetricsListener, ServiceMetrics, SharedBoard
from auth_rpc.serving.private_files import private_dir
from auth_rpc.serving.rpc import ServerSettings, TLSServerConfig
from auth_rpc.serving.runner import (
    add_listener_arguments,
    add_logging_arguments,
    bind_socket,
    configure_logging,
    listener_limits,
    report_error,
    run_until_signal,
    run_workers,
    worker_number,
)
from auth_rpc.serving.sqlstore import check_database_url, redact_url
from auth_rpc.serving.transport import TLSClientConfig, parse_hostport
from auth_rpc.verify.introspect import IntrospectionVerifier
from auth_rpc.verify.principal import TokenVerifier
from auth_rpc.verify.verifiers import JwksVerifier, make_verifier
from posts_rpc.server import DB_FILE_NAME, PostsServer
from posts_rpc.store import PostgresPostStore, SqlitePostStore

__all__ = ["main"]

log = logging.getLogger("posts_rpc.cli")

MODES = ("local", "jwks", "introspect", "thrift")

#: The environment variable that gives ``--database-url``.
DATABASE_URL_ENV = "POSTS_RPC_DATABASE_URL"

#: The largest message ``posts-rpc serve`` accepts by default (``--max-message-bytes``):
#: its largest legitimate call, ``create_post`` with a 64 KiB body, a 200-character title
#: and an 8 KiB token, is about 70 KiB.
#: The Auth service keeps the serving layer's default, 4 MiB.
MAX_MESSAGE_BYTES = 256 * 1024

#: Flags that belong to one mode only: flag -> (argparse dest, modes allowing it).
_MODE_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "--public-key": ("public_key", ("local",)),
    "--jwks-file": ("jwks_file", ("local",)),
    "--hs256-secret-file": ("hs256_secret_file", ("local",)),
    "--jwks-url": ("jwks_url", ("jwks",)),
    "--introspect-url": ("introspect_url", ("introspect",)),
    "--client-id": ("client_id", ("introspect",)),
    "--client-secret-file": ("client_secret_file", ("introspect",)),
    "--auth-addr": ("auth_addr", ("thrift",)),
    "--auth-tls-ca": ("auth_tls_ca", ("local", "jwks", "introspect", "thrift")),
    "--auth-tls-cert": ("auth_tls_cert", ("local", "jwks", "introspect", "thrift")),
    "--auth-tls-key": ("auth_tls_key", ("local", "jwks", "introspect", "thrift")),
    "--auth-framed": ("auth_framed", ("thrift",)),
    "--status-list": ("status_list", ("local", "jwks")),
    "--status-list-prefix": ("status_list_prefix", ("local", "jwks")),
    "--status-max-age": ("status_max_age", ("local", "jwks")),
    "--status-refresh": ("status_refresh", ("local", "jwks")),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posts-rpc", description="The Posts service: every call authorized by an access token."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser(
        "migrate",
        help="copy the posts of a SQLite data directory into an empty PostgreSQL database",
    )
    migrate.add_argument("--data-dir", type=Path, required=True, help="where posts.db lives")
    migrate.add_argument(
        "--database-url",
        type=_database_url,
        default=os.environ.get(DATABASE_URL_ENV) or None,
        help=f"postgresql://... (default: ${DATABASE_URL_ENV})",
    )
    serve = sub.add_parser("serve", help="run the Posts service")
    serve.add_argument(
        "--data-dir", type=Path,
        help="where posts.db lives (SQLite; needed unless --database-url is given)",
    )
    serve.add_argument(
        "--database-url",
        type=_database_url,
        default=os.environ.get(DATABASE_URL_ENV) or None,
        help=f"postgresql://...: keep posts in PostgreSQL, shared by replicas (default: "
        f"${DATABASE_URL_ENV}; without either, SQLite in the data directory)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=9091, help="port (default 9091; 0 = any free)")
    serve.add_argument("--verify", required=True, choices=MODES, help="how tokens are verified")
    serve.add_argument("--issuer", required=True, help="the token issuer (iss) to accept")
    serve.add_argument("--audience", default="posts", help="the audience (aud) to require")
    serve.add_argument(
        "--cache-ttl",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a verified answer is reused (default 30; 0 turns the cache off); "
        "in the remote modes, how long a revoked token may still be accepted",
    )
    local = serve.add_argument_group("--verify local")
    key = local.add_mutually_exclusive_group()
    key.add_argument(
        "--public-key",
        type=Path,
        metavar="FILE",
        help="the issuer's PEM public key (auth-rpc export-public-key --out FILE)",
    )
    key.add_argument(
        "--jwks-file",
        type=Path,
        metavar="FILE",
        help="the issuer's JWK Set, every live key (auth-rpc export-public-key --jwks FILE): "
        "survives a key rotation; read again when a token names a key it lacks",
    )
    key.add_argument("--hs256-secret-file", type=Path, metavar="FILE", help="the HS256 secret")
    jwks = serve.add_argument_group("--verify jwks")
    jwks.add_argument("--jwks-url", metavar="URL", help="the issuer's JWK Set URL")
    intro = serve.add_argument_group("--verify introspect")
    intro.add_argument("--introspect-url", metavar="URL", help="the RFC 7662 endpoint")
    intro.add_argument("--client-id", metavar="ID", help="this service's client id")
    intro.add_argument(
        "--client-secret-file", type=Path, metavar="FILE", help="this service's client secret"
    )
    status = serve.add_argument_group("--verify local and jwks: Token Status Lists")
    status.add_argument(
        "--status-list",
        choices=("required", "if-present", "off"),
        help="required (default): every token must carry a status claim, whose bit is "
        "checked on every call; if-present: tokens without one are accepted (another "
        "issuer's); off: the claim is ignored (revoked tokens pass until they expire)",
    )
    status.add_argument(
        "--status-list-prefix",
        metavar="URL",
        help="the only place status lists are fetched from (default: ISSUER/statuslists/)",
    )
    status.add_argument(
        "--status-max-age",
        type=float,
        metavar="SECONDS",
        help="the fail-closed bound: calls are refused (Unavailable) when the list held "
        "was not confirmed by the Auth service for this long (default 60)",
    )
    status.add_argument(
        "--status-refresh",
        type=float,
        metavar="SECONDS",
        help="fetch each list at least this often (caps the issuer's ttl; default 1)",
    )
    thrift = serve.add_argument_group("--verify thrift")
    thrift.add_argument("--auth-addr", metavar="HOST:PORT", help="the Auth service (Thrift)")
    thrift.add_argument(
        "--auth-framed", action="store_true", help="framed transport to the Auth service"
    )
    serve.add_argument(
        "--auth-tls-ca", metavar="FILE", help="CA to trust for the Auth service's certificate"
    )
    serve.add_argument(
        "--auth-tls-cert", metavar="FILE", help="client certificate for a mutual-TLS Auth service"
    )
    serve.add_argument("--auth-tls-key", metavar="FILE", help="its private key (PEM)")
    serve.add_argument("--framed", action="store_true", help="framed Thrift transport")
    serve.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM) for the listener")
    serve.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    serve.add_argument(
        "--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA"
    )
    limits = ServerSettings()
    add_listener_arguments(
        serve,
        max_connections=2048,
        max_connections_per_peer=limits.max_connections_per_peer,
        idle_timeout_s=limits.idle_timeout_s,
        max_message_bytes=MAX_MESSAGE_BYTES,
        message_help=": the largest call, a create_post with a 64 KiB body, is about 70 KiB",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="pre-forked processes sharing the listening socket (default 1)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve metrics (Prometheus text format) at http://HOST:P/metrics, HOST being "
        "--host; plain HTTP for anyone who can connect: not for a public address "
        "(default: off; 0 = any free port)",
    )
    add_logging_arguments(serve)
    return parser


def _database_url(text: str) -> str:
    try:
        return check_database_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a flag combination that does not fit ``--verify`` (argparse error, exit 2)."""
    if args.command == "migrate":
        if args.database_url is None:
            parser.error(f"migrate needs --database-url URL (or ${DATABASE_URL_ENV})")
        return
    if args.data_dir is None and args.database_url is None:
        parser.error(f"give --data-dir DIR or --database-url URL (or ${DATABASE_URL_ENV})")
    mode = args.verify
    for flag, (dest, modes) in _MODE_FLAGS.items():
        if getattr(args, dest) and mode not in modes:
            parser.error(f"{flag} does not apply to --verify {mode}")
    if mode == "local" and not (args.public_key or args.jwks_file or args.hs256_secret_file):
        parser.error(
            "--verify local needs --public-key FILE, --jwks-file FILE or --hs256-secret-file FILE"
        )
    if mode == "jwks" and not args.jwks_url:
        parser.error("--verify jwks needs --jwks-url URL")
    if mode == "introspect":
        for flag in ("--introspect-url", "--client-id", "--client-secret-file"):
            if not getattr(args, _MODE_FLAGS[flag][0]):
                parser.error(f"--verify introspect needs {flag}")
    if mode == "thrift":
        if not args.auth_addr:
            parser.error("--verify thrift needs --auth-addr HOST:PORT")
        try:
            parse_hostport(args.auth_addr)
        except ValueError as exc:
            parser.error(f"--auth-addr: {exc}")
    if not args.issuer.strip():
        parser.error("--issuer must not be empty")
    if not args.audience.strip():
        parser.error("--audience must not be empty")
    if not args.cache_ttl >= 0:  # also refuses NaN
        parser.error("--cache-ttl must be 0 or more seconds")
    refresh = 1.0 if args.status_refresh is None else args.status_refresh
    max_age = 60.0 if args.status_max_age is None else args.status_max_age
    if not 0 < refresh < 3600:  # also refuses NaN
        parser.error("--status-refresh must be between 0 and 3600 seconds")
    if not refresh < max_age <= 86400:
        parser.error("--status-max-age must be longer than --status-refresh (at most 86400)")
    if (
        mode in ("local", "jwks")
        and args.status_list != "off"
        and not args.status_list_prefix
        and not args.issuer.startswith(("http://", "https://"))
    ):
        parser.error(
            "--issuer is not an http(s) URL, so its status lists are not under it: give "
            "--status-list-prefix URL, or --status-list off (an issuer without status lists)"
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if bool(args.auth_tls_cert) != bool(args.auth_tls_key):
        parser.error("--auth-tls-cert and --auth-tls-key go together")
    if args.auth_tls_cert and not args.auth_tls_ca:
        parser.error("--auth-tls-cert needs --auth-tls-ca")
    if not 0 <= args.port < 65536:
        parser.error("--port must be 0..65535")
    if args.metrics_port is not None and not 0 <= args.metrics_port < 65536:
        parser.error("--metrics-port must be 0..65535")
    if args.workers < 1:
        parser.error("--workers must be at least 1")


def _session(ca_file: str) -> requests.Session:
    """An HTTP session trusting ``ca_file`` (hostnames checked), nothing from the environment."""
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc credentials from the environment
    session.verify = ca_file
    # Shared by every serving thread: keep it stateless (no cookies from the server).
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=16, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _check_public_key_file(path: Path) -> None:
    """Refuse, naming the flag, a ``--public-key`` file that holds a private key or a JWK Set."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if b"PRIVATE KEY-----" in head:
        raise ValueError(
            f"--public-key {path} holds a private key: pass the Auth service's public key "
            "instead (auth-rpc export-public-key --data-dir AUTH_DATA --out FILE), or its "
            "JWK Set with --jwks-file (auth-rpc export-public-key --jwks FILE); keep private "
            "keys away from resource servers"
        )
    if head.lstrip().startswith(b"{"):
        raise ValueError(
            f"--public-key {path} is JSON, not a PEM public key: pass a JWK Set with --jwks-file"
        )


def _verifier(args: argparse.Namespace) -> tuple[TokenVerifier, requests.Session | None]:
    """The verifier ``args`` describe; raises ``ValueError`` or ``OSError`` (bad configuration)."""
    settings: dict[str, Any] = {
        "issuer": args.issuer,
        "audience": args.audience,
        "cache_ttl_s": args.cache_ttl,
    }
    session = None
    mode = args.verify
    if mode in ("local", "jwks"):
        if args.status_list is not None:
            settings["status_list"] = args.status_list
        if args.status_list_prefix is not None:
            settings["status_list_prefix"] = args.status_list_prefix
        if args.status_max_age is not None:
            settings["status_max_age_s"] = args.status_max_age
        if args.status_refresh is not None:
            settings["status_refresh_max_s"] = args.status_refresh
    if mode == "local":
        if args.public_key:
            _check_public_key_file(args.public_key)
            settings["public_key_file"] = args.public_key
        elif args.jwks_file:
            settings["jwks_file"] = args.jwks_file
        else:
            settings["hs256_secret_file"] = args.hs256_secret_file
    elif mode == "jwks":
        settings["jwks_url"] = args.jwks_url
    elif mode == "introspect":
        settings["introspect_url"] = args.introspect_url
        settings["client_id"] = args.client_id
        settings["client_secret_file"] = args.client_secret_file
    else:
        settings["auth_addr"] = args.auth_addr
        settings["framed"] = args.auth_framed
    if mode in ("thrift", "introspect") and args.auth_tls_ca:
        # Introspection has a connection pool of its own (not a requests session).
        settings["tls"] = TLSClientConfig(
            ca_file=args.auth_tls_ca, cert_file=args.auth_tls_cert, key_file=args.auth_tls_key
        )
    if mode in ("local", "jwks") and args.auth_tls_ca:
        session = _session(args.auth_tls_ca)
        if args.auth_tls_cert:
            session.cert = (args.auth_tls_cert, args.auth_tls_key)
        settings["session"] = session
    try:
        return make_verifier(mode, **settings), session
    except BaseException:
        if session is not None:
            session.close()
        raise


def _serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    tls = (
        TLSServerConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    )
    settings = ServerSettings(
        framed=args.framed,
        tls=tls,
        **listener_limits(args),
    )
    if args.workers > 1:
        # Open and migrate the store once, before any worker exists (as
        # auth-rpc does): a store that cannot be opened is one error line and
        # exit 1, not a ready line followed by every worker failing.
        if args.database_url:
            PostgresPostStore.open(args.database_url, cache=False).close()
        else:
            directory = Path(args.data_dir)
            private_dir(directory, "data directory")
            SqlitePostStore.open(directory / DB_FILE_NAME).close()
    sock = bind_socket(args.host, args.port)
    metrics_sock = None
    if args.metrics_port is not None:
        try:
            metrics_sock = bind_socket(args.host, args.metrics_port)
        except BaseException:
            sock.close()
            raise
    # Pre-forked workers add up their counts through shared memory mapped now.
    board = SharedBoard(args.workers) if metrics_sock is not None and args.workers > 1 else None
    if args.workers == 1:
        try:
            checked = _verifier(args)
        except BaseException:
            sock.close()
            if metrics_sock is not None:
                metrics_sock.close()
            raise
        try:
            _startup_check(checked[0])
        except BaseException:
            _close(*checked)
            sock.close()
            if metrics_sock is not None:
                metrics_sock.close()
            raise
    else:
        # The check runs in the parent, with a verifier of its own closed
        # before any worker exists (fork copies no thread, nor should it copy
        # a pooled connection).
        try:
            probe, probe_session = _verifier(args)
            try:
                _startup_check(probe)
            finally:
                _close(probe, probe_session)
        except BaseException:
            sock.close()
            if metrics_sock is not None:
                metrics_sock.close()
            raise

    def start() -> Callable[[], None]:
        if args.workers == 1:
            verifier, session = checked
        else:
            verifier, session = _verifier(args)
        metrics = None
        listener = None
        if metrics_sock is not None:
            metrics = ServiceMetrics(board=board, slot=worker_number())
        try:
            if isinstance(verifier, JwksVerifier) and args.workers > 1:
                _check_jwks(verifier)  # each worker its own keys (checked once before forking)
            server = PostsServer(
                data_dir=None if args.database_url else args.data_dir,
                database_url=args.database_url, verifier=verifier, host=args.host, sock=sock,
                settings=settings, metrics=metrics,
            ).start()
            if metrics is not None and metrics_sock is not None:
                try:
                    listener = MetricsListener(metrics, metrics_sock).start()
                    metrics.start_publishing()
                except BaseException:
                    server.stop()
                    raise
        except BaseException:
            _close(verifier, session)
            raise

        def stop() -> None:
            if listener is not None:
                listener.stop()
            server.stop()
            if metrics is not None:
                metrics.stop()
            _close(verifier, session)

        return stop

    host = f"[{args.host}]" if ":" in args.host else args.host
    ready = (
        f"posts-rpc ready: thrift={host}:{sock.getsockname()[1]} verify={args.verify} "
        f"tls={'on' if tls else 'off'} framed={'on' if args.framed else 'off'} "
        f"issuer={args.issuer} audience={args.audience} workers={args.workers}"
    )
    if metrics_sock is not None:
        ready += f" metrics=http://{host}:{metrics_sock.getsockname()[1]}/metrics"
    with sock, metrics_sock or contextlib.nullcontext():  # closed however serving ends
        if args.workers == 1:
            return run_until_signal(ready, start())
        return run_workers(args.workers, ready, start)


def _startup_check(verifier: TokenVerifier) -> None:
    """Check at start what a verifier depends on (issue: a wrong secret reported ready).

    Introspection: one introspection of a dummy token; refused credentials
    (401/403) raise ``ValueError`` (one error line, exit 1). JWK Set: one
    fetch; an answer that is not a JWK Set raises ``ValueError``. An
    endpoint that is only unreachable is a warning: the service starts, and
    calls are refused (``Unavailable``) until it answers.
    """
    if isinstance(verifier, IntrospectionVerifier):
        try:
            verifier.check_credentials()
            log.info("introspection credentials accepted by %s", verifier.introspect_url)
        except DependencyUnavailable as exc:
            log.warning(
                "cannot check the introspection credentials at start (%s); calls are refused "
                "until %s answers", exc.message, verifier.introspect_url,
            )
    elif isinstance(verifier, JwksVerifier):
        _check_jwks(verifier)


def _check_jwks(verifier: JwksVerifier) -> None:
    try:
        count = verifier.prefetch()
        log.info("fetched %d signing keys from the JWK Set", count)
    except DependencyUnavailable:
        wrong = verifier.last_fetch_not_a_jwk_set
        if wrong:
            raise ValueError(
                f"--jwks-url {verifier.jwks_url} does not answer a JWK Set ({wrong})"
            ) from None
        # Serve anyway: calls are refused (Unavailable) until the keys arrive.
        log.warning(
            "JWK Set at %s unreachable at start; calls fail until it answers", verifier.jwks_url
        )


def _close(verifier: TokenVerifier, session: requests.Session | None) -> None:
    verifier.close()
    if session is not None:
        session.close()


def _migrate(args: argparse.Namespace) -> int:
    from posts_rpc.migrate import migrate_to_postgresql

    configure_logging("WARNING")
    copied = migrate_to_postgresql(args.data_dir, args.database_url)
    print(
        f"{copied} post{'' if copied == 1 else 's'} copied from {args.data_dir} to "
        f"{redact_url(args.database_url)}; serve with --database-url from now on"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``posts-rpc``; returns the exit code (argparse exits 2 on a usage error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "migrate":
            return _migrate(args)
    except (AuthError, ValueError, OSError) as exc:
        return report_error("posts-rpc", exc)
    raise AssertionError(args.command)  # argparse only allows the commands above


if __name__ == "__main__":
    sys.exit(main())
