"""pytest plugin, Auth side: in-process Auth servers, a token factory, verifiers.

Loaded automatically (``pytest11`` entry point) once the package is installed;
every fixture is function-scoped and starts its servers on free ports
(``port=0``) in background threads with a temporary data directory, waits for
them without sleeping (the listening socket is bound before ``start()``
returns), and stops and joins them at teardown. Nothing here knows a
particular service: issuer, audience and scopes come from the Auth server in
use or from the test. This module imports neither :mod:`posts_rpc` nor
:mod:`client`; their fixtures live in :mod:`posts_rpc.testing` (the Posts
service) and :mod:`client.testing` (logged-in sessions), plugins of their own.

Fixtures:

``auth_server``
    A started :class:`auth_rpc.auth.server.AuthServer` (EdDSA, issuer
    :data:`ISSUER`, audience :data:`AUDIENCE`); ``.service``, ``.port``,
    ``.http_url``, ``.jwks_url``, ``.introspect_url``. Override it to protect
    your own service::

        @pytest.fixture
        def auth_server(make_auth_server):
            return make_auth_server(audience="notes")

    and ``token_factory``, ``make_verifier`` (and the Posts fixtures) follow.
``make_auth_server``
    ``make_auth_server(alg=..., framed=..., audience=..., issuer=...,
    access_ttl_s=..., settings=...)`` for more, or differently configured,
    Auth servers.
``make_user`` / ``make_client``
    Create a user (``make_user(name, password, scopes=...)``) or a service
    client (``make_client(client_id, scopes=..., introspect=False) -> secret``;
    ``introspect=True``: it may introspect tokens) in ``auth_server`` (or
    ``service=``).
``auth_client``
    A thriftpy2 client of ``auth_server``.
``token_factory``
    A :class:`TokenFactory` that mints access tokens signed with
    ``auth_server``'s current key, for its issuer and audience, with chosen
    subject, scopes (none unless given), lifetime, audience, issuer, key,
    headers and claims; ``expired(...)`` and ``forged(...)`` take the same
    arguments and spoil only one thing.
``make_verifier``
    ``make_verifier(mode, *, audience=None, auth=None, cache_ttl_s=None,
    client_id=..., client_secret=None, **settings) -> TokenVerifier``: a
    verifier of ``auth_server``'s tokens (or ``auth=``'s) for your service, in
    any of :data:`VERIFIER_MODES`; closed at teardown. Parametrize a test over
    the four modes with ``@pytest.mark.parametrize("mode", VERIFIER_MODES)``.
``serve_thrift``
    ``serve_thrift(service, handler, **settings)`` serves *your* Thrift
    service in-process and returns the started
    :class:`auth_rpc.serving.rpc.RpcServer`.
``key_encryption_key_file``
    A new key-encryption key file (32 random bytes, 0600): give it to Auth
    replicas on PostgreSQL (``postgresql_url``), which seal their signing keys
    in the database with it.
``make_haproxy``
    ``make_haproxy({listener: [(host, port), ...]}, kinds=None, start=True)``:
    HAProxy (:mod:`auth_rpc.serving.haproxy`, the configuration of
    ``deploy/haproxy.cfg``) on free ports in front of replicas, with
    Thrift-level health checks; skipped when HAProxy is not installed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import pytest

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from auth_rpc.auth.keys import SigningKey
    from auth_rpc.auth.server import AuthServer
    from auth_rpc.auth.service import AuthService
    from auth_rpc.serving.rpc import RpcServer
    from auth_rpc.verify.principal import TokenVerifier

__all__ = [
    "AUDIENCE",
    "EXPIRED_FOR_S",
    "INTROSPECT_CLIENT_ID",
    "ISSUER",
    "VERIFIER_MODES",
    "MintOptions",
    "TokenFactory",
    "default_scopes",
]

#: The issuer and audience of ``auth_server`` unless overridden
#: (``make_auth_server(issuer=..., audience=...)``).
ISSUER = "http://auth.test"
AUDIENCE = "posts"

#: The verification modes of :func:`auth_rpc.verify.verifiers.make_verifier`, for
#: ``@pytest.mark.parametrize("mode", VERIFIER_MODES)`` with the ``make_verifier`` fixture.
VERIFIER_MODES: tuple[str, ...] = ("local", "jwks", "introspect", "thrift")

#: The service client ``make_verifier("introspect")`` registers unless given one.
INTROSPECT_CLIENT_ID = "introspecting-service"

#: How long before ``now`` a :meth:`TokenFactory.expired` token expired (past any leeway).
EXPIRED_FOR_S = 3600

# The scopes ``make_user`` and ``make_client`` grant unless told, when the Auth
# server's default audience is the Posts example's (``posts``); for any other
# audience, none: a test of another service names its own scopes.
_POSTS_USER_SCOPES = ("posts:read", "posts:write")
_POSTS_CLIENT_SCOPES = ("posts:read",)


def default_scopes(service: AuthService, *, client: bool = False) -> tuple[str, ...]:
    """The scopes the account fixtures grant unless told: the Posts example's when
    ``service``'s default audience is ``posts``, else none."""
    if service.settings.audience != "posts":
        return ()
    return _POSTS_CLIENT_SCOPES if client else _POSTS_USER_SCOPES


