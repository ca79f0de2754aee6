"""``auth-rpc``: serve the Auth service and manage its users, clients and keys.

    auth-rpc serve --data-dir DIR [--host H] [--port P] [--http-port P] [--issuer URL]
                   [--audience AUD] [--alg ALG] [--hs256-secret-file FILE] [--access-ttl S]
                   [--init]
                   [--status-list-ttl S] [--status-list-size N] [--status-list-base-url URL]
                   [--http-connection-limit N] [--http-per-peer-limit N]
                   [--http-header-timeout S] [--http-idle-timeout S]
                   [--max-connections N] [--max-connections-per-peer N] [--idle-timeout S]
                   [--max-message-bytes N]
    auth-rpc add-user NAME --data-dir DIR [--scope "..."] [--audience AUD ...] [--password-stdin]
                      [--min-password-length N] [--password-blocklist FILE]
    auth-rpc add-client ID --data-dir DIR [--scope "..."] [--audience AUD ...] [--introspect]
                      [--secret-file PATH [--force]]
    auth-rpc list --data-dir DIR [--json]
    auth-rpc disable NAME --data-dir DIR       (and: enable NAME, remove NAME)
    auth-rpc set-password NAME --data-dir DIR [--password-stdin] [--min-password-length N]
                      [--password-blocklist FILE]
    auth-rpc set-scope NAME SCOPES --data-dir DIR
    auth-rpc set-audience NAME (AUD ... | --default) --data-dir DIR
    auth-rpc reset-secret CLIENT --data-dir DIR [--secret-file PATH [--force]]
    auth-rpc keys --data-dir DIR [--json]
    auth-rpc export-public-key --data-dir DIR [--out FILE | --jwks FILE]

New names (users and clients) are 1..64 ASCII letters, digits and ``. _ @ -``,
starting with a letter or a digit (names made before keep working). New
passwords (NIST SP 800-63B): at least 8 characters (``--min-password-length``,
1..64; below 8 is allowed with a warning), at most 1024 bytes of UTF-8, no
composition rules, and with ``--password-blocklist FILE`` none of the
passwords listed there (one per line, compared case-insensitively).

``disable``, ``remove``, ``set-password`` and ``reset-secret`` revoke the
account's refresh tokens and its live access tokens (their Token Status List
bits) at once; a running ``serve`` on the same data directory refuses the
account's next login, refresh or client authentication.

``--introspect`` gives the client the permission to introspect tokens
(``POST /introspect``: a resource server in introspect mode); without it a
client's introspection is refused (HTTP 403).

``--audience`` (repeatable) lists the audiences the account may ask tokens for
(RFC 8707 ``resource``; Thrift ``audience``); without it, only the default
audience of ``serve`` (its ``--audience``). Names: 1..128 ASCII letters,
digits and ``. _ ~ : / -``, starting with a letter or a digit.
    auth-rpc rotate-key --data-dir DIR [--alg ALG] [--activate-after S | --now]

``rotate-key`` publishes the new key at once and signs with it from
``--activate-after`` seconds later (default 360: what verifiers may cache the
JWK Set, plus a margin); the running service switches by itself. ``--now``
switches at once: for a compromised key only. ``serve --init`` starts afresh
when the database is missing or empty beside existing keys (refused otherwise).

Every command takes ``--database-url postgresql://...`` (or the environment
variable ``AUTH_RPC_DATABASE_URL``): the Auth database of every replica on
PostgreSQL; without it, SQLite in the data directory. Prefer the environment
variable or libpq's password file to a password in the URL on a command line
(which other local users may see); the password is never logged.

On PostgreSQL the signing keys are in the database, sealed with a key-encryption
key (KEK): ``--key-encryption-key-file FILE`` (or
``AUTH_RPC_KEY_ENCRYPTION_KEY_FILE``), the same file on every replica, needed
by ``serve``, ``keys``, ``export-public-key``, ``rotate-key`` and
``rewrap-keys``::

    auth-rpc new-kek FILE                      (32 random bytes, a new 0600 file)
    auth-rpc rewrap-keys --data-dir DIR --database-url URL
                      --key-encryption-key-file NEW --old-key-encryption-key-file OLD
    auth-rpc migrate --data-dir DIR --database-url URL [--key-encryption-key-file FILE]

``migrate`` copies a SQLite data directory into an empty PostgreSQL database.

Exit codes: 0 success, 1 the operation failed (the message says why), 2 usage.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from auth_rpc import __version__
from auth_rpc.auth.accounts import (
    AUDIENCE_RULE,
    DEFAULT_MIN_PASSWORD_CHARS,
    MAX_MIN_PASSWORD_CHARS,
    NAME_RULE,
    PasswordPolicy,
)
from auth_rpc.auth.keys import KEY_ACTIVATION_DELAY_S
from auth_rpc.auth.migrate import migrate_to_postgresql
from auth_rpc.auth.sealing import KeySealer, new_kek_file
from auth_rpc.auth.server import AuthServer
from auth_rpc.auth.service import DB_FILENAME, AuthService, AuthSettings
from auth_rpc.errors import AuthError
from auth_rpc.serving.httpd import HttpLimits
from auth_rpc.serving.metrics import ServiceMetrics, SharedBoard
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

__all__ = ["main"]

DEFAULT_USER_SCOPE = "posts:read posts:write"
DEFAULT_CLIENT_SCOPE = "posts:read"
ALGORITHMS = ("EdDSA", "RS256", "ES256", "HS256")


#: The environment variable that gives ``--database-url``.
DATABASE_URL_ENV = "AUTH_RPC_DATABASE_URL"
#: The environment variable that gives ``--key-encryption-key-file``.
KEK_FILE_ENV = "AUTH_RPC_KEY_ENCRYPTION_KEY_FILE"

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auth-rpc",
        description="The Auth service: RFC 9068 access tokens over Thrift and HTTP.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir", required=True, type=Path, help="where keys and the database live"
        )
        p.add_argument(
            "--database-url",
            type=_database_url,
            default=os.environ.get(DATABASE_URL_ENV) or None,
            help=f"postgresql://... (default: ${DATABASE_URL_ENV}; without either, SQLite "
            "in the data directory)",
        )
        kek_arguments(p)

    def kek_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--key-encryption-key-file",
            type=Path,
            metavar="FILE",
            default=Path(os.environ[KEK_FILE_ENV]) if os.environ.get(KEK_FILE_ENV) else None,
            help="with --database-url: the key-encryption key (32 random bytes, mode 0600) "
            "that seals the signing keys in the database, the same file on every Auth "
            f"replica (default: ${KEK_FILE_ENV}; make one with auth-rpc new-kek FILE)",
        )
        p.add_argument(
            "--old-key-encryption-key-file",
            type=Path,
            metavar="FILE",
            action="append",
            default=[],
            help="during a KEK rotation: a previous key-encryption key, which only unseals "
            "(repeatable; then auth-rpc rewrap-keys)",
        )

    serve = sub.add_parser("serve", help="run the Auth service (Thrift and HTTP)")
    data_dir(serve)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=int, default=9090, help="Thrift port (default 9090; 0 = any free)"
    )
    serve.add_argument(
        "--http-port", type=int, default=9080, help="HTTP port (default 9080; 0 = any free)"
    )
    serve.add_argument("--issuer", help="the iss of issued tokens (default: the HTTP base URL)")
    serve.add_argument(
        "--audience", default="posts", help="the aud of issued tokens (default posts)"
    )
    serve.add_argument("--alg", default="EdDSA", choices=ALGORITHMS, help="signing algorithm")
    serve.add_argument("--hs256-secret-file", type=Path, help="the HS256 secret (>= 32 bytes)")
    serve.add_argument("--access-ttl", type=int, default=900, help="access token lifetime, seconds")
    serve.add_argument(
        "--status-list-ttl",
        type=int,
        default=1,
        metavar="SECONDS",
        help="the ttl of the Token Status Lists: how soon verifiers fetch them again "
        "(default 1)",
    )
    serve.add_argument(
        "--status-list-size",
        type=int,
        default=1_000_000,
        metavar="N",
        help="entries per Token Status List, a multiple of 8 (default 1000000)",
    )
    serve.add_argument(
        "--status-list-base-url",
        metavar="URL",
        help="where the Token Status Lists are published, as URL/statuslists/K "
        "(default: the issuer when it is an http(s) URL, else the HTTP base URL)",
    )
    serve.add_argument("--framed", action="store_true", help="framed Thrift transport")
    serve.add_argument("--tls-cert", help="TLS certificate (PEM) for both listeners")
    serve.add_argument("--tls-key", help="TLS private key (PEM)")
    serve.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    thrift_limits = ServerSettings()
    add_listener_arguments(
        serve,
        max_connections=2048,
        max_connections_per_peer=thrift_limits.max_connections_per_peer,
        idle_timeout_s=thrift_limits.idle_timeout_s,
        max_message_bytes=thrift_limits.max_message_bytes,
    )
    limits = HttpLimits()
    serve.add_argument(
        "--http-connection-limit",
        type=_positive_int,
        default=limits.connection_limit,
        metavar="N",
        help="HTTP connections in all; at the limit a newcomer closes the oldest idle one "
        f"(default {limits.connection_limit})",
    )
    serve.add_argument(
        "--http-per-peer-limit",
        type=_positive_int,
        default=limits.per_peer_limit,
        metavar="N",
        help="HTTP connections of one client IP address; more are closed at once "
        f"(default {limits.per_peer_limit})",
    )
    serve.add_argument(
        "--http-header-timeout",
        type=_positive_float,
        default=limits.header_timeout_s,
        metavar="S",
        help="seconds an HTTP request's header may take to arrive from its first byte, and "
        f"its body from the header's end (default {limits.header_timeout_s:g})",
    )
    serve.add_argument(
        "--http-idle-timeout",
        type=_positive_float,
        default=limits.idle_timeout_s,
        metavar="S",
        help="seconds an HTTP connection may stay idle (or, with TLS, make no progress "
        f"either way) (default {limits.idle_timeout_s:g})",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="pre-forked processes sharing the listening sockets (default 1)",
    )
    add_logging_arguments(serve)
    serve.add_argument(
        "--no-metrics",
        action="store_true",
        help="do not count nor serve GET /metrics (the Prometheus text format) on the HTTP "
        "port; by default it is served there to anyone who reaches that port",
    )
    serve.add_argument(
        "--init",
        action="store_true",
        help="start afresh even though the database is missing or empty beside existing keys, "
        "or the keys directory holds keys the database does not know (those files are moved "
        "to DATA_DIR/keys-unknown-TIME/); every account and issued token is lost. Not needed "
        "on a new data directory",
    )

    add_user = sub.add_parser("add-user", help="create a user")
    add_user.add_argument("name", help=f"the username: {NAME_RULE}")
    data_dir(add_user)
    add_user.add_argument(
        "--scope", default=DEFAULT_USER_SCOPE, help=f"default {DEFAULT_USER_SCOPE!r}"
    )
    add_user.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    _password_policy_arguments(add_user)
    audience_help = (
        "an audience the account may ask tokens for (repeat for several; default: only the "
        f"default audience of serve --audience). Names: {AUDIENCE_RULE}"
    )
    add_user.add_argument(
        "--audience", action="append", dest="audiences", metavar="AUDIENCE", help=audience_help
    )

    add_client = sub.add_parser("add-client", help="register a service client; prints its secret")
    add_client.add_argument("client_id", help=f"the client id: {NAME_RULE}")
    data_dir(add_client)
    add_client.add_argument(
        "--scope", default=DEFAULT_CLIENT_SCOPE, help=f"default {DEFAULT_CLIENT_SCOPE!r}"
    )
    add_client.add_argument(
        "--audience", action="append", dest="audiences", metavar="AUDIENCE", help=audience_help
    )
    add_client.add_argument(
        "--introspect",
        action="store_true",
        help="may introspect tokens (POST /introspect; a resource server in introspect mode)",
    )
    _secret_file_arguments(add_client)

    listing = sub.add_parser("list", help="list users and clients")
    data_dir(listing)
    listing.add_argument("--json", action="store_true", help="one JSON document")

    for command, what in (
        ("disable", "disable a user or client: no more logins or tokens; its tokens revoked"),
        ("enable", "enable a disabled user or client again"),
        ("remove", "delete a user or client; its tokens revoked"),
    ):
        admin = sub.add_parser(command, help=what)
        admin.add_argument("name")
        data_dir(admin)

    set_password = sub.add_parser(
        "set-password", help="give a user a new password (its sessions are revoked)"
    )
    set_password.add_argument("name")
    data_dir(set_password)
    set_password.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    _password_policy_arguments(set_password)

    set_scope = sub.add_parser("set-scope", help="replace the scopes of a user or client")
    set_scope.add_argument("name")
    set_scope.add_argument("scopes", help='space-separated scopes ("" for none)')
    data_dir(set_scope)

    set_audience = sub.add_parser(
        "set-audience", help="replace the audiences a user or client may ask tokens for"
    )
    set_audience.add_argument("name")
    set_audience.add_argument("audiences", nargs="*", metavar="AUDIENCE", help=AUDIENCE_RULE)
    set_audience.add_argument(
        "--default",
        action="store_true",
        help="only the default audience of serve --audience (as when made without --audience)",
    )
    data_dir(set_audience)

    reset = sub.add_parser(
        "reset-secret", help="a new secret for a client: the old one stops working at once"
    )
    reset.add_argument("client_id")
    data_dir(reset)
    _secret_file_arguments(reset)

    keys = sub.add_parser("keys", help="list the signing keys")
    data_dir(keys)
    keys.add_argument("--json", action="store_true", help="one JSON document")

    export = sub.add_parser(
        "export-public-key",
        help="the current public key (PEM), or a JWK Set of every live public key",
    )
    data_dir(export)
    target = export.add_mutually_exclusive_group()
    target.add_argument(
        "--out", type=Path, metavar="FILE", help="write the PEM to FILE (default: stdout)"
    )
    target.add_argument(
        "--jwks",
        type=Path,
        metavar="FILE",
        help="write a JWK Set of every public key that verifies or will sign (current, "
        "pending, retiring) to FILE: give it to posts-rpc serve --verify local --jwks-file",
    )

    new_kek = sub.add_parser(
        "new-kek",
        help="write a new key-encryption key (32 random bytes) to a new file, mode 0600",
    )
    new_kek.add_argument("file", type=Path, help="the file to make (refused if it exists)")

    rewrap = sub.add_parser(
        "rewrap-keys",
        help="seal every signing key in the database again under --key-encryption-key-file "
        "(the last step of a KEK rotation)",
    )
    data_dir(rewrap)

    migrate = sub.add_parser(
        "migrate",
        help="copy a SQLite data directory's accounts, keys, tokens and revocations into an "
        "empty PostgreSQL database",
    )
    migrate.add_argument(
        "--data-dir", required=True, type=Path, help="the data directory to migrate (SQLite)"
    )
    migrate.add_argument(
        "--database-url",
        type=_database_url,
        default=os.environ.get(DATABASE_URL_ENV) or None,
        help=f"the new, empty PostgreSQL database (default: ${DATABASE_URL_ENV})",
    )
    kek_arguments(migrate)

    rotate = sub.add_parser("rotate-key", help="make a new signing key")
    data_dir(rotate)
    rotate.add_argument(
        "--alg", choices=ALGORITHMS, help="algorithm of the new key (default: current)"
    )
    when = rotate.add_mutually_exclusive_group()
    when.add_argument(
        "--activate-after",
        type=int,
        metavar="SECONDS",
        help=f"publish the key now, sign with it SECONDS later (default {KEY_ACTIVATION_DELAY_S}: "
        "what verifiers may cache the JWK Set, plus a margin)",
    )
    when.add_argument(
        "--now",
        action="store_true",
        help="sign with the new key at once: for a compromised key only (verifiers may refuse "
        "its tokens until they fetch the JWK Set again)",
    )
    return parser


def _database_url(text: str) -> str:
    try:
        return check_database_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _min_password_length(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number of characters") from None
    if not 1 <= value <= MAX_MIN_PASSWORD_CHARS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_MIN_PASSWORD_CHARS}")
    return value


def _password_policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-password-length",
        type=_min_password_length,
        default=DEFAULT_MIN_PASSWORD_CHARS,
        metavar="N",
        help=f"the shortest password accepted, in characters (default "
        f"{DEFAULT_MIN_PASSWORD_CHARS}, as NIST SP 800-63B; 1..{MAX_MIN_PASSWORD_CHARS})",
    )
    p.add_argument(
        "--password-blocklist",
        type=Path,
        metavar="FILE",
        help="refuse the passwords listed in FILE (UTF-8, one per line, case-insensitive)",
    )


def _secret_file_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--secret-file",
        type=Path,
        metavar="PATH",
        help="write the secret to PATH, a new file made 0600 (refused if it exists), "
        "instead of standard output",
    )
    p.add_argument(
        "--force", action="store_true", help="with --secret-file: replace an existing file"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _settings(args: argparse.Namespace, issuer: str) -> AuthSettings:
    return AuthSettings(
        data_dir=args.data_dir,
        issuer=issuer,
        audience=args.audience,
        alg=args.alg,
        hs256_secret_file=args.hs256_secret_file,
        access_ttl_s=args.access_ttl,
        status_list_base_url=getattr(args, "status_list_base_url", None),
        status_list_size=getattr(args, "status_list_size", 1_000_000),
        status_list_ttl_s=getattr(args, "status_list_ttl", 1),
        **_store_settings(args),
    )


def _store_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``AuthSettings`` fields of the store: database URL and key-encryption keys."""
    kek = args.key_encryption_key_file
    old = tuple(args.old_key_encryption_key_file)
    if args.database_url is None and (kek is not None or old):
        raise ValueError(
            "--key-encryption-key-file goes with --database-url (on SQLite the signing "
            "keys are files in the data directory)"
        )
    return {
        "database_url": args.database_url,
        "key_encryption_key_file": kek,
        "old_key_encryption_key_files": old,
    }


