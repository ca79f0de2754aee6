"""``posts-client``: log in to the Auth service and use the Posts service.

Usage::

    posts-client [--auth HOST:PORT] [--posts HOST:PORT] [--framed]
                 [--tls] [--tls-ca FILE] [--tls-cert FILE --tls-key FILE]
                 COMMAND ...

    login USERNAME [--password-stdin] [--json]   log in; the tokens are saved (mode 0600)
    logout [--json]                     revoke the tokens and delete the token file
    whoami [--json]                     Auth.validate of the saved token
    create --title T (--body B | --body-file F|-) [--json]
    list [--limit N] [--before ID] [--json]
    get ID [--json]
    update ID [--title T] [--body B | --body-file F|-] [--json]
    delete ID [--json]

Addresses: ``--auth`` (else ``$POSTS_CLIENT_AUTH``, else the address saved by
the last login, else ``127.0.0.1:9090``) and ``--posts`` (else
``$POSTS_CLIENT_POSTS``, else saved, else ``127.0.0.1:9091``). ``login`` looks
them up in the same order, and takes the saved connection options
(``--framed``, TLS files) too when it logs in again at the saved Auth address
without new ones; it saves what it used, so later commands (and the next
login) need none of them. Global options go before the command; ``--json``
may go before or after it. The saved tokens are only ever sent to the Auth
service they came from: with a different ``--auth``, a command says "not
logged in" instead.

JSON output (``--json``): one object; times are RFC 3339 strings in UTC with
milliseconds (``2026-11-23T14:13:21.123Z``) in the fields ``created``,
``updated`` (posts) and ``expires`` (``login``, ``whoami``). The older number
fields are kept as they were, with the units of the IDL fields they copy:
``created_at`` and ``updated_at`` in unix milliseconds (``Post``),
``whoami``'s ``expires_at`` in unix seconds (``Principal``).

The token file is ``tokens.json`` in ``$POSTS_CLIENT_CONFIG_DIR`` if set, else
in the platform's configuration directory for ``posts-client``. The directory
is made with mode 0700; an existing one of the user's own that others may
enter is tightened to 0700 (with a note on standard error), and one that
belongs to another user, or that a parent lets other users replace, is
refused (exit 1). Tokens are
refreshed shortly before they expire (and once when a call is refused as
unauthenticated), and a rotated refresh token is saved at once. Two
``posts-client`` processes refreshing the same saved login at the same moment
would present one refresh token twice, which the Auth service treats as theft
(the whole login is revoked); log in again if that happens.

Exit codes: 0 success; 1 other error (a server's internal error, an unusable
token file); 2 usage; 3 unauthenticated (including not logged in); 4
permission denied; 5 not found; 6 invalid argument; 7 unavailable (connection
refused, timeout, TLS failure, or a dependency of the service down); 8 rate
limited; 9 connection lost after the request was sent (it may have been done:
look before retrying); 130 interrupted. Expected errors print one line on
standard error: ``posts-client: error: not found: post 42``; a refusal or
failure of a server names it (``unauthenticated: invalid username or password (Auth service at
127.0.0.1:9090)``). Usage errors print the usage of the command they are
about. Tokens and passwords are never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import getpass
import json
import math
import os
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, TextIO

from thriftpy2.thrift import TApplicationException

from auth_rpc import __version__
from auth_rpc.idl import common_thrift
from auth_rpc.serving.transport import TLSClientConfig, parse_hostport
from client.config import (
    ConfigError,
    SavedLogin,
    default_config_dir,
    delete_login,
    load_login,
    save_login,
    secure_config_dir,
    token_file,
)
from client.session import (
    DEFAULT_AUTH_PORT,
    DEFAULT_POSTS_PORT,
    ClientError,
    ConnectionLost,
    Endpoint,
    NotLoggedIn,
    ProtocolError,
    Session,
    Tokens,
    TransportError,
    connect_auth,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_FORBIDDEN",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID",
    "EXIT_MAYBE_DONE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_RATE_LIMITED",
    "EXIT_UNAUTHENTICATED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "main",
]

PROG = "posts-client"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAUTHENTICATED = 3
EXIT_FORBIDDEN = 4
EXIT_NOT_FOUND = 5
EXIT_INVALID = 6
EXIT_UNAVAILABLE = 7
EXIT_RATE_LIMITED = 8
#: The request was sent and the connection broke before the reply: the server may
#: have done it. Not retryable blindly (a create would be made twice): look first.
EXIT_MAYBE_DONE = 9
EXIT_INTERRUPTED = 130

DEFAULT_AUTH = f"127.0.0.1:{DEFAULT_AUTH_PORT}"
DEFAULT_POSTS = f"127.0.0.1:{DEFAULT_POSTS_PORT}"
#: The largest page ``list_posts`` serves (docs/contract.md).
MAX_PAGE = 100

_LOGIN_HINT = f"run: {PROG} login USERNAME"


class _Failure(Exception):
    """An expected failure: one line for standard error and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- parsing


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: arguments it does not know are its own usage error.

    argparse hands everything after the command's name to the command's
    parser and, by default, lets the top-level parser report what was left
    over, with the top-level usage. Here the command's parser reports it, with
    the command's usage (``usage: posts-client get [-h] [--json] ID``).
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each command's parser by name."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Log in to the Auth service and use the Posts service.",
        epilog=(
            "exit codes: 0 ok, 1 error, 2 usage, 3 unauthenticated, 4 permission denied, "
            "5 not found, 6 invalid argument, 7 unavailable (not done), 8 rate limited, "
            "9 connection lost after sending (may have been done: look before retrying)"
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--auth", metavar="HOST:PORT",
        help=f"Auth service (default: $POSTS_CLIENT_AUTH, else the address saved by the "
        f"last login, else {DEFAULT_AUTH}; login too)",
    )
    parser.add_argument(
        "--posts", metavar="HOST:PORT",
        help=f"Posts service (default: $POSTS_CLIENT_POSTS, else the address saved by the "
        f"last login, else {DEFAULT_POSTS})",
    )
    parser.add_argument(
        "--framed", action="store_true", default=None, help="use the framed transport"
    )
    parser.add_argument(
        "--tls", action="store_true", default=None,
        help="use TLS, trusting the system's certificate authorities",
    )
    parser.add_argument("--tls-ca", metavar="FILE", help="use TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="FILE", help="client certificate's key")
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=_positive_float, default=5.0,
        help="per-call timeout (default 5)",
    )
    parser.add_argument(
        "--json", action="store_true", default=False,
        help="print JSON (for scripts); also accepted after the command",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser
    )

    login = commands.add_parser("login", help="log in and save the tokens")
    login.add_argument("username")
    login.add_argument(
        "--password-stdin", action="store_true",
        help="read the password from the first line of standard input",
    )
    _add_json(login)

    logout = commands.add_parser("logout", help="revoke the saved tokens and delete them")
    _add_json(logout)

    whoami = commands.add_parser("whoami", help="show who the saved token belongs to")
    _add_json(whoami)

    create = commands.add_parser("create", help="create a post")
    create.add_argument("--title", required=True)
    _add_body(create, required=True)
    _add_json(create)

    listing = commands.add_parser("list", help="list posts, newest first")
    listing.add_argument(
        "--limit", type=_page_size, default=None, metavar="N",
        help=f"posts per page, 1..{MAX_PAGE} (default: the server's, 20)",
    )
    listing.add_argument(
        "--before", type=_non_negative_int, default=0, metavar="ID",
        help="only posts older than ID (the next page)",
    )
    _add_json(listing)

    get = commands.add_parser("get", help="show one post")
    get.add_argument("post_id", metavar="ID", type=_positive_int)
    _add_json(get)

    update = commands.add_parser(
        "update", help="change a post's title and/or body (what is not given is kept)"
    )
    update.add_argument("post_id", metavar="ID", type=_positive_int)
    update.add_argument("--title")
    _add_body(update, required=False)
    _add_json(update)

    delete = commands.add_parser("delete", help="delete a post")
    delete.add_argument("post_id", metavar="ID", type=_positive_int)
    _add_json(delete)
    return parser, dict(commands.choices)