class MintOptions(TypedDict, total=False):
    """The keyword arguments of :meth:`TokenFactory.mint`, which every bad-token helper takes."""

    ttl_s: int
    key: SigningKey | None
    issuer: str | None
    audience: str | list[str] | None
    client_id: str
    now: float | None
    jti: str | None
    headers: dict[str, Any] | None
    claims: dict[str, Any] | None


@dataclass
class TokenFactory:
    """Mints RFC 9068 access tokens for tests.

    ``issuer`` and ``audience`` are those the tokens claim unless a call says
    otherwise; :meth:`for_auth_server` takes them, and ``key``, from an Auth
    server, so that tokens pass every verifier configured for it. Pass another
    :class:`auth_rpc.auth.keys.SigningKey` (``TokenFactory.new_key("RS256")``)
    to make tokens from a foreign issuer. ``scopes`` are the scopes a token
    gets when the call names none (none by default).

    The bad-token helpers (:meth:`expired`, :meth:`forged`) take the same
    arguments as :meth:`mint` and spoil one thing only, so a test can refuse
    a token that would otherwise be valid for its service.
    """

    key: SigningKey
    issuer: str
    audience: str
    scopes: tuple[str, ...] = ()
    clock: Callable[[], float] = time.time
    minted: list[str] = field(default_factory=list, repr=False)
    #: ``status(exp) -> claim``: a fresh Token Status List entry for each token
    #: (:meth:`for_auth_server` takes the Auth service's, so that its tokens pass
    #: the local and jwks verifiers and can be revoked); ``None``: no ``status``.
    status: Callable[[int], dict[str, object]] | None = None

    @classmethod
    def for_auth_server(cls, auth: AuthServer, **fields: Any) -> TokenFactory:
        """A factory of ``auth``'s tokens: its current signing key, issuer and audience."""
        service = auth.service
        fields.setdefault("key", service.signing_key())
        fields.setdefault("issuer", service.settings.issuer)
        fields.setdefault("audience", service.settings.audience)
        fields.setdefault("status", service.allocate_status)
        return cls(**fields)

    @staticmethod
    def new_key(alg: str = "EdDSA", *, kid: str | None = None) -> SigningKey:
        from auth_rpc.auth.keys import SigningKey

        return SigningKey.generate(alg, kid=kid)

    @staticmethod
    def kid_of(token: str) -> str:
        """The ``kid`` header of ``token`` (unverified)."""
        import jwt

        kid: str = jwt.get_unverified_header(token)["kid"]
        return kid

    def mint(
        self,
        subject: str = "alice",
        scopes: Iterable[str] | str | None = None,
        *,
        ttl_s: int = 300,
        key: SigningKey | None = None,
        issuer: str | None = None,
        audience: str | list[str] | None = None,
        client_id: str = "test-client",
        now: float | None = None,
        jti: str | None = None,
        headers: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """A signed access token; ``claims={"exp": None}`` removes a claim.

        ``scopes`` defaults to the factory's :attr:`scopes` (none unless
        given). ``now`` shifts the issue time (``now=time.time() - 3600`` with
        ``ttl_s=60`` gives an expired token: :meth:`expired` does that). The
        token gets a fresh Token Status List entry of the Auth service
        (:attr:`status`) unless ``claims`` names ``status`` (``None``: none).
        """
        from auth_rpc.auth.tokens import mint_access_token

        issued = self.clock() if now is None else now
        if self.status is not None and "status" not in (claims or {}):
            claims = {"status": self.status(int(issued) + int(ttl_s)), **(claims or {})}

        token = mint_access_token(
            key or self.key,
            issuer=self.issuer if issuer is None else issuer,
            audience=self.audience if audience is None else audience,
            subject=subject,
            scopes=self.scopes if scopes is None else scopes,
            client_id=client_id,
            ttl_s=ttl_s,
            now=issued,
            jti=jti,
            headers=headers,
            claims=claims,
        )
        self.minted.append(token)
        return token

    def expired(
        self,
        subject: str = "alice",
        scopes: Iterable[str] | str | None = None,
        **options: Unpack[MintOptions],
    ) -> str:
        """The token :meth:`mint` would make, except that it expired :data:`EXPIRED_FOR_S`
        (an hour) before ``now`` - well past any leeway - after living ``ttl_s`` (60 s)."""
        ttl_s = options.get("ttl_s", 60)
        now = options.get("now")
        expires = (self.clock() if now is None else now) - EXPIRED_FOR_S
        spoiled: MintOptions = {**options, "ttl_s": ttl_s, "now": expires - ttl_s}
        return self.mint(subject, scopes, **spoiled)

    def forged(
        self,
        subject: str = "alice",
        scopes: Iterable[str] | str | None = None,
        **options: Unpack[MintOptions],
    ) -> str:
        """The token :meth:`mint` would make, except that it is signed by a new key that
        claims the real key's ``kid`` and algorithm: only the signature is wrong."""
        real = options.get("key") or self.key
        spoiled: MintOptions = {**options, "key": self.new_key(real.alg, kid=real.kid)}
        return self.mint(subject, scopes, **spoiled)


def _auth_settings(data_dir: Path, **overrides: Any) -> Any:
    from auth_rpc.auth.service import AuthSettings

    settings = AuthSettings(data_dir=data_dir, issuer=ISSUER, audience=AUDIENCE)
    return replace(settings, **overrides)


@pytest.fixture
def make_auth_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., AuthServer]]:
    """Start Auth servers: ``make_auth_server(alg=..., framed=..., **auth_settings)``.

    ``metrics=False`` starts one without metrics (``/metrics`` 404), as
    ``auth-rpc serve --no-metrics``; by default it counts and serves them.
    """
    from auth_rpc.auth.server import AuthServer
    from auth_rpc.auth.service import AuthService
    from auth_rpc.serving.metrics import ServiceMetrics
    from auth_rpc.serving.rpc import ServerSettings
    from auth_rpc.serving.runner import bind_socket

    started: list[tuple[AuthServer, AuthService]] = []

    def make(
        *,
        data_dir: Path | None = None,
        framed: bool = False,
        settings: ServerSettings | None = None,
        port: int = 0,
        http_port: int = 0,
        metrics: bool = True,
        **auth_settings: Any,
    ) -> AuthServer:
        directory = data_dir or tmp_path_factory.mktemp("auth-data")
        server_settings = settings or ServerSettings(framed=framed)
        # The HTTP port first: the Status Lists are published there (the
        # issuer, http://auth.test, is a name, not a place to fetch them from).
        http_sock = bind_socket("127.0.0.1", http_port)
        scheme = "https" if server_settings.tls is not None else "http"
        auth_settings.setdefault(
            "status_list_base_url", f"{scheme}://127.0.0.1:{http_sock.getsockname()[1]}"
        )
        try:
            service = AuthService.open(_auth_settings(directory, **auth_settings))
        except BaseException:
            http_sock.close()
            raise
        server = AuthServer(
            service,
            port=port,
            http_sock=http_sock,
            settings=server_settings,
            metrics=ServiceMetrics() if metrics else None,
        ).start()
        started.append((server, service))
        return server

    yield make
    for server, service in reversed(started):
        server.stop(grace_s=2.0)
        service.close()