def _serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    if args.alg == "HS256" and args.hs256_secret_file is None:
        raise SystemExit("auth-rpc: error: --alg HS256 needs --hs256-secret-file")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("auth-rpc: error: --tls-cert and --tls-key go together")
    if args.workers < 1:
        raise SystemExit("auth-rpc: error: --workers must be at least 1")
    http_sock = bind_socket(args.host, args.http_port)
    thrift_sock = bind_socket(args.host, args.port)
    tls = None
    if args.tls_cert:
        tls = TLSServerConfig(args.tls_cert, args.tls_key, args.tls_client_ca)
    http_url = f"{'https' if tls else 'http'}://{args.host}:{http_sock.getsockname()[1]}"
    issuer = args.issuer or http_url
    if args.status_list_base_url is None and not issuer.startswith(("http://", "https://")):
        args.status_list_base_url = http_url  # a non-URL issuer: publish the lists here
    settings = ServerSettings(
        framed=args.framed,
        tls=tls,
        **listener_limits(args),
    )
    http_limits = HttpLimits(
        connection_limit=args.http_connection_limit,
        per_peer_limit=args.http_per_peer_limit,
        header_timeout_s=args.http_header_timeout,
        idle_timeout_s=args.http_idle_timeout,
    )

    # Pre-forked workers add up their counts through shared memory mapped now:
    # whichever worker answers GET /metrics reports the whole service.
    board = SharedBoard(args.workers) if args.workers > 1 and not args.no_metrics else None

    def start() -> Callable[[], None]:
        service = AuthService.open(_settings(args, issuer), init=args.init)
        metrics = None if args.no_metrics else ServiceMetrics(board=board, slot=worker_number())
        try:
            server = AuthServer(
                service,
                host=args.host,
                sock=thrift_sock,
                http_sock=http_sock,
                settings=settings,
                http_limits=http_limits,
                metrics=metrics,
            ).start()
        except BaseException:
            service.close()
            raise
        if metrics is not None:
            metrics.start_publishing()

        def stop() -> None:
            server.stop()
            if metrics is not None:
                metrics.stop()
            service.close()

        return stop

    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    ready = (
        f"auth-rpc ready: thrift={shown_host}:{thrift_sock.getsockname()[1]} "
        f"http={http_url} "
        f"issuer={issuer} audience={args.audience} "
        f"tls={'on' if tls else 'off'} framed={'on' if args.framed else 'off'}"
    )
    with http_sock, thrift_sock:  # closed however serving ends
        if args.workers == 1:
            return run_until_signal(ready, start())
        # Make the data dir, schema and signing key once, before the workers open them.
        AuthService.open(_settings(args, issuer), init=args.init).close()
        return run_workers(args.workers, ready, start)