def _add_json(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: when absent here, the top-level ``--json`` (before the command) stands.
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS,
        help="print JSON (for scripts)",
    )


def _add_body(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--body")
    group.add_argument(
        "--body-file", metavar="FILE", help="read the body from FILE ('-': standard input)"
    )


def _whole_number(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _positive_int(text: str) -> int:
    """A post id: 0 and negative numbers get one message."""
    value = _whole_number(text)
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {2**63 - 1}")
    return value


def _page_size(text: str) -> int:
    value = _whole_number(text)
    if not 1 <= value <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_PAGE}")
    return value


def _non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"out of range: {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600")
    return value


# --------------------------------------------------------------------------- context


class _Session(Session):
    """A session that reports a failed token renewal (an Auth service error) to the CLI.

    In a Posts command an error may come from the Posts service or, while the
    tokens are renewed, from the Auth service: the message names the right one.
    """

    on_renewal_error: Callable[[BaseException], None] | None = None

    def _renew_locked(self, tokens: Tokens) -> Tokens:
        try:
            return super()._renew_locked(tokens)
        except Exception as exc:
            if self.on_renewal_error is not None:
                self.on_renewal_error(exc)
            raise


@dataclasses.dataclass
class _Context:
    args: argparse.Namespace
    env: Mapping[str, str]
    path: Path
    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    parser: argparse.ArgumentParser
    command_parser: argparse.ArgumentParser
    #: The server a command is talking to, named in its errors ("Posts service at H:P").
    asked: str | None = None
    #: An error of the Auth service while renewing tokens in a Posts command (named as such).
    renewal_error: BaseException | None = None
    #: The Auth address of the saved login in use.
    session_auth: str | None = None
    #: TLS is in use without a client certificate (a mutual-TLS server refuses that).
    tls_without_cert: bool = False

    def usage(self, message: str) -> NoReturn:
        """A usage error of the command: its own usage, then exit 2."""
        self.command_parser.error(message)

    def check_options(self) -> None:
        """Usage errors in the global options, before anything else happens."""
        args = self.args
        if bool(args.tls_cert) != bool(args.tls_key):
            self.parser.error("--tls-cert and --tls-key go together")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(args, name)
            if value is not None and not os.path.isfile(value):
                self.parser.error(f"--{name.replace('_', '-')}: no such file: {value}")
        for which in ("auth", "posts"):
            for source, value in (
                (f"--{which}", getattr(args, which)),
                (f"$POSTS_CLIENT_{which.upper()}", self.env.get(f"POSTS_CLIENT_{which.upper()}")),
            ):
                if value:
                    try:
                        parse_hostport(value)
                    except ValueError as exc:
                        self.parser.error(f"{source}: {exc}")

    # -- connection settings: flag, then environment, then the saved login, then default

    def address(self, which: str, saved: SavedLogin | None) -> str:
        flag = getattr(self.args, which)
        env = self.env.get(f"POSTS_CLIENT_{which.upper()}")
        saved_value = getattr(saved, which) if saved is not None else None
        default = DEFAULT_AUTH if which == "auth" else DEFAULT_POSTS
        value = flag or env or saved_value or default
        try:
            host, port = parse_hostport(value)
        except ValueError as exc:
            source = f"--{which}" if flag else f"$POSTS_CLIENT_{which.upper()}" if env else which
            self.parser.error(f"{source}: {exc}")
        return Endpoint(host=host, port=port).address

    def connection_options(self, saved: SavedLogin | None) -> dict[str, Any]:
        args = self.args
        explicit_tls = args.tls or args.tls_ca or args.tls_cert
        if explicit_tls or saved is None:
            ca, cert, key = args.tls_ca, args.tls_cert, args.tls_key
            use_tls = bool(explicit_tls)
        else:
            ca, cert, key = saved.tls_ca, saved.tls_cert, saved.tls_key
            use_tls = bool(ca or cert)
        framed = args.framed if args.framed is not None else bool(saved and saved.framed)
        return {
            "framed": framed,
            "tls_ca": ca if use_tls else None,
            "tls_cert": cert if use_tls else None,
            "tls_key": key if use_tls else None,
            "use_tls": use_tls,
        }

    def endpoint(self, address: str, options: Mapping[str, Any]) -> Endpoint:
        tls = None
        if options["use_tls"]:
            self.tls_without_cert = not options["tls_cert"]
            tls = TLSClientConfig(
                ca_file=options["tls_ca"], cert_file=options["tls_cert"],
                key_file=options["tls_key"],
            )
        return Endpoint.parse(
            address, tls=tls, framed=options["framed"], timeout_s=self.args.timeout,
        )

    # -- the saved login

    def load(self) -> SavedLogin | None:
        return load_login(self.path)

    def session(self) -> tuple[Session, SavedLogin, Endpoint]:
        """The saved login as a session, and the Posts endpoint to use with it."""
        saved = self.load()
        if saved is None:
            raise NotLoggedIn(f"not logged in; {_LOGIN_HINT}")
        auth = self.address("auth", saved)
        if auth != saved.auth:
            # The tokens go only to the Auth service that issued them.
            raise NotLoggedIn(f"not logged in at {auth} (logged in at {saved.auth}); {_LOGIN_HINT}")
        options = self.connection_options(saved)
        posts_endpoint = self.endpoint(self.address("posts", saved), options)
        tokens = Tokens(
            access_token=saved.access_token,
            refresh_token=saved.refresh_token,
            expires_at=saved.expires_at,
            lifetime_s=saved.lifetime_s,
            scope=saved.scope,
        )
        current = [saved]

        def _save(new: Tokens) -> None:
            # Rotation: the old refresh token is dead now; keep the new one at once.
            updated = dataclasses.replace(
                current[0],
                access_token=new.access_token,
                refresh_token=new.refresh_token or current[0].refresh_token,
                expires_at=new.expires_at,
                lifetime_s=new.lifetime_s,
                scope=new.scope or current[0].scope,
            )
            save_login(self.path, updated)
            current[0] = updated

        session = _Session(self.endpoint(auth, options), tokens, on_tokens=_save)
        self.session_auth = auth
        session.on_renewal_error = self._renewal_failed
        return session, saved, posts_endpoint

    def _renewal_failed(self, exc: BaseException) -> None:
        self.renewal_error = exc

    def ask(self, endpoint: Endpoint | str, service: str) -> None:
        """Name the server the next calls go to, for the error messages."""
        address = endpoint.address if isinstance(endpoint, Endpoint) else endpoint
        self.asked = f"{service} service at {address}"

    def print(self, text: str = "") -> None:
        print(text, file=self.stdout)

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    def print_json(self, value: object) -> None:
        json.dump(value, self.stdout, indent=2, ensure_ascii=False)
        self.stdout.write("\n")

    def note(self, text: str) -> None:
        print(f"{PROG}: {_printable(text)}", file=self.stderr)