@pytest.fixture
def auth_server(make_auth_server: Callable[..., AuthServer]) -> AuthServer:
    """A started Auth service (Thrift and HTTP) on free ports with a fresh data dir."""
    return make_auth_server()


@pytest.fixture
def make_user(auth_server: AuthServer) -> Callable[..., None]:
    """``make_user(name, password, scopes=None, service=None)``.

    Without ``scopes``: ``posts:read posts:write`` where the Auth service's default
    audience is ``posts`` (the example service), no scope otherwise.
    """

    def make(
        name: str,
        password: str,
        scopes: Iterable[str] | str | None = None,
        *,
        service: AuthService | None = None,
    ) -> None:
        target = service or auth_server.service
        if scopes is None:
            scopes = default_scopes(target)
        scope_list = scopes.split() if isinstance(scopes, str) else list(scopes)
        target.add_user(name, password, scope_list)

    return make


@pytest.fixture
def make_client(auth_server: AuthServer) -> Callable[..., str]:
    """``make_client(client_id, scopes=None, service=None, introspect=False) -> secret``.

    Without ``scopes``: ``posts:read`` where the Auth service's default audience
    is ``posts``, no scope otherwise. ``introspect=True`` gives the client the
    permission to introspect tokens.
    """

    def make(
        client_id: str,
        scopes: Iterable[str] | str | None = None,
        *,
        service: AuthService | None = None,
        introspect: bool = False,
    ) -> str:
        target = service or auth_server.service
        if scopes is None:
            scopes = default_scopes(target, client=True)
        scope_list = scopes.split() if isinstance(scopes, str) else list(scopes)
        secret: str = target.add_client(client_id, scope_list, introspect=introspect)
        return secret

    return make


