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
    auth-rpc add-client ID --data-dir DIR [--scope "..."] [--audience AUD ...] [--introspect]

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

Exit codes: 0 success, 1 the operation failed (the message says why), 2 usage.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path

from auth_rpc import __version__
from auth_rpc.auth.accounts import AUDIENCE_RULE
from auth_rpc.auth.keys import KEY_ACTIVATION_DELAY_S
from auth_rpc.auth.server import AuthServer
from auth_rpc.auth.service import AuthService, AuthSettings
from auth_rpc.errors import AuthError
from auth_rpc.serving.httpd import HttpLimits
from auth_rpc.serving.rpc import ServerSettings, TLSServerConfig
from auth_rpc.serving.runner import (
    add_listener_arguments,
    bind_socket,
    configure_logging,
    listener_limits,
    report_error,
    run_until_signal,
    run_workers,
)

__all__ = ["main"]

DEFAULT_USER_SCOPE = "posts:read posts:write"
DEFAULT_CLIENT_SCOPE = "posts:read"
ALGORITHMS = ("EdDSA", "RS256", "ES256", "HS256")


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
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument(
        "--init",
        action="store_true",
        help="start afresh even though the database is missing or empty beside existing keys, "
        "or the keys directory holds keys the database does not know (those files are moved "
        "to DATA_DIR/keys-unknown-TIME/); every account and issued token is lost. Not needed "
        "on a new data directory",
    )

    add_user = sub.add_parser("add-user", help="create a user")
    add_user.add_argument("name")
    data_dir(add_user)
    add_user.add_argument(
        "--scope", default=DEFAULT_USER_SCOPE, help=f"default {DEFAULT_USER_SCOPE!r}"
    )
    add_user.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    audience_help = (
        "an audience the account may ask tokens for (repeat for several; default: only the "
        f"default audience of serve --audience). Names: {AUDIENCE_RULE}"
    )
    add_user.add_argument(
        "--audience", action="append", dest="audiences", metavar="AUDIENCE", help=audience_help
    )

    add_client = sub.add_parser("add-client", help="register a service client; prints its secret")
    add_client.add_argument("client_id")
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
    )


def _serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
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

    def start() -> Callable[[], None]:
        service = AuthService.open(_settings(args, issuer), init=args.init)
        try:
            server = AuthServer(
                service,
                host=args.host,
                sock=thrift_sock,
                http_sock=http_sock,
                settings=settings,
                http_limits=http_limits,
            ).start()
        except BaseException:
            service.close()
            raise

        def stop() -> None:
            server.stop()
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


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise SystemExit("auth-rpc: error: passwords do not match")
    if not password:
        raise SystemExit("auth-rpc: error: empty password")
    return password


def _admin_service(args: argparse.Namespace) -> AuthService:
    # Admin commands need no issuer: they do not mint tokens.
    return AuthService.open(
        AuthSettings(data_dir=args.data_dir, issuer="urn:auth-rpc:admin"), create_key=False
    )


def _audiences_text(audiences: list[str] | None) -> str:
    if audiences is None:  # the default audience: said as before audiences existed
        return ""
    return " for audiences " + ", ".join(repr(a) for a in dict.fromkeys(audiences))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "add-user":
            password = _read_password(args.password_stdin)
            service = _admin_service(args)
            try:
                service.add_user(args.name, password, args.scope.split(), audiences=args.audiences)
            finally:
                service.close()
            print(
                f"user {args.name!r} created with scope {args.scope!r}"
                f"{_audiences_text(args.audiences)}"
            )
            return 0
        if args.command == "add-client":
            service = _admin_service(args)
            try:
                secret = service.add_client(
                    args.client_id, args.scope.split(), audiences=args.audiences,
                    introspect=args.introspect,
                )
            finally:
                service.close()
            print(
                f"client {args.client_id!r} registered with scope {args.scope!r}"
                f"{_audiences_text(args.audiences)}"
                f"{', may introspect tokens' if args.introspect else ''}; its secret:"
            )
            print(secret)
            return 0
        if args.command == "rotate-key":
            delay = 0 if args.now else args.activate_after
            service = _admin_service(args)
            try:
                kid = service.rotate_key(args.alg, activate_after_s=delay)
            finally:
                service.close()
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
            return 0
    except (AuthError, ValueError, OSError) as exc:
        return report_error("auth-rpc", exc)
    raise AssertionError(args.command)  # argparse only allows the commands above


if __name__ == "__main__":
    sys.exit(main())