# --------------------------------------------------------------------------- commands


def _cmd_login(ctx: _Context) -> int:
    args = ctx.args
    try:
        previous = ctx.load()
    except ConfigError:
        previous = None  # replaced below
    # As every command: a flag, else the environment, else the last login, else the default.
    auth = ctx.address("auth", previous)
    posts = ctx.address("posts", previous)
    # The saved TLS files and framing belong to the saved Auth address.
    same_server = previous is not None and previous.auth == auth
    options = ctx.connection_options(previous if same_server else None)
    password = _read_password(ctx, args.username)
    ctx.ask(auth, "Auth")
    session = Session.login(ctx.endpoint(auth, options), args.username, password)
    del password
    tokens = session.tokens
    save_login(
        ctx.path,
        SavedLogin(
            auth=auth,
            posts=posts,
            subject=args.username,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            expires_at=tokens.expires_at,
            lifetime_s=tokens.lifetime_s,
            scope=tokens.scope,
            framed=options["framed"],
            tls_ca=_absolute(options["tls_ca"]),
            tls_cert=_absolute(options["tls_cert"]),
            tls_key=_absolute(options["tls_key"]),
        ),
    )
    if previous is not None and previous.auth == auth and previous.refresh_token:
        _revoke_quietly(ctx.endpoint(auth, options), previous.refresh_token)
    if ctx.json:
        ctx.print_json({
            "subject": args.username,
            "scopes": tokens.scope.split(),
            "expires": _rfc3339(round(tokens.expires_at * 1000)),
            "auth": auth,
            "posts": posts,
        })
        return EXIT_OK
    ctx.print(
        f"logged in as {_printable(args.username)} at {auth} "
        f"(scope: {_printable(tokens.scope) or '-'}; "
        f"access token valid for {_duration(tokens.lifetime_s)})"
    )
    return EXIT_OK