@pytest.fixture
def auth_client(auth_server: AuthServer) -> Iterator[Any]:
    """A thriftpy2 client of ``auth_server``'s Thrift port."""
    from auth_rpc.idl import auth_thrift
    from auth_rpc.serving.transport import open_client

    client = open_client(auth_thrift.Auth, "127.0.0.1", auth_server.port)
    yield client
    client.close()


@pytest.fixture
def token_factory(auth_server: AuthServer) -> TokenFactory:
    """Mints tokens of ``auth_server``: its current signing key, issuer and audience; no scopes."""
    return TokenFactory.for_auth_server(auth_server)


@pytest.fixture
def serve_thrift() -> Iterator[Callable[..., RpcServer]]:
    """``serve_thrift(service, handler, **ServerSettings fields)``: your service, in-process."""
    from auth_rpc.serving.rpc import RpcServer, ServerSettings

    started: list[RpcServer] = []

    def serve(service: Any, handler: object, **settings: Any) -> RpcServer:
        server = RpcServer(service, handler, settings=ServerSettings(**settings)).start()
        started.append(server)
        return server

    yield serve
    for server in reversed(started):
        server.stop(grace_s=2.0)


def _verifier_settings(
    mode: str,
    auth: AuthServer,
    audience: str | None,
    introspect_client: Callable[[], tuple[str, str]],
) -> dict[str, Any]:
    """The settings of a ``mode`` verifier of ``auth``'s tokens for ``audience``."""
    service = auth.service
    settings: dict[str, Any] = {
        "issuer": service.settings.issuer,
        "audience": service.settings.audience if audience is None else audience,
    }
    if mode in ("local", "jwks"):
        # Where the Auth server publishes its Token Status Lists.
        settings["status_list_prefix"] = service.status_list_prefix
    if mode == "local":
        key = service.signing_key()
        if key.symmetric:
            settings.update(hs256_secret=key.private_key, algorithms=["HS256"])
        else:
            settings.update(public_key_pem=key.public_pem(), algorithms=[key.alg])
    elif mode == "jwks":
        settings["jwks_url"] = auth.jwks_url
    elif mode == "introspect":
        client_id, client_secret = introspect_client()
        settings.update(
            introspect_url=auth.introspect_url, client_id=client_id, client_secret=client_secret
        )
    elif mode == "thrift":
        settings.update(host="127.0.0.1", port=auth.port)
    else:
        raise ValueError(f"unknown verification mode {mode!r}; expected one of {VERIFIER_MODES}")
    return settings