def _has_terminal() -> bool:
    """Whether there is a terminal to ask on (``getpass`` reads ``/dev/tty``)."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not _has_terminal():
            raise SystemExit(
                "auth-rpc: error: no terminal to ask the password on: pass --password-stdin "
                "and give the password as the first line of standard input"
            )
        try:
            password = getpass.getpass("Password: ")
            repeated = getpass.getpass("Repeat password: ")
        except EOFError:
            raise SystemExit("auth-rpc: error: no password given") from None
        if repeated != password:
            raise SystemExit("auth-rpc: error: passwords do not match")
    if not password:
        raise SystemExit("auth-rpc: error: empty password")
    return password  # the policy is checked by the service (one place for the rules)


def _admin_service(args: argparse.Namespace, *, create: bool = False) -> AuthService:
    """The service on the data directory (or database) given, for one admin command.

    Only ``add-user`` and ``add-client`` (``create``) may start a new SQLite
    data directory: any other command on a directory without a database (a
    mistyped ``--data-dir``) is refused, where it used to create one and, for
    ``list``, show an empty table as if every account were gone.
    """
    store = _store_settings(args)
    if not create and args.database_url is None and not (args.data_dir / DB_FILENAME).exists():
        raise ValueError(
            f"no Auth database in {args.data_dir} ({DB_FILENAME} is missing): check "
            "--data-dir (add-user, add-client and serve make a new one)"
        )
    # Admin commands need no issuer: they do not mint tokens.
    return AuthService.open(
        AuthSettings(data_dir=args.data_dir, issuer="urn:auth-rpc:admin", **store),
        create_key=False,
    )


def _audiences_text(audiences: list[str] | None) -> str:
    if audiences is None:  # the default audience: said as before audiences existed
        return ""
    return " for audiences " + ", ".join(repr(a) for a in dict.fromkeys(audiences))


def _policy(args: argparse.Namespace) -> PasswordPolicy:
    """The password policy of ``add-user`` / ``set-password`` (warns below NIST's 8)."""
    if args.min_password_length < DEFAULT_MIN_PASSWORD_CHARS:
        print(
            f"auth-rpc: warning: --min-password-length {args.min_password_length} is below the "
            f"{DEFAULT_MIN_PASSWORD_CHARS} characters NIST SP 800-63B asks for",
            file=sys.stderr,
        )
    if args.password_blocklist is None:
        return PasswordPolicy(min_chars=args.min_password_length)
    return PasswordPolicy.with_blocklist_file(
        args.password_blocklist, min_chars=args.min_password_length
    )


class _SecretFile:
    """Where a new client secret goes: a file made 0600, before the secret exists.

    Without ``force`` the path itself is created with ``O_EXCL`` (an existing
    file or symbolic link is refused, so the secret never lands in a file
    others made or can read). With ``force`` a new 0600 file beside it
    replaces it once written. :meth:`discard` removes what was made when the
    command fails before the secret is known.
    """

    def __init__(self, path: Path, *, force: bool) -> None:
        self.path = path
        self._final: Path | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        target = path
        if force:
            target = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            self._final = path
        try:
            self._fd: int | None = os.open(target, flags, 0o600)
        except FileExistsError:
            raise ValueError(
                f"--secret-file {path} exists: refusing to overwrite it (--force replaces it)"
            ) from None
        self._made = target

    def write(self, secret: str) -> None:
        assert self._fd is not None
        try:
            os.write(self._fd, (secret + "\n").encode("ascii"))
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
        if self._final is not None:
            os.replace(self._made, self._final)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._made.unlink(missing_ok=True)


def _usage_error(message: str) -> NoReturn:
    print(f"auth-rpc: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _open_secret_file(args: argparse.Namespace) -> _SecretFile | None:
    if args.secret_file is None:
        if args.force:
            _usage_error("--force goes with --secret-file")
        return None
    return _SecretFile(args.secret_file, force=args.force)


def _deliver_secret(secret: str, secret_file: _SecretFile | None, message: str) -> None:
    """Print ``message``, then the secret on its own last line, or write it to the file."""
    if secret_file is None:
        print(f"{message}; its secret:")
        print(secret)
        return
    try:
        secret_file.write(secret)
    except OSError as exc:
        raise OSError(
            f"{message}, but its secret could not be written to {secret_file.path} "
            f"({exc.strerror or exc}); run auth-rpc reset-secret"
        ) from exc
    print(f"{message}; its secret is in {secret_file.path} (mode 0600)")


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _list(service: AuthService, as_json: bool) -> None:
    accounts = service.accounts()
    if as_json:
        print(json.dumps({"accounts": [
            {
                "name": a.name,
                "kind": a.kind,
                "enabled": a.disabled_at is None,
                "scopes": list(a.scopes),
                "audiences": None if a.audiences is None else list(a.audiences),
                "created_at": a.created_at,
                "disabled_at": a.disabled_at,
                **({"introspect": a.may_introspect} if a.kind == "client" else {}),
            }
            for a in accounts
        ]}, indent=2))
        return
    rows = [["NAME", "KIND", "STATUS", "CREATED (UTC)", "SCOPES", "AUDIENCES"]]
    for a in accounts:
        kind = "client+introspect" if a.may_introspect else a.kind
        rows.append([
            a.name, kind, "enabled" if a.disabled_at is None else "disabled",
            _when(a.created_at), " ".join(a.scopes) or "-",
            "(default)" if a.audiences is None else " ".join(a.audiences),
        ])
    print(_table(rows))


def _keys(service: AuthService, as_json: bool) -> None:
    keys = service.keys()
    if as_json:
        print(json.dumps({"keys": [
            {
                "kid": k.record.kid,
                "alg": k.record.alg,
                "state": k.state,
                "created_at": k.record.created_at,
                "activates_at": k.record.activates_at,
                "superseded_at": k.record.superseded_at,
                "last_token_expires_at": k.last_token_expires_at,
            }
            for k in keys
        ]}, indent=2))
        return
    if not keys:
        print("no signing keys yet: auth-rpc serve makes the first one")
        return
    rows = [["KID", "ALG", "STATE", "CREATED (UTC)", "SIGNS FROM (UTC)", "LAST TOKEN EXPIRES"]]
    for k in keys:
        r = k.record
        rows.append([
            r.kid, r.alg, k.state, _when(r.created_at),
            _when(r.activates_at if r.activates_at is not None else r.created_at),
            _when(k.last_token_expires_at),
        ])
    print(_table(rows))
    if not any(k.state == "current" for k in keys):
        print("no key signs: the service signs with an HS256 secret (serve --hs256-secret-file)")


_NO_PUBLIC_KEY = (
    "no public key signs here: the service signs with an HS256 secret (give verifiers the "
    "same file: posts-rpc serve --verify local --hs256-secret-file), or it has never been "
    "started (auth-rpc serve makes the first key)"
)


def _write_public(path: Path, data: bytes) -> None:
    """Write a public file atomically (a verifier never reads half of it), mode 0644."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _export(service: AuthService, args: argparse.Namespace) -> None:
    states = service.keys()
    current = [k for k in states if k.state == "current"]
    if args.jwks is not None:
        jwks = service.jwks()
        keys = jwks.get("keys")
        if not isinstance(keys, list) or not keys:
            raise ValueError(_NO_PUBLIC_KEY)
        _write_public(args.jwks, (json.dumps(jwks, indent=2) + "\n").encode())
        print(f"wrote {len(keys)} public key(s) to {args.jwks} (a JWK Set)")
        return
    if not current:
        raise ValueError(_NO_PUBLIC_KEY)
    pem = service.signing_key().public_pem()
    pending = [k for k in states if k.state == "pending"]
    if pending:
        print(
            f"auth-rpc: note: key {pending[-1].record.kid} signs from "
            f"{_when(pending[-1].record.activates_at)} UTC; this PEM stops verifying new tokens "
            "then: export a JWK Set (--jwks FILE) to cover both",
            file=sys.stderr,
        )
    if args.out is None:
        sys.stdout.write(pem.decode("ascii"))
        return
    _write_public(args.out, pem)
    print(f"wrote the public key of {current[0].record.kid} to {args.out}")


def _revoked_text(families: int, tokens: int) -> str:
    return f"{families} refresh token famil{'y' if families == 1 else 'ies'} and {tokens} " \
        f"access token{'' if tokens == 1 else 's'} revoked"


def _new_kek(path: Path) -> None:
    try:
        kek_id = new_kek_file(path)
    except FileExistsError:
        raise ValueError(
            f"{path} exists: refusing to overwrite a key-encryption key (the keys sealed with "
            "it would be lost)"
        ) from None
    print(f"wrote a new key-encryption key to {path} (mode 0600, id {kek_id}); give the same "
          "file to every Auth replica: --key-encryption-key-file")


def _migrate(args: argparse.Namespace) -> None:
    if args.database_url is None:
        _usage_error(f"migrate needs --database-url (or ${DATABASE_URL_ENV})")
    sealer = None
    if args.key_encryption_key_file is not None:
        sealer = KeySealer.from_files(args.key_encryption_key_file)
    done = migrate_to_postgresql(args.data_dir, args.database_url, sealer=sealer)
    print(f"migrated {args.data_dir} to {redact_url(args.database_url)}:")
    for table, rows in done.rows.items():
        print(f"  {table}: {rows}")
    if done.kek_id is not None:
        print(f"signing keys sealed with key-encryption key {done.kek_id}")
    print("start auth-rpc serve with --database-url (and --key-encryption-key-file); keep "
          f"{args.data_dir} as a backup, and do not serve from it again")


def _run(args: argparse.Namespace) -> int:
    """The admin commands (everything but serve)."""
    command = args.command
    if command == "new-kek":
        _new_kek(args.file)
        return 0
    if command == "migrate":
        _migrate(args)
        return 0
    if command == "add-user":
        policy = _policy(args)
        password = _read_password(args.password_stdin)
        with _admin_service(args, create=True) as service:
            service.add_user(
                args.name, password, args.scope.split(), audiences=args.audiences,
                password_policy=policy,
            )
        print(
            f"user {args.name!r} created with scope {args.scope!r}"
            f"{_audiences_text(args.audiences)}"
        )
        return 0
    if command == "set-password":
        policy = _policy(args)
        password = _read_password(args.password_stdin)
        with _admin_service(args) as service:
            families, tokens = service.set_password(args.name, password, password_policy=policy)
        print(f"password of user {args.name!r} set; {_revoked_text(families, tokens)}")
        return 0
    if command in ("add-client", "reset-secret"):
        name = args.client_id
        with _admin_service(args, create=command == "add-client") as service:
            secret_file = _open_secret_file(args)
            try:
                if command == "add-client":
                    secret = service.add_client(
                        name, args.scope.split(), audiences=args.audiences,
                        introspect=args.introspect,
                    )
                    message = (
                        f"client {name!r} registered with scope {args.scope!r}"
                        f"{_audiences_text(args.audiences)}"
                        f"{', may introspect tokens' if args.introspect else ''}"
                    )
                else:
                    secret, families, tokens = service.reset_client_secret(name)
                    message = (
                        f"secret of client {name!r} reset: the old one is refused from now on; "
                        f"{_revoked_text(families, tokens)}"
                    )
            except BaseException:
                if secret_file is not None:
                    secret_file.discard()
                raise
        _deliver_secret(secret, secret_file, message)
        return 0
    with _admin_service(args) as service:
        if command == "list":
            _list(service, args.json)
        elif command == "keys":
            _keys(service, args.json)
        elif command == "export-public-key":
            _export(service, args)
        elif command in ("disable", "remove"):
            verb = service.disable if command == "disable" else service.remove
            kind, families, tokens = verb(args.name)
            print(f"{kind} {args.name!r} {command}d; {_revoked_text(families, tokens)}")
        elif command == "enable":
            kind = service.enable(args.name)
            print(f"{kind} {args.name!r} enabled")
        elif command == "set-scope":
            kind = service.set_scopes(args.name, args.scopes)
            print(f"scope of {kind} {args.name!r} set to {args.scopes!r}")
        elif command == "set-audience":
            if bool(args.audiences) == args.default:
                _usage_error("set-audience needs audiences or --default (not both)")
            audiences = None if args.default else args.audiences
            kind = service.set_audiences(args.name, audiences)
            shown = "the default audience only" if audiences is None else ", ".join(
                repr(a) for a in dict.fromkeys(audiences)
            )
            print(f"audiences of {kind} {args.name!r} set to {shown}")
        elif command == "rotate-key":
            _rotate(service, args)
        elif command == "rewrap-keys":
            done = service.rewrap_keys()
            print(f"{done} signing key(s) sealed again under the key-encryption key given; "
                  "the old key-encryption key is no longer needed")
        else:  # pragma: no cover - argparse allows only the commands above
            raise AssertionError(command)
    return 0


def _rotate(service: AuthService, args: argparse.Namespace) -> None:
    delay = 0 if args.now else args.activate_after
    kid = service.rotate_key(args.alg, activate_after_s=delay)
    if delay == 0:
        print(
            f"new signing key {kid}: it signs at once (emergency rotation: verifiers "
            "may refuse its tokens until they fetch the JWK Set again); the previous "
            "key verifies until its tokens expire"
        )
    else:
        print(
            f"new signing key {kid}: published now, it signs in "
            f"{KEY_ACTIVATION_DELAY_S if delay is None else delay} s (running services "
            "switch by themselves); the previous key signs until then and verifies "
            "until its tokens expire"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        return _run(args)
    except (AuthError, ValueError, OSError) as exc:
        return report_error("auth-rpc", exc)


if __name__ == "__main__":
    sys.exit(main())