def _read_password(ctx: _Context, username: str) -> str:
    if ctx.args.password_stdin:
        line = ctx.stdin.readline()
        if not line:
            raise _Failure(EXIT_INVALID, "no password on standard input")
        return line.rstrip("\r\n")
    try:
        return getpass.getpass(f"Password for {username}: ")
    except EOFError:
        raise _Failure(EXIT_INVALID, "no password given") from None


def _revoke_quietly(endpoint: Endpoint, token: str) -> None:
    """Best effort: revoke the refresh token of a login being replaced."""
    try:
        with connect_auth(
            endpoint.host, endpoint.port, tls=endpoint.tls, framed=endpoint.framed,
            timeout_s=endpoint.timeout_s, connect_timeout_s=endpoint.connect_timeout_s,
        ) as client:
            client.revoke(token)
    except (ClientError, common_thrift.InvalidArgument, common_thrift.Unavailable):
        pass


def _cmd_logout(ctx: _Context) -> int:
    saved = ctx.load()
    if saved is None:
        if ctx.json:
            ctx.print_json({"logged_out": False, "subject": None})
        else:
            ctx.note("not logged in; nothing to do")
        return EXIT_OK
    session, _, _ = ctx.session()
    ctx.ask(session.auth, "Auth")
    try:
        session.logout()
    except (ClientError, common_thrift.Unavailable, common_thrift.InvalidArgument) as exc:
        delete_login(ctx.path)
        code, message = _describe(exc, ctx)
        raise _Failure(
            code, f"the saved tokens are deleted, but could not be revoked: {message}"
        ) from exc
    delete_login(ctx.path)
    if ctx.json:
        ctx.print_json({"logged_out": True, "subject": saved.subject})
    else:
        ctx.print(f"logged out ({_printable(saved.subject)})")
    return EXIT_OK