@pytest.fixture
def make_verifier(auth_server: AuthServer) -> Iterator[Callable[..., TokenVerifier]]:
    """Verifiers of ``auth_server``'s tokens for your service, in any mode; closed at teardown.

    ``make_verifier(mode, *, audience=None, auth=None, cache_ttl_s=None,
    client_id=INTROSPECT_CLIENT_ID, client_secret=None, **settings)``:

    - ``mode`` is one of :data:`VERIFIER_MODES`: ``local`` (the Auth server's
      current public key, or its HS256 secret), ``jwks`` (its JWK Set URL),
      ``introspect`` (its RFC 7662 endpoint, as the service client
      ``client_id``, registered for you with the permission to introspect
      unless ``client_secret`` is given; registered once per Auth server) or
      ``thrift`` (``Auth.validate`` on its Thrift port);
    - ``audience`` is your service's (the Auth server's audience by default),
      the issuer the Auth server's; ``auth`` is another Auth server;
    - ``cache_ttl_s`` sets the verified-token cache (``None``: the verifier's
      default; ``0`` turns it off, so a revocation counts at once);
    - ``settings`` go to the verifier's constructor, over the above
      (``issuer=...``, ``timeout_s=...``, ``clock=...``, ``jwks_url=...``).

    ``client_id`` and ``client_secret`` are ignored in the other modes, so
    one call works for all four.
    """
    from auth_rpc.verify.verifiers import make_verifier as build_verifier

    made: list[TokenVerifier] = []
    registered: dict[tuple[AuthService, str], str] = {}

    def make(
        mode: str,
        *,
        audience: str | None = None,
        auth: AuthServer | None = None,
        cache_ttl_s: float | None = None,
        client_id: str = INTROSPECT_CLIENT_ID,
        client_secret: str | None = None,
        **settings: Any,
    ) -> TokenVerifier:
        server = auth or auth_server

        def introspect_client() -> tuple[str, str]:
            if client_secret is not None:
                return client_id, client_secret
            slot = (server.service, client_id)
            if slot not in registered:
                registered[slot] = server.service.add_client(client_id, (), introspect=True)
            return client_id, registered[slot]

        options = _verifier_settings(mode, server, audience, introspect_client)
        if cache_ttl_s is not None:
            options["cache_ttl_s"] = cache_ttl_s
        options.update(settings)
        verifier = build_verifier(mode, **options)
        made.append(verifier)
        return verifier

    yield make
    for verifier in reversed(made):
        verifier.close()


# ---------------------------------------------------------------------------
# A real PostgreSQL for tests: one server per session, a fresh database per test.