def _cmd_whoami(ctx: _Context) -> int:
    session, saved, _ = ctx.session()
    ctx.ask(session.auth, "Auth")
    principal = session.validate()
    scopes = [str(s) for s in (principal.scopes or [])]
    info = {
        "subject": principal.subject,
        "scopes": scopes,
        "expires": _rfc3339(principal.expires_at * 1000),
        "expires_at": principal.expires_at,  # unix seconds, as Principal.expires_at
        "client_id": principal.client_id or "",
        "token_id": principal.token_id or "",
        "auth": saved.auth,
    }
    if ctx.json:
        ctx.print_json(info)
        return EXIT_OK
    left = principal.expires_at - time.time()
    ctx.print(f"subject:  {_printable(principal.subject)}")
    ctx.print(f"scopes:   {_printable(' '.join(scopes)) or '-'}")
    ctx.print(
        f"expires:  {_utc(principal.expires_at)} UTC (in {_duration(max(left, 0))})"
    )
    if principal.client_id:
        ctx.print(f"client:   {_printable(principal.client_id)}")
    ctx.print(f"auth:     {saved.auth}")
    return EXIT_OK


def _cmd_create(ctx: _Context) -> int:
    body = _read_body(ctx)
    session, _, endpoint = ctx.session()
    ctx.ask(endpoint, "Posts")
    with session.posts(endpoint) as posts:
        post = posts.create_post(title=ctx.args.title, body=body)
    if ctx.json:
        ctx.print_json(_post_json(post))
    else:
        ctx.print(f"created post {post.id}")
    return EXIT_OK


def _cmd_list(ctx: _Context) -> int:
    session, _, endpoint = ctx.session()
    ctx.ask(endpoint, "Posts")
    with session.posts(endpoint) as posts:
        page = posts.list_posts(limit=ctx.args.limit or 0, before_id=ctx.args.before)
    items = list(page.posts or [])
    if ctx.json:
        ctx.print_json(
            {"posts": [_post_json(p) for p in items], "next_before_id": page.next_before_id or 0}
        )
        return EXIT_OK
    if not items:
        ctx.print("(no posts)")
    else:
        rows = [
            (str(p.id), _cell(p.author, 20), _utc(p.updated_at / 1000), _cell(p.title, 60))
            for p in items
        ]
        header = ("ID", "AUTHOR", "UPDATED (UTC)", "TITLE")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
        for row in [header, *rows]:
            ctx.print(
                f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}"
            )
    if page.next_before_id:
        ctx.note(f"more: {PROG} list --before {page.next_before_id}")
    return EXIT_OK


def _cmd_get(ctx: _Context) -> int:
    session, _, endpoint = ctx.session()
    ctx.ask(endpoint, "Posts")
    with session.posts(endpoint) as posts:
        post = posts.get_post(post_id=ctx.args.post_id)
    if ctx.json:
        ctx.print_json(_post_json(post))
        return EXIT_OK
    ctx.print(f"id:       {post.id}")
    ctx.print(f"author:   {_printable(post.author)}")
    ctx.print(f"title:    {_printable(post.title)}")
    ctx.print(f"created:  {_utc(post.created_at / 1000)} UTC")
    ctx.print(f"updated:  {_utc(post.updated_at / 1000)} UTC")
    ctx.print()
    ctx.print(_printable(post.body or "", keep_newlines=True))
    return EXIT_OK


def _cmd_update(ctx: _Context) -> int:
    args = ctx.args
    if args.title is None and args.body is None and args.body_file is None:
        ctx.usage("update: give --title, --body or --body-file")
    body = _read_body(ctx) if args.body is not None or args.body_file is not None else None
    session, _, endpoint = ctx.session()
    ctx.ask(endpoint, "Posts")
    with session.posts(endpoint) as posts:
        title = args.title
        if title is None or body is None:
            current = posts.get_post(post_id=args.post_id)
            title = current.title if title is None else title
            body = current.body if body is None else body
        post = posts.update_post(post_id=args.post_id, title=title, body=body)
    if ctx.json:
        ctx.print_json(_post_json(post))
    else:
        ctx.print(f"updated post {post.id}")
    return EXIT_OK


def _cmd_delete(ctx: _Context) -> int:
    session, _, endpoint = ctx.session()
    ctx.ask(endpoint, "Posts")
    with session.posts(endpoint) as posts:
        posts.delete_post(post_id=ctx.args.post_id)
    if ctx.json:
        ctx.print_json({"deleted": ctx.args.post_id})
    else:
        ctx.print(f"deleted post {ctx.args.post_id}")
    return EXIT_OK