def find_postgresql_bindir() -> Path | None:
    """The directory of PostgreSQL's server programs (``initdb``, ``postgres``,
    ``pg_ctl``), or ``None`` when PostgreSQL is not installed.

    ``pg_config --bindir`` first (Debian's ``pg_config`` may point to the
    client-only ``/usr/bin``), then the newest ``/usr/lib/postgresql/*/bin``.
    """

    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(  # noqa: S603 - PostgreSQL's own pg_config
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            candidates.append(Path(out))

    def version(path: Path) -> tuple[int, ...]:
        try:
            return tuple(int(p) for p in path.parent.name.split("."))
        except ValueError:
            return (0,)

    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    )
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "postgres", "pg_ctl")):
            return bindir
    return None


class PostgresServer:
    """A throw-away PostgreSQL cluster listening only on a unix socket.

    :meth:`start` runs ``initdb`` into a new temporary directory and starts
    ``postgres`` on a socket in that directory (no TCP listener), as an
    unprivileged user: PostgreSQL refuses to run as root, so as root it runs as
    ``postgres`` (the Debian package's user; ``nobody`` if there is none),
    otherwise as the current user. Authentication is ``trust``: only who can
    reach the socket directory can connect. Durability is traded for speed
    (``fsync=off``): a test database need not survive a power cut.

    :attr:`startup_s` is the time from ``initdb`` to the first accepted
    connection. :meth:`create_database` makes a fresh database and returns its
    URL (``postgresql://postgres@/NAME?host=SOCKETDIR``); :meth:`stop` stops
    the server (``pg_ctl stop -m fast``; killed if that fails) and deletes the
    directory.
    """

    SUPERUSER = "postgres"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root: Path | None = None
        self.startup_s = 0.0
        self._proc: Any = None
        self._user: str | None = None
        self._counter = 0

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None, "not started"
        return self.root

    @property
    def data_dir(self) -> Path:
        return self.socket_dir / "data"

    def url(self, dbname: str = "postgres") -> str:
        """The URL of database ``dbname`` (no password: the socket is trusted)."""
        return f"postgresql://{self.SUPERUSER}@/{dbname}?host={self.socket_dir}"

    def _run_as(self) -> dict[str, Any]:
        return {"user": self._user} if self._user is not None else {}

    def start(self, *, timeout_s: float = 60.0) -> PostgresServer:

        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    owner = pwd.getpwnam(name)
                except KeyError:
                    continue
                self._user = name
                break
            else:
                raise RuntimeError("running as root and no unprivileged user to run PostgreSQL")
        # A short path: a unix socket's path is limited to about 100 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="pgtest-"))
        if owner is not None:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        os.chmod(self.root, 0o700)
        started = time.monotonic()
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        subprocess.run(  # noqa: S603 - PostgreSQL's programs, fixed arguments
            [
                str(self.bindir / "initdb"),
                "-D", str(self.data_dir),
                "-U", self.SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            cwd=self.root,
            env=env,
            capture_output=True,
            check=True,
            timeout=timeout_s,
            **self._run_as(),
        )
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(  # noqa: S603 - as above
            [
                str(self.bindir / "postgres"),
                "-D", str(self.data_dir),
                "-k", str(self.root),
                "-c", "listen_addresses=",
                "-c", "fsync=off",
                "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off",
                "-c", "max_connections=200",
            ],
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            **self._run_as(),
        )
        log.close()
        self._wait_ready(started + timeout_s)
        self.startup_s = time.monotonic() - started
        return self

    def _wait_ready(self, deadline: float) -> None:
        import psycopg

        delay = 0.005
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"PostgreSQL exited with status {self._proc.returncode}: {self.log_tail()}"
                )
            try:
                with psycopg.connect(self.url(), connect_timeout=5):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL not ready: {self.log_tail()}") from None
            time.sleep(delay)  # polling a condition, with a deadline
            delay = min(delay * 2, 0.1)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.socket_dir / "postgres.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh, empty database (from ``template0``); its URL."""
        import psycopg

        if name is None:
            self._counter += 1
            name = f"test_{os.getpid()}_{self._counter}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, closing its remaining connections."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server (fast shutdown; killed after 30 s) and delete its directory."""

        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                subprocess.run(  # noqa: S603 - as above
                    [str(self.bindir / "pg_ctl"), "stop", "-m", "fast", "-w",
                     "-t", "30", "-D", str(self.data_dir)],
                    cwd=self.root,
                    capture_output=True,
                    timeout=40,
                    check=False,
                    **self._run_as(),
                )
                proc.wait(timeout=10)
            except (OSError, subprocess.SubprocessError):
                pass
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (unix socket only); skipped when
    PostgreSQL is not installed. ``.url(db)``, ``.create_database()``, ``.startup_s``."""
    bindir = find_postgresql_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL is not installed (no server programs from `pg_config --bindir` "
            "or in /usr/lib/postgresql/*/bin); apt-get install postgresql"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]')")
    server = PostgresServer(bindir).start()
    print(f"\nPostgreSQL {bindir.parent.name}: initdb to ready in {server.startup_s:.2f} s")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgresql_url(postgresql_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database of ``postgresql_server``, dropped after the test."""
    url = postgresql_server.create_database()
    yield url
    postgresql_server.drop_database(url.rsplit("/", 1)[1].split("?", 1)[0])


@pytest.fixture
def key_encryption_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new key-encryption key file (32 random bytes, mode 0600, in a 0700 directory):
    what Auth replicas on PostgreSQL share to seal their signing keys
    (``AuthSettings(key_encryption_key_file=...)``, ``--key-encryption-key-file``)."""
    from auth_rpc.auth.sealing import new_kek_file

    path = tmp_path_factory.mktemp("kek") / "kek"
    path.parent.chmod(0o700)
    new_kek_file(path)
    return path


@pytest.fixture
def make_haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    """``make_haproxy(servers, *, kinds=None, proxy_protocol=(), start=True) -> HAProxy``:
    HAProxy (TCP mode, the
    configuration of ``deploy/haproxy.cfg``, Thrift-level health checks) on free ports of
    127.0.0.1 in front of ``servers`` (``{listener: [(host, port), ...]}``), started and
    polled until every server has passed its health check; stopped at teardown.

    ``kinds`` gives a listener's kind (``thrift``, the default; ``thrift-framed``; ``http``).
    ``proxy_protocol`` names the Thrift listeners that send a PROXY v2 header naming the
    client (``send-proxy-v2``): their servers must trust 127.0.0.1
    (``ServerSettings(proxy_protocol_from=("127.0.0.1",))``, ``--proxy-protocol-from``).
    With ``start=False`` the listening ports are reserved (``.port(name)``, ``.address(name)``)
    and ``.start(servers)`` is called later: e.g. an Auth issuer URL naming the balancer
    before the replicas start. Skipped when HAProxy is not installed.
    """
    from auth_rpc.serving.haproxy import HAProxy, Listener, find_haproxy

    program = find_haproxy()
    if program is None:
        pytest.skip("HAProxy is not installed (not on PATH nor /usr/sbin/haproxy); "
                    "apt-get install haproxy")
    started: list[HAProxy] = []

    def make(
        servers: dict[str, list[Any]],
        *,
        kinds: dict[str, str] | None = None,
        proxy_protocol: Iterable[str] = (),
        start: bool = True,
    ) -> HAProxy:
        kinds = kinds or {}
        proxied = set(proxy_protocol)
        listeners = [Listener(name, len(addrs), kinds.get(name, "thrift"), name in proxied)
                     for name, addrs in servers.items()]
        proxy = HAProxy(listeners, program=program,
                        work_dir=tmp_path_factory.mktemp("haproxy"))
        started.append(proxy)
        if start:
            proxy.start(servers)
        return proxy

    yield make
    for proxy in reversed(started):
        proxy.stop()