def _naming_the_post(command: Callable[[_Context], int]) -> Callable[[_Context], int]:
    """``not found: post 42`` rather than the server's generic message."""

    @functools.wraps(command)
    def run(ctx: _Context) -> int:
        try:
            return command(ctx)
        except common_thrift.NotFound as exc:
            raise _Failure(EXIT_NOT_FOUND, f"not found: post {ctx.args.post_id}") from exc

    return run


_COMMANDS: dict[str, Callable[[_Context], int]] = {
    "login": _cmd_login,
    "logout": _cmd_logout,
    "whoami": _cmd_whoami,
    "create": _cmd_create,
    "list": _cmd_list,
    "get": _naming_the_post(_cmd_get),
    "update": _naming_the_post(_cmd_update),
    "delete": _naming_the_post(_cmd_delete),
}


def _read_body(ctx: _Context) -> str:
    args = ctx.args
    if args.body is not None:
        return str(args.body)
    if args.body_file == "-":
        return ctx.stdin.read()
    try:
        with open(args.body_file, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise _Failure(EXIT_INVALID, f"cannot read {args.body_file}: {reason.lower()}") from exc


# --------------------------------------------------------------------------- output helpers


def _post_json(post: Any) -> dict[str, Any]:
    return {
        "id": post.id,
        "author": post.author,
        "title": post.title,
        "body": post.body,
        "created": _rfc3339(post.created_at),
        "updated": _rfc3339(post.updated_at),
        "created_at": post.created_at,  # unix milliseconds, as Post.created_at
        "updated_at": post.updated_at,
    }


def _printable(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with control characters (terminal escapes) replaced, for display."""
    allowed = "\n\t" if keep_newlines else ""
    return "".join(
        c if c.isprintable() or c in allowed else "\N{REPLACEMENT CHARACTER}" for c in str(text)
    )


def _cell(text: str, width: int) -> str:
    text = _printable(text or "")
    return text if len(text) <= width else text[: width - 1] + "\N{HORIZONTAL ELLIPSIS}"


def _utc(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "?"


def _rfc3339(milliseconds: int) -> str | None:
    """``2026-11-23T14:13:21.123Z``: the one time format of the JSON output (UTC, ms).

    ``None`` (JSON ``null``) for a time that cannot be shown.
    """
    try:
        whole = datetime.fromtimestamp(int(milliseconds) // 1000, tz=timezone.utc)
    except (OverflowError, OSError, ValueError, TypeError):
        return None
    return whole.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(milliseconds) % 1000:03d}Z"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


# --------------------------------------------------------------------------- errors


def _message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return _printable(str(text))


def _describe(exc: BaseException, ctx: _Context | None = None) -> tuple[int, str]:
    """The exit code and one-line message for an expected failure.

    A server's refusal names the server (``(Auth service at 127.0.0.1:9090)``);
    transport errors name the address in their own message.
    """
    server = None
    if ctx is not None:
        renewing = ctx.renewal_error is not None and exc is ctx.renewal_error
        if renewing and ctx.session_auth is not None:
            server = f"Auth service at {ctx.session_auth}"
        else:
            server = ctx.asked
    at = f" ({server})" if server else ""
    if isinstance(exc, _Failure):
        return exc.code, _printable(exc.message)
    if isinstance(exc, NotLoggedIn):
        return EXIT_UNAUTHENTICATED, _message(exc)
    if isinstance(exc, common_thrift.Unauthenticated):
        if ctx is not None and ctx.args.command == "login":
            return EXIT_UNAUTHENTICATED, f"unauthenticated: {_message(exc)}{at}"
        where = f"{server}; " if server else ""
        return EXIT_UNAUTHENTICATED, f"unauthenticated: {_message(exc)} ({where}{_LOGIN_HINT})"
    if isinstance(exc, common_thrift.PermissionDenied):
        return EXIT_FORBIDDEN, f"permission denied: {_message(exc)}{at}"
    if isinstance(exc, common_thrift.NotFound):
        return EXIT_NOT_FOUND, f"not found: {_message(exc)}"
    if isinstance(exc, common_thrift.InvalidArgument):
        return EXIT_INVALID, f"invalid argument: {_message(exc)}"
    if isinstance(exc, common_thrift.Unavailable):
        return EXIT_UNAVAILABLE, f"unavailable: {_message(exc)}{at}"
    if isinstance(exc, ConnectionLost):  # before TransportError, its base
        return EXIT_MAYBE_DONE, f"connection lost: {_message(exc)}"
    if isinstance(exc, TransportError):
        return EXIT_UNAVAILABLE, f"unavailable: {_message(exc)}{_tls_hint(exc, ctx)}"
    if isinstance(exc, common_thrift.RateLimited):
        # Whole seconds, rounded up: waiting the time shown is always enough.
        wait_s = math.ceil(max(int(exc.retry_after_ms or 0), 0) / 1000)
        where = f"{server}; " if server else ""
        return EXIT_RATE_LIMITED, f"rate limited: {_message(exc)} ({where}retry after {wait_s} s)"
    if isinstance(exc, TApplicationException):
        return EXIT_ERROR, f"server error: {_message(exc)}{at}"
    if isinstance(exc, (ProtocolError, ConfigError, ClientError)):
        return EXIT_ERROR, _message(exc)
    if isinstance(exc, OSError):
        return EXIT_ERROR, f"{_printable(exc.strerror or str(exc))}"
    raise exc


def _tls_hint(exc: BaseException, ctx: _Context | None) -> str:
    """Advice when a TLS connection without a client certificate was cut by the server.

    A server that requires client certificates (mutual TLS) ends the handshake
    with an alert, or closes the connection as the first request is written
    (TLS 1.3), so the client sees a TLS error or an unexpected end of file;
    a server certificate that fails verification is another matter.
    """
    if ctx is None or not ctx.tls_without_cert:
        return ""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return ""
        if isinstance(cause, ssl.SSLError) and "CERTIFICATE_REQUIRED" in str(cause.reason):
            return "; the server requires a client certificate: pass --tls-cert/--tls-key"
        if isinstance(cause, (ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            return "; if the server requires a client certificate, pass --tls-cert/--tls-key"
        cause = cause.__cause__ or cause.__context__
    return ""


_EXPECTED = (
    _Failure,
    ClientError,
    ConfigError,
    TApplicationException,
    OSError,
    common_thrift.Unauthenticated,
    common_thrift.PermissionDenied,
    common_thrift.NotFound,
    common_thrift.InvalidArgument,
    common_thrift.Unavailable,
    common_thrift.RateLimited,
)


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``posts-client``; returns the exit code (see the module docstring)."""
    env = os.environ if env is None else env
    parser, command_parsers = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    configured = env.get("POSTS_CLIENT_CONFIG_DIR")
    config_dir = Path(configured) if configured else default_config_dir()
    ctx = _Context(
        args=args,
        env=env,
        path=token_file(config_dir),
        stdin=stdin or sys.stdin,
        stdout=stdout or sys.stdout,
        stderr=stderr or sys.stderr,
        parser=parser,
        command_parser=command_parsers[args.command],
    )
    try:
        ctx.check_options()
        if secure_config_dir(config_dir):
            ctx.note(f"restricted {config_dir} to its owner (mode 0700)")
        return _COMMANDS[args.command](ctx)
    except SystemExit as exc:  # ctx.usage()
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=ctx.stderr)
        return EXIT_INTERRUPTED
    except _EXPECTED as exc:
        code, message = _describe(exc, ctx)
        print(f"{PROG}: error: {message}", file=ctx.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
