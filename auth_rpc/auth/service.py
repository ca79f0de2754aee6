"""AuthService: the one facade both edges (Thrift handler, HTTP app) adapt.

Every public method raises only :mod:`auth_rpc.errors` classes (admin
operations and :meth:`AuthService.open` also ``ValueError`` / ``OSError`` for
bad configuration). A database failure becomes
:class:`~auth_rpc.errors.DependencyUnavailable`, never a crash.

Tokens issued:

- ``login``: an access token whose ``sub`` is the username and whose
  ``client_id`` is :data:`USER_CLIENT_ID` (``"auth-rpc"``: the Thrift
  ``login`` carries no client identity; the HTTP password grant may pass the
  authenticated client's id instead), plus a refresh token starting a new
  family.
- ``refresh``: a rotated refresh token and a new access token with the
  family's scopes (intersected with the user's current scopes; optionally
  narrowed), same ``client_id``.
- ``client_token``: an access token whose ``sub`` and ``client_id`` are the
  client id; no refresh token.

Audiences (RFC 8707 resource indicators): each grant may name the ``aud`` of
its access token. ``login`` and ``client_token`` default to the service's
``audience``; ``refresh`` to the audience of the family's login, and may ask
for another. The audience must be one the account may use: a user's or
client's ``audiences`` (:meth:`AuthService.add_user`,
:meth:`AuthService.add_client`), or, when it has none stored, the service's
``audience`` only. Otherwise the grant raises ``InvalidInput("audience", ...)``
and nothing is issued or consumed. :meth:`AuthService.validate` and
:meth:`AuthService.introspect` accept tokens of the service's audience and of
every audience some account may use.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auth_rpc.auth.accounts import (
    Account,
    AccountStore,
    PasswordPolicy,
    check_audience,
    check_audiences,
    check_client_id,
    check_new_name,
    check_password,
    check_scopes,
    check_username,
    client_secret_digest,
    parse_scope,
)
from auth_rpc.auth.changes import ChangeFeed
from auth_rpc.auth.db import AnyDatabase, NewDatabaseRefused, open_database
from auth_rpc.auth.keys import (
    ALGORITHMS,
    KEY_ACTIVATION_DELAY_S,
    KeyManager,
    KeyState,
    KeyStore,
    SigningKey,
    read_hs256_secret,
)
from auth_rpc.auth.passwords import SecretHasher
from auth_rpc.auth.sealing import KeySealer
from auth_rpc.auth.status import (
    DEFAULT_STATUS_LIST_SIZE,
    StatusEntry,
    StatusListPublisher,
    StatusListStore,
    StatusListToken,
)
from auth_rpc.auth.throttle import SqliteStreakStore, Throttle
from auth_rpc.auth.tokens import (
    LEEWAY_S,
    MAX_TOKEN_BYTES,
    AccessTokenChecker,
    Family,
    IssuedTokenStore,
    RefreshStore,
    RevocationStore,
    Rotation,
    hash_refresh_token,
    mint_access_token,
    new_jti,
    new_refresh_token,
    principal_from_claims,
)
from auth_rpc.errors import (
    DependencyUnavailable,
    Forbidden,
    InvalidCredentials,
    InvalidInput,
    NotFoundError,
    TokenRejected,
)
from auth_rpc.serving.metrics import Snapshot
from auth_rpc.serving.private_files import private_dir
from auth_rpc.verify.counts import TokenCheckCounts
from auth_rpc.verify.principal import Principal

__all__ = ["DB_FILENAME", "USER_CLIENT_ID", "AuthService", "AuthSettings", "IssuedTokens"]

log = logging.getLogger("auth_rpc.auth.service")

#: The ``client_id`` claim of tokens issued by ``login`` (no client is named).
USER_CLIENT_ID = "auth-rpc"
DB_FILENAME = "auth.sqlite3"
LOGIN_FAILED = "invalid username or password"
CLIENT_FAILED = "invalid client credentials"
INTROSPECT_FORBIDDEN = "this client is not allowed to introspect tokens"
_PURGE_INTERVAL_S = 600
#: How long a successful client authentication is remembered, and how many are.
CLIENT_AUTH_CACHE_TTL_S = 300.0
CLIENT_AUTH_CACHE_SIZE = 10_000
#: Compared against when a client id is unknown, so that the answer takes as long.
_NO_CLIENT_DIGEST = bytes(32)
#: How many audiences (other than the default) validate remembers as known.
_KNOWN_AUDIENCES_SIZE = 4096
AUDIENCE_REFUSED = "unknown, or not allowed for this account"


@dataclass(frozen=True)
class AuthSettings:
    """Configuration of one Auth service. Raises ``ValueError`` when out of range."""

    data_dir: Path
    issuer: str
    audience: str = "posts"
    alg: str = "EdDSA"  # EdDSA | RS256 | ES256 | HS256
    hs256_secret_file: Path | None = None  # required for HS256; >= 32 bytes
    access_ttl_s: int = 900
    refresh_ttl_s: int = 14 * 86400
    #: How long a new signing key (rotate-key, a switch of --alg) is published
    #: before it signs: at least what verifiers may cache the JWK Set.
    key_activation_delay_s: int = KEY_ACTIVATION_DELAY_S
    #: Token Status Lists: published under ``<status_list_base_url>/statuslists/<k>``
    #: (``None``: the issuer), ``status_list_size`` entries each, with ``ttl``
    #: ``status_list_ttl_s`` (how soon verifiers fetch again) and
    #: ``exp - iat`` ``status_list_lifetime_s``.
    status_list_base_url: str | None = None
    status_list_size: int = DEFAULT_STATUS_LIST_SIZE
    status_list_ttl_s: int = 1
    status_list_lifetime_s: int = 600
    #: ``postgresql://...``: the database of every replica (``None``: SQLite in
    #: ``data_dir``). Left out of ``repr()``: it may hold a password.
    database_url: str | None = field(default=None, repr=False)
    #: With ``database_url``: the file of the key-encryption key that seals the
    #: signing keys in the database (:mod:`auth_rpc.auth.sealing`; 32 bytes, 0600),
    #: and old ones that only unseal (during a KEK rotation).
    key_encryption_key_file: Path | None = None
    old_key_encryption_key_files: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.key_encryption_key_file is not None:
            object.__setattr__(self, "key_encryption_key_file", Path(self.key_encryption_key_file))
        object.__setattr__(
            self, "old_key_encryption_key_files",
            tuple(Path(p) for p in self.old_key_encryption_key_files),
        )
        if self.database_url is None and (
            self.key_encryption_key_file is not None or self.old_key_encryption_key_files
        ):
            raise ValueError(
                "a key-encryption key goes with a database URL (on SQLite the signing keys "
                "are files in the data directory)"
            )
        if self.old_key_encryption_key_files and self.key_encryption_key_file is None:
            raise ValueError("old key-encryption keys need the current one too")
        if self.hs256_secret_file is not None:
            object.__setattr__(self, "hs256_secret_file", Path(self.hs256_secret_file))
        if self.alg not in ALGORITHMS:
            raise ValueError(f"unsupported algorithm {self.alg!r}; choose one of {ALGORITHMS}")
        if self.alg == "HS256" and self.hs256_secret_file is None:
            raise ValueError("HS256 needs hs256_secret_file (a secret of at least 32 bytes)")
        if not self.issuer:
            raise ValueError("issuer must not be empty")
        if not self.audience:
            raise ValueError("audience must not be empty")
        if not 1 <= self.access_ttl_s <= 86400:
            raise ValueError("access_ttl_s must be 1..86400 seconds")
        if not 1 <= self.refresh_ttl_s <= 366 * 86400:
            raise ValueError("refresh_ttl_s must be 1..31622400 seconds")
        if not 0 <= self.key_activation_delay_s <= 366 * 86400:
            raise ValueError("key_activation_delay_s must be 0..31622400 seconds")
        base = self.status_list_base_url
        if base is not None and (
            not base.startswith(("http://", "https://")) or "?" in base or "#" in base
        ):
            raise ValueError("status_list_base_url must be an http(s) URL without query")
        if not 8 <= self.status_list_size <= 1 << 27 or self.status_list_size % 8:
            raise ValueError("status_list_size must be a multiple of 8 in 8..134217728")
        if not 1 <= self.status_list_ttl_s <= 86400:
            raise ValueError("status_list_ttl_s must be 1..86400 seconds")
        if not max(10, 2 * self.status_list_ttl_s) <= self.status_list_lifetime_s <= 7 * 86400:
            raise ValueError(
                "status_list_lifetime_s must be 10..604800 seconds and twice status_list_ttl_s"
            )


@dataclass(frozen=True)
class _ClientGrant:
    """What an authenticated client may ask for (remembered with its authentication)."""

    scopes: tuple[str, ...]
    audiences: tuple[str, ...] | None
    may_introspect: bool = False
    #: The stored hash when authenticated: a remembered authentication ends
    #: when the secret is reset (compared with the row read on every use).
    secret_hash: str = field(default="", repr=False)


@dataclass(frozen=True)
class IssuedTokens:
    """What a successful login, refresh or client-credentials grant returns.

    ``repr()`` leaves the tokens out, so that logging one is harmless.
    """

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)  # "" for client-credentials tokens
    expires_in: int  # seconds
    scope: str  # space separated
    token_type: str = "Bearer"  # noqa: S105 - the OAuth token type, not a secret


def _prepare_data_dir(path: Path) -> None:
    private_dir(path, "data directory")  # refuses one another user could write


def _open_database(data_dir: Path, *, init: bool, database_url: str | None = None) -> AnyDatabase:
    """The database of ``data_dir``; a new one beside an existing ``keys/`` only with ``init``.

    ``keys/`` is made on the first start, with the database: a new (missing or
    empty) database beside it means the database was deleted or emptied, and
    starting would silently lose every account and revocation and make every
    issued token unverifiable.
    """
    keys_dir = data_dir / "keys"
    had_keys = os.path.lexists(keys_dir)
    try:
        return open_database(
            data_dir / DB_FILENAME, database_url=database_url, allow_new=init or not had_keys
        )
    except NewDatabaseRefused:
        where = data_dir / DB_FILENAME if database_url is None else "at --database-url"
        raise ValueError(
            f"the database {where} is missing or empty but {keys_dir} exists: "
            "this data directory was in use (its accounts, refresh tokens and revocations would "
            "be lost, its issued tokens unverifiable). Restore the database from a backup, or "
            "start afresh with auth-rpc serve --init"
        ) from None


def _check_key_files(store: KeyStore, data_dir: Path, *, init: bool, now: float) -> None:
    """Refuse key files the database does not know; with ``init``, move them aside."""
    unknown = store.unknown_files(grace_s=0 if init else 30)
    if not unknown:
        return
    if not init:
        names = ", ".join(p.name for p in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise ValueError(
            f"{store.keys_dir} holds {len(unknown)} signing key file(s) that the database "
            f"{data_dir / DB_FILENAME} does not know ({names}): the database was emptied, "
            "deleted or replaced. Restore the matching database, or start afresh with "
            "auth-rpc serve --init (the unknown key files are moved aside, never loaded)"
        )
    aside = data_dir / f"keys-unknown-{int(now)}"
    private_dir(aside, "directory")
    for path in unknown:
        os.replace(path, aside / path.name)
    log.warning(
        "--init: moved %d signing key file(s) the database does not know to %s",
        len(unknown), aside,
    )


def _requested_audience(audience: str | None) -> str | None:
    """A grant's ``audience`` argument, checked: ``None`` (the default) or a valid name."""
    if audience is None:
        return None
    if audience == "":
        raise InvalidInput("audience", "must not be empty (omit it for the default)")
    return check_audience(audience)


def _narrow(granted: tuple[str, ...], requested: tuple[str, ...]) -> tuple[str, ...]:
    if not requested:
        return granted
    if not set(requested) <= set(granted):
        raise InvalidInput("scope", "asks for more than was granted")
    return requested


class AuthService:
    """Users, clients, keys and tokens of one Auth service (see the module docstring).

    Thread safe. Make one with :meth:`open`; :meth:`close` it at the end.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        db: AnyDatabase,
        keys: KeyManager,
        hasher: SecretHasher,
        clock: Callable[[], float],
        changes: ChangeFeed | None = None,
    ) -> None:
        self.settings = settings
        self.issuer = settings.issuer
        self.audience = settings.audience
        self._db = db
        self._keys = keys
        self._hasher = hasher
        self._clock = clock
        self._accounts = AccountStore(db)
        self._refresh = RefreshStore(db)
        self._revocations = RevocationStore(db)
        self._issued = IssuedTokenStore(db)
        self._status = StatusListStore(db, capacity=settings.status_list_size)
        self._status_lists = StatusListPublisher(
            self._status,
            issuer=settings.issuer,
            base_url=settings.status_list_base_url or settings.issuer,
            signer=keys.signer,
            ttl_s=settings.status_list_ttl_s,
            lifetime_s=settings.status_list_lifetime_s,
            clock=clock,
        )
        self._checker = AccessTokenChecker(
            issuer=settings.issuer,
            audience=settings.audience,
            find_key=keys.find,
            clock=clock,
            is_revoked=self._revocations.is_revoked,
            known_audience=self._audience_known,
            status_revoked=self._status_revoked,
        )
        self._known_audiences: set[str] = set()
        self._streaks = SqliteStreakStore(db)
        self._login_throttle = Throttle(clock=clock, what="logins", store=self._streaks)
        self._client_throttle = Throttle(
            clock=clock, what="client authentications", store=self._streaks
        )
        self._client_cache_key = secrets.token_bytes(32)
        self._client_cache: dict[bytes, tuple[float, _ClientGrant, str]] = {}
        self._client_cache_lock = threading.Lock()
        #: Counts the changes of clients notified (and losses of the feed): an
        #: authentication is remembered only if none came while it was checked.
        self._client_generation = 0
        self._changes = changes
        if changes is not None:
            changes.subscribe("client", self._client_changed)
        self._purged_at = float("-inf")
        self._purge_lock = threading.Lock()
        self._closed = False
        #: Access tokens refused by validate and introspect, by reason (the metrics).
        self.token_checks = TokenCheckCounts()

    @classmethod
    def open(
        cls,
        settings: AuthSettings,
        *,
        clock: Callable[[], float] = time.time,
        create_key: bool = True,
        hasher: SecretHasher | None = None,
        init: bool = False,
        listen: bool | None = None,
    ) -> AuthService:
        """Open the service on ``settings.data_dir``, making dir, database and key on first start.

        ``create_key=False`` (admin commands) never makes or switches a
        signing key. Refused (``ValueError``, one line saying what to do): a
        new database beside an existing ``keys/`` directory, or key files the
        database does not know, unless ``init`` (``auth-rpc serve --init``:
        start afresh, unknown key files moved to ``keys-unknown-<time>/``).
        With ``settings.database_url`` the signing keys are sealed in the
        database with the KEK of ``settings.key_encryption_key_file``
        (KeyEncryptionKeyError, a DependencyUnavailable, when it is needed and
        missing, or is not the KEK that sealed them), and ``listen`` (default:
        ``create_key``, i.e. a serving replica) follows the other replicas'
        changes (:mod:`auth_rpc.auth.changes`).
        Refused (:class:`~auth_rpc.serving.private_files.UnsafeFile`): a data
        directory, key directory, key file or database that another user owns
        or that group or others may write, a key file whose kid is not its
        thumbprint; a damaged database (DependencyUnavailable naming SQLite's
        message). Raises ``ValueError`` (bad settings, short HS256 secret,
        newer schema), ``OSError`` (data dir, key or secret file),
        DependencyUnavailable (database).
        """
        hs256_key = None
        if settings.alg == "HS256":
            assert settings.hs256_secret_file is not None  # AuthSettings checks it
            hs256_key = SigningKey.hs256(read_hs256_secret(settings.hs256_secret_file))
        sealer = None
        if settings.key_encryption_key_file is not None:
            sealer = KeySealer.from_files(
                settings.key_encryption_key_file, old=settings.old_key_encryption_key_files
            )
        _prepare_data_dir(settings.data_dir)
        db = _open_database(settings.data_dir, init=init, database_url=settings.database_url)
        changes: ChangeFeed | None = None
        if listen is None:
            listen = create_key
        try:
            if listen and settings.database_url is not None:
                # Before the keys are read: a change after LISTEN is in force is seen.
                changes = ChangeFeed(settings.database_url).start()
            store = KeyStore(db, settings.data_dir / "keys", sealer=sealer)
            store.ensure_dir()
            _check_key_files(store, settings.data_dir, init=init, now=clock())
            if db.created and init:
                log.warning("--init: starting with a new, empty database")
            keys = KeyManager(
                store,
                alg=settings.alg,
                access_ttl_s=settings.access_ttl_s,
                clock=clock,
                hs256_key=hs256_key,
                activation_delay_s=settings.key_activation_delay_s,
            )
            if changes is not None:
                keys.follow(changes)
            if create_key or sealer is not None or not store.in_database:
                keys.start(create=create_key)
            # else: an admin command on PostgreSQL without the KEK: the keys are
            # read only if it needs them (and then it fails, saying so).
            service = cls(
                settings, db=db, keys=keys, hasher=hasher or SecretHasher(), clock=clock,
                changes=changes,
            )
        except BaseException:
            if changes is not None:
                changes.stop()
            db.close()
            raise
        log.info("auth service open (alg %s, schema version %d)", settings.alg, db.schema_version)
        return service

    # -- grants ------------------------------------------------------------

    def login(
        self,
        username: str,
        password: str,
        scope: str = "",
        *,
        client_id: str = USER_CLIENT_ID,
        audience: str | None = None,
        source: str | None = None,
    ) -> IssuedTokens:
        """Password grant: an access token and a refresh token (a new family).

        ``scope`` narrows the user's scopes (``""`` = all of them).
        ``audience`` is the token's ``aud`` (``None``: the service's default),
        one the user may use. ``source`` is the caller's address (the Thrift
        peer, the HTTP ``REMOTE_ADDR``): password hashing is admitted per
        source (:mod:`auth_rpc.auth.passwords`). Raises InvalidCredentials
        (one message for an unknown user and a wrong password), Throttled
        (the name's failures, or hashing saturated for the source or in
        all), InvalidInput (``audience`` refused: nothing issued),
        DependencyUnavailable.
        """
        username = check_username(username)
        check_password(password)
        requested = parse_scope(scope)
        client_id = check_client_id(client_id)
        wanted = _requested_audience(audience)
        self._login_throttle.check(username)  # a throttled name waits for nothing
        # The hashing slot first, then the reservation of the attempt: a login
        # that waits for a slot, or is refused one, holds none of the name's
        # attempts in flight (which a flood could otherwise fill).
        with self._hasher.admit(source):
            with self._login_throttle.attempt(username) as attempt:
                user = self._accounts.get_user(username)
                ok = self._hasher.verify(user.password_hash if user else None, password)
                if not ok or user is None or user.disabled:
                    attempt.failed()  # a disabled user: the same answer, and counted
                    log.info("login failed")
                    raise InvalidCredentials(LOGIN_FAILED)
                attempt.succeeded()
            rehashed = None
            if self._hasher.needs_rehash(user.password_hash):
                rehashed = self._hasher.hash(password)  # in the same slot
        scopes = _narrow(user.scopes, requested)
        aud = self._allowed_audience(user.audiences, wanted)
        if rehashed is not None:
            self._accounts.set_password_hash(username, user.password_hash, rehashed)
        now = int(self._clock())
        self._maybe_purge(now)
        family = Family(
            family_id=secrets.token_urlsafe(16),
            subject=username,
            client_id=client_id,
            scopes=scopes,
            created_at=now,
            expires_at=now + self.settings.refresh_ttl_s,
            audience=wanted,
        )
        refresh = new_refresh_token()
        with self._db.transaction():  # the token's Status List entry and its family, together
            # Asked again in the issuing transaction: a disable committed since
            # the password check (by another process) wins.
            if not self._accounts.is_active("user", username):
                log.info("login failed: the user was disabled or removed meanwhile")
                raise InvalidCredentials(LOGIN_FAILED)
            access, jti, exp, status = self._mint(username, scopes, client_id, now, audience=aud)
            self._refresh.start_family(
                family,
                token_hash=hash_refresh_token(refresh),
                access_jti=jti,
                access_expires_at=exp,
                access_status=status,
            )
        log.info("login succeeded for %r", username)
        return IssuedTokens(access, refresh, self.settings.access_ttl_s, " ".join(scopes))

    def refresh(
        self,
        refresh_token: str,
        scope: str = "",
        *,
        client_id: str = USER_CLIENT_ID,
        audience: str | None = None,
    ) -> IssuedTokens:
        """Refresh grant: rotate ``refresh_token`` and issue a new access token.

        Keeps the family's scopes (those the user still has), narrowed by
        ``scope`` if given. The access token is for ``audience`` if given,
        else for the login's; either must be one the user may use now (the
        family stays as it was: user, client and its login's audience). A
        refused scope or audience raises InvalidInput and leaves the refresh
        token unused. ``client_id`` is the client making the request
        (the authenticated client on HTTP; :data:`USER_CLIENT_ID` otherwise):
        RFC 6749 section 6 binds a refresh token to the client it was issued
        to, so a family issued to another client is refused and left as it was.
        Raises TokenRejected (unknown, expired, revoked, another client's, or
        reused - which revokes the family), InvalidInput, DependencyUnavailable.
        """
        token = self._check_token_input(refresh_token, "refresh_token")
        requested = parse_scope(scope)
        wanted = _requested_audience(audience)
        now = int(self._clock())
        self._maybe_purge(now)
        key = self._keys.signer()  # before the transaction: it may reload the key ring
        issued: dict[str, Any] = {}

        def issue(family: Family) -> Rotation:
            # RFC 6749 section 6: the server MUST "validate the refresh token and
            # ensure that it was issued to the authenticated client". Raising
            # here aborts the transaction: the token stays unused.
            if not hmac.compare_digest(family.client_id, client_id):
                raise TokenRejected("invalid refresh token")
            user = self._accounts.get_user(family.subject)
            if user is None or user.disabled:  # removed or disabled since the login
                raise TokenRejected("invalid refresh token")
            current = tuple(s for s in family.scopes if s in set(user.scopes))
            scopes = _narrow(current, requested)
            aud = self._allowed_audience(user.audiences, wanted or family.audience)
            access, jti, exp, status = self._mint(
                family.subject, scopes, family.client_id, now, key, audience=aud
            )
            new_refresh = new_refresh_token()
            issued.update(access=access, refresh=new_refresh, scope=" ".join(scopes))
            return Rotation(hash_refresh_token(new_refresh), jti, exp, status)

        self._refresh.rotate(hash_refresh_token(token), now=now, issue=issue)
        return IssuedTokens(
            issued["access"], issued["refresh"], self.settings.access_ttl_s, issued["scope"]
        )

    def client_token(
        self, client_id: str, client_secret: str, scope: str = "", *, audience: str | None = None
    ) -> IssuedTokens:
        """Client-credentials grant: an access token for the client itself, no refresh token.

        ``scope`` narrows the client's scopes (``""`` = all); ``audience`` as
        for :meth:`login`, one the client may use. Raises InvalidCredentials,
        Throttled, InvalidInput, DependencyUnavailable.
        """
        client_id = check_client_id(client_id)
        check_password(client_secret, "client_secret")
        requested = parse_scope(scope)
        wanted = _requested_audience(audience)
        granted = self._authenticate_client(client_id, client_secret)
        scopes = _narrow(granted.scopes, requested)
        aud = self._allowed_audience(granted.audiences, wanted)
        now = int(self._clock())
        with self._db.transaction():
            if not self._accounts.is_active("client", client_id):  # disabled meanwhile
                raise InvalidCredentials(CLIENT_FAILED)
            access, _, _, _ = self._mint(client_id, scopes, client_id, now, audience=aud)
        log.info("client token issued to %r", client_id)
        return IssuedTokens(access, "", self.settings.access_ttl_s, " ".join(scopes))

    def authenticate_client(self, client_id: str, client_secret: str) -> str:
        """Check a client's credentials (/token, /revoke; see :meth:`authorize_introspection`).

        Returns the client id. Raises InvalidCredentials (also for malformed
        input), Throttled, DependencyUnavailable.
        """
        try:
            client_id = check_client_id(client_id)
            check_password(client_secret, "client_secret")
        except InvalidInput as exc:
            raise InvalidCredentials(CLIENT_FAILED) from exc
        self._authenticate_client(client_id, client_secret)
        return client_id

    def authorize_introspection(self, client_id: str, client_secret: str) -> str:
        """Check a client's credentials and its permission to introspect (``/introspect``).

        Introspection tells whoever asks a token's ``sub``, ``username`` and
        ``scope``: only a client registered with the permission
        (:meth:`add_client` ``introspect=True``, ``add-client --introspect``)
        may. Returns the client id. Raises InvalidCredentials, Forbidden (the
        credentials are right but the client lacks the permission), Throttled,
        DependencyUnavailable.
        """
        try:
            client_id = check_client_id(client_id)
            check_password(client_secret, "client_secret")
        except InvalidInput as exc:
            raise InvalidCredentials(CLIENT_FAILED) from exc
        if not self._authenticate_client(client_id, client_secret).may_introspect:
            log.info("introspection refused to client %r: not permitted", client_id)
            raise Forbidden(INTROSPECT_FORBIDDEN)
        return client_id

    def _authenticate_client(self, client_id: str, client_secret: str) -> _ClientGrant:
        # argon2id costs ~30 ms by design; a resource server introspecting every
        # call would pay it per call. A success is remembered for a short time
        # under a keyed digest of (id, secret) - never the secret itself - so
        # the same credentials are not hashed again; a failure always is.
        # The memory is extended on every use, so a client in use (a resource
        # server introspecting) stays authenticated without a database read.
        digest = hmac.digest(
            self._client_cache_key, f"{client_id}\0{client_secret}".encode(), "sha256"
        )
        # Read before the database: a change notified meanwhile forbids remembering.
        generation = self._client_generation
        changes = self._changes
        trusted = changes is not None and changes.live
        cached = self._client_cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            if trusted:
                # PostgreSQL replicas: every change of a client (disable,
                # remove, reset-secret, set-scope, set-audience, at any replica
                # or admin command) is notified, and drops what is remembered
                # of it (_client_changed): no database read.
                if cached[0] - now < CLIENT_AUTH_CACHE_TTL_S - 1:
                    self._remember_client(digest, cached[1], client_id, generation, now)
                return cached[1]
            # Otherwise the row is read again (one lookup by key, no hashing),
            # so that an admin command of another process applies to the next
            # call, not minutes later.
            client = self._accounts.get_client(client_id)
            if (
                client is not None
                and not client.disabled
                and hmac.compare_digest(client.secret_hash, cached[1].secret_hash)
            ):
                grant = _ClientGrant(
                    client.scopes, client.audiences, client.may_introspect, client.secret_hash
                )
                if cached[0] - now < CLIENT_AUTH_CACHE_TTL_S - 1 or grant != cached[1]:
                    self._remember_client(digest, grant, client_id, generation, now)
                return grant
            with self._client_cache_lock:
                self._client_cache.pop(digest, None)
        grant = self._authenticate_client_slow(client_id, client_secret)
        self._remember_client(digest, grant, client_id, generation, now)
        return grant

    def _remember_client(
        self, digest: bytes, grant: _ClientGrant, client_id: str, generation: int, now: float
    ) -> None:
        with self._client_cache_lock:
            self._client_cache.pop(digest, None)
            if generation != self._client_generation:
                return  # the client may have changed since it was read
            if len(self._client_cache) >= CLIENT_AUTH_CACHE_SIZE:
                self._client_cache.pop(next(iter(self._client_cache)))
            self._client_cache[digest] = (now + CLIENT_AUTH_CACHE_TTL_S, grant, client_id)

    def _client_changed(self, client_id: str | None) -> None:
        """A client changed at some replica (``None``: any may have): forget it."""
        with self._client_cache_lock:
            self._client_generation += 1
            if client_id is None:
                self._client_cache.clear()
                return
            for digest in [d for d, v in self._client_cache.items() if v[2] == client_id]:
                del self._client_cache[digest]

    def _authenticate_client_slow(self, client_id: str, client_secret: str) -> _ClientGrant:
        # A correct secret always gets through: throttling applies to failures,
        # never to the id. Otherwise anyone who knows a service's client id
        # could lock it out with five wrong guesses (and, in introspect mode,
        # take the resource server down with it). Guessing is not the threat a
        # throttle must stop here: client secrets are 256 random bits, checked
        # against their SHA-256 digest in constant time, without argon2.
        client = self._accounts.get_client(client_id)
        if client is None or client.secret_digest is not None:
            expected = _NO_CLIENT_DIGEST if client is None else client.secret_digest
            ok = hmac.compare_digest(client_secret_digest(client_secret), expected or b"")
            if ok and client is not None and not client.disabled:
                return _ClientGrant(
                    client.scopes, client.audiences, client.may_introspect, client.secret_hash
                )
            with self._client_throttle.attempt(client_id) as attempt:  # may raise Throttled
                attempt.failed()
            log.info("client authentication failed")
            raise InvalidCredentials(CLIENT_FAILED)
        # A client registered before digests were stored: argon2, throttled as
        # before, and on success its digest is stored for next time.
        with self._client_throttle.attempt(client_id) as attempt:
            ok = self._hasher.verify(client.secret_hash, client_secret)
            if not ok or client.disabled:
                attempt.failed()
                log.info("client authentication failed")
                raise InvalidCredentials(CLIENT_FAILED)
            attempt.succeeded()
        self._accounts.set_client_digest(
            client_id, client.secret_hash, client_secret_digest(client_secret)
        )
        return _ClientGrant(
            client.scopes, client.audiences, client.may_introspect, client.secret_hash
        )

    def _allowed_audience(self, allowed: tuple[str, ...] | None, wanted: str | None) -> str:
        """The audience of a grant: ``wanted`` (``None``: the default) if the account may use it.

        ``allowed`` is the account's list (``None``: the service's default
        only). Raises InvalidInput("audience", ...), one message whether the
        name is unknown or another account's, and the same for the default
        when the account's list leaves it out.
        """
        aud = self.audience if wanted is None else wanted
        permitted = (self.audience,) if allowed is None else allowed
        if aud not in permitted:
            log.info("grant refused: audience not allowed for the account")
            raise InvalidInput("audience", AUDIENCE_REFUSED)
        return aud

    def _audience_known(self, audience: str) -> bool:
        """Whether some account may ask tokens for ``audience`` (the checker's question).

        Remembered once seen, also after ``set-audience`` takes it from every
        account (the tokens issued for it stay valid until they expire, as
        the account's other tokens do); a name not seen yet is looked up,
        which only a token signed by our key can cause.
        Raises DependencyUnavailable.
        """
        if audience in self._known_audiences:
            return True
        try:
            check_audience(audience)
        except InvalidInput:
            return False
        if not self._accounts.audience_in_use(audience):
            return False
        if len(self._known_audiences) < _KNOWN_AUDIENCES_SIZE:
            self._known_audiences.add(audience)
        return True

    def _mint(
        self,
        subject: str,
        scopes: Iterable[str],
        client_id: str,
        now: int,
        key: SigningKey | None = None,
        *,
        audience: str,
    ) -> tuple[str, str, int, StatusEntry]:
        """A signed access token, its jti, exp and Token Status List entry.

        The entry is allocated in the transaction that issues the token (the
        caller's, when it has one): an index is never given to two tokens.
        """
        key = key or self._keys.signer()
        jti = new_jti()
        ttl = self.settings.access_ttl_s
        with self._db.transaction():
            status = self._status.allocate(expires_at=now + ttl, now=now)
            token = mint_access_token(
                key, issuer=self.issuer, audience=audience, subject=subject, scopes=scopes,
                client_id=client_id, ttl_s=ttl, now=now, jti=jti,
                claims={"status": self._status_lists.claim(status)},
            )
            self._issued.record(
                status, subject=subject, client_id=client_id, expires_at=now + ttl
            )
        return token, jti, now + ttl, status

    # -- token status lists ------------------------------------------------

    @property
    def status_list_prefix(self) -> str:
        """Where the lists are published: ``<base>/statuslists/`` (the ``uri`` prefix)."""
        return self._status_lists.prefix

    def status_list_token(self, list_id: int) -> StatusListToken:
        """The current Status List Token of list ``list_id`` (encoded once per version).

        Raises NotFoundError (no such list, or retired), DependencyUnavailable.
        """
        self._check_open()
        return self._status_lists.token(list_id)

    def status_list_uris(self) -> list[str]:
        """The ``uri`` of every list served (the aggregation). Raises DependencyUnavailable."""
        self._check_open()
        return self._status_lists.uris()

    def allocate_status(self, expires_at: int) -> dict[str, object]:
        """A fresh ``status`` claim for a token expiring at ``expires_at`` (the test factory's).

        Raises DependencyUnavailable.
        """
        self._check_open()
        entry = self._status.allocate(expires_at=int(expires_at), now=int(self._clock()))
        return self._status_lists.claim(entry)

    def _status_revoked(self, status: object) -> bool:
        """Whether the entry a token's ``status`` claim names has its bit set (validate's check).

        Raises TokenRejected for a claim naming no live entry of ours,
        DependencyUnavailable.
        """
        revoked = self._status.is_set(self._status_lists.entry_of(status))
        if revoked is None:
            raise TokenRejected("invalid status claim")
        return revoked

    # -- checking ----------------------------------------------------------

    def validate(self, token: str) -> Principal:
        """The :class:`Principal` of a valid access token of ours.

        Raises TokenRejected (with a short generic reason; malformed, too
        long, bad signature, unknown key, expired, wrong type, issuer or
        audience, revoked, a refresh token), DependencyUnavailable.
        """
        try:
            self._check_open()
            return self._checker.check(token)
        except TokenRejected as exc:
            self.token_checks.refusal(exc.message)
            raise
        except DependencyUnavailable:
            self.token_checks.unavailable += 1
            raise

    def metrics_snapshot(self) -> Snapshot:
        """Token checks refused by reason, attempts throttled by reason (for the metrics)."""
        admission = self._hasher.admission
        throttled: dict[tuple[str, ...], Any] = {
            ("login_failures",): self._login_throttle.refused_failures,
            ("login_concurrent",): self._login_throttle.refused_concurrent,
            ("client_failures",): self._client_throttle.refused_failures,
            ("client_concurrent",): self._client_throttle.refused_concurrent,
            ("hashing_source_busy",): admission.refused_source,
            ("hashing_busy",): admission.refused_busy,
        }
        snapshot = self.token_checks.snapshot()
        snapshot["auth_throttled"] = throttled
        return snapshot

    #: :class:`auth_rpc.verify.principal.TokenVerifier` compatibility.
    def verify(self, token: str) -> Principal:
        """Same as :meth:`validate`."""
        return self.validate(token)

    def introspect(self, token: str) -> dict[str, object]:
        """RFC 7662 introspection response for ``token``.

        An access token that :meth:`validate` accepts gives ``active: true``
        with ``scope``, ``client_id``, ``username``, ``sub``, ``exp``,
        ``iat``, ``nbf``, ``iss``, ``aud``, ``jti`` and ``token_type``
        (``"Bearer"``). Anything else - including refresh tokens, which are
        only ever presented to this service - gives ``{"active": False}``.
        Raises DependencyUnavailable only.
        """
        try:
            self._check_open()
            claims = self._checker.decode(token)
        except TokenRejected as exc:
            self.token_checks.refusal(exc.message)
            return {"active": False}
        principal = principal_from_claims(claims)
        body: dict[str, object] = {
            "active": True,
            "scope": " ".join(sorted(principal.scopes)),
            "client_id": principal.client_id,
            "sub": principal.subject,
            "exp": principal.expires_at,
            "iat": claims["iat"],
            "iss": principal.issuer,
            "aud": claims["aud"],
            "jti": principal.token_id,
            "token_type": "Bearer",
        }
        if "nbf" in claims:
            body["nbf"] = claims["nbf"]
        if principal.client_id == USER_CLIENT_ID:
            body["username"] = principal.subject
        return body

    def revoke(self, token: str, *, client_id: str | None = None) -> None:
        """Revoke an access token (its ``jti``, until it expires) or a refresh token (its family).

        RFC 7009 section 2.2: "invalid tokens do not cause an error" - an
        unknown, expired or foreign token is a no-op. Idempotent. With
        ``client_id`` (the client authenticated on ``/revoke``), only a token
        issued to that client is revoked; another client's token is left
        alone, as if unknown (RFC 7009 section 2.1: the server "verifies
        whether the token was issued to the client making the revocation
        request"). Raises InvalidInput (empty, or over 8 KiB),
        DependencyUnavailable.
        """
        token = self._check_token_input(token, "token")
        now = int(self._clock())
        self._maybe_purge(now)
        if token.count(".") == 2:
            try:
                claims = self._checker.decode(token, check_time=False, check_revoked=False)
            except TokenRejected:
                return
            if client_id is not None and claims.get("client_id") != client_id:
                return
            if claims["exp"] + LEEWAY_S > now:
                if "status" in claims:  # its Status List bit: what every check reads
                    try:
                        entry = self._status_lists.entry_of(claims["status"])
                    except TokenRejected:
                        return
                    self._status.revoke(entry)
                else:  # a token issued before Status Lists: by jti
                    self._revocations.revoke(claims["jti"], expires_at=int(claims["exp"]))
                log.info("access token revoked")
            return
        if self._refresh.revoke_by_token(hash_refresh_token(token), now=now, client_id=client_id):
            log.info("refresh token family revoked")

    def _check_token_input(self, token: object, field_name: str) -> str:
        self._check_open()
        if not isinstance(token, str) or not token:
            raise InvalidInput(field_name, "must not be empty")
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidInput(field_name, f"longer than {MAX_TOKEN_BYTES} bytes")
        return token

    def jwks(self) -> dict[str, object]:
        """The RFC 7517 JWK Set: public keys only (empty for an HS256 secret). Never raises."""
        return self._keys.jwks()

    def keys(self) -> list[KeyState]:
        """The keys that still verify, with their state (``auth-rpc keys``).

        Raises DependencyUnavailable.
        """
        self._check_open()
        return self._keys.describe()

    def signing_key(self) -> SigningKey:
        """The current signing key (for a test token factory). Raises DependencyUnavailable."""
        return self._keys.signer()

    # -- admin -------------------------------------------------------------

    def add_user(
        self,
        name: str,
        password: str,
        scopes: Iterable[str] | str = (),
        *,
        audiences: Iterable[str] | None = None,
        password_policy: PasswordPolicy | None = None,
    ) -> None:
        """Create a user with ``scopes``, who may ask tokens for ``audiences``.

        ``audiences`` ``None`` (the default): the service's default audience
        only, whatever it is configured to. The name must follow
        :data:`~auth_rpc.auth.accounts.NAME_RULE`, the password
        ``password_policy`` (default: at least 8 characters). Raises
        InvalidInput (bad or taken name, a password the policy refuses, bad
        scopes or audience names), DependencyUnavailable.
        """
        name = check_new_name(name, "username")
        (password_policy or PasswordPolicy()).check(password)
        granted = check_scopes(scopes)
        allowed = check_audiences(audiences)
        self._check_open()
        # A client-credentials token's sub is its client id: a user of the same
        # name would own that client's posts (and the other way round).
        if self._accounts.get_client(name) is not None:
            raise InvalidInput("name", "already taken by a service client")
        self._accounts.add_user(
            name, self._hasher.hash(password), granted, now=int(self._clock()), audiences=allowed
        )
        log.info("user %r created", name)

    def add_client(
        self,
        client_id: str,
        scopes: Iterable[str] | str = (),
        *,
        audiences: Iterable[str] | None = None,
        introspect: bool = False,
    ) -> str:
        """Register a service client; returns its secret (shown once, stored hashed).

        ``audiences`` as for :meth:`add_user`. ``introspect``: the client may
        introspect tokens (a resource server in introspect mode); no other
        client may. Raises InvalidInput (bad or taken id, bad scopes or
        audience names), DependencyUnavailable.
        """
        client_id = check_new_name(client_id, "client_id")
        granted = check_scopes(scopes)
        allowed = check_audiences(audiences)
        self._check_open()
        if client_id == USER_CLIENT_ID or self._accounts.get_user(client_id) is not None:
            raise InvalidInput("client_id", "reserved, or already taken by a user")
        secret = secrets.token_urlsafe(32)
        self._accounts.add_client(
            client_id,
            self._hasher.hash(secret),
            granted,
            now=int(self._clock()),
            secret_digest=client_secret_digest(secret),
            audiences=allowed,
            may_introspect=introspect,
        )
        log.info("client %r registered%s", client_id, " (may introspect)" if introspect else "")
        return secret

    def accounts(self) -> list[Account]:
        """Every user and client (``auth-rpc list``). Raises DependencyUnavailable."""
        self._check_open()
        return self._accounts.accounts()

    def _kind(self, name: str) -> str:
        """What ``name`` names; NotFoundError if nothing."""
        self._check_open()
        kind = self._accounts.kind_of(check_username(name))
        if kind is None:
            raise NotFoundError(f"no user or client named {name!r}")
        return kind

    def _revoke_account_tokens(self, kind: str, name: str, now: int) -> tuple[int, int]:
        """Revoke the refresh token families and live access tokens of an account.

        In the caller's transaction. For a client, also those it was issued
        for users (HTTP password grants it authenticated). Returns (families,
        access tokens) revoked.
        """
        include_client = kind == "client"
        # Access tokens first, so that the count is of bits this call set (a
        # family's revocation sets its tokens' bits too, before v9 the only record).
        tokens = self._issued.revoke_account(name, now=now, include_client=include_client)
        families = self._refresh.revoke_subject(name, now=now, include_client=include_client)
        return families, tokens

    def disable(self, name: str) -> tuple[str, int, int]:
        """Disable a user or client and revoke its tokens (refresh, and access via status lists).

        Its logins, refreshes and client authentications are refused from
        the moment this returns, also by a service running in another process
        (it reads the account on every grant). Idempotent. Returns (kind,
        refresh token families revoked, access tokens revoked). Raises
        NotFoundError, InvalidInput, DependencyUnavailable.
        """
        kind = self._kind(name)
        now = int(self._clock())
        with self._db.transaction():
            if self._accounts.is_active(kind, name):  # disabling again keeps the first time
                self._accounts.set_disabled(kind, name, now)
            families, tokens = self._revoke_account_tokens(kind, name, now)
        log.info("%s %r disabled (%d families, %d access tokens revoked)",
                 kind, name, families, tokens)
        self._client_changed(name)  # this process forgets at once
        return kind, families, tokens

    def enable(self, name: str) -> str:
        """Enable a disabled user or client again (its revoked tokens stay revoked).

        Returns its kind. Raises NotFoundError, InvalidInput, DependencyUnavailable.
        """
        kind = self._kind(name)
        self._accounts.set_disabled(kind, name, None)
        log.info("%s %r enabled", kind, name)
        self._client_changed(name)  # this process forgets at once
        return kind

    def remove(self, name: str) -> tuple[str, int, int]:
        """Delete a user or client and revoke its tokens, as :meth:`disable` does.

        The name may be given to a new account afterwards. Returns (kind,
        families, access tokens revoked). Raises NotFoundError, InvalidInput,
        DependencyUnavailable.
        """
        kind = self._kind(name)
        now = int(self._clock())
        with self._db.transaction():
            families, tokens = self._revoke_account_tokens(kind, name, now)
            if not self._accounts.delete(kind, name):
                raise NotFoundError(f"no user or client named {name!r}")
        log.info("%s %r removed (%d families, %d access tokens revoked)",
                 kind, name, families, tokens)
        self._client_changed(name)  # this process forgets at once
        return kind, families, tokens

    def set_password(
        self, name: str, password: str, *, password_policy: PasswordPolicy | None = None
    ) -> tuple[int, int]:
        """Give the user ``name`` a new password and end its sessions.

        The password must pass ``password_policy`` (default: at least 8
        characters). The user's refresh token families and access tokens are
        revoked (a password is reset when it may be known to someone else).
        Returns (families, access tokens) revoked. Raises NotFoundError (no
        such user), InvalidInput, DependencyUnavailable.
        """
        name = check_username(name)
        (password_policy or PasswordPolicy()).check(password)
        if self._kind(name) != "user":
            raise NotFoundError(f"no user named {name!r} ({name!r} is a client: reset-secret)")
        password_hash = self._hasher.hash(password)  # outside the transaction: slow
        now = int(self._clock())
        with self._db.transaction():
            if not self._accounts.replace_password_hash(name, password_hash):
                raise NotFoundError(f"no user named {name!r}")
            revoked = self._revoke_account_tokens("user", name, now)
        log.info("password of user %r set; its sessions revoked", name)
        return revoked

    def reset_client_secret(self, client_id: str) -> tuple[str, int, int]:
        """A new secret for ``client_id``: the old one is refused from now on, everywhere.

        The client's tokens are revoked with the old secret (it is reset when
        it may have leaked). Returns (the new secret, families, access tokens
        revoked). Raises NotFoundError, InvalidInput, DependencyUnavailable.
        """
        client_id = check_client_id(client_id)
        if self._kind(client_id) != "client":
            raise NotFoundError(
                f"no client named {client_id!r} ({client_id!r} is a user: set-password)"
            )
        secret = secrets.token_urlsafe(32)
        secret_hash = self._hasher.hash(secret)
        now = int(self._clock())
        with self._db.transaction():
            if not self._accounts.replace_client_secret(
                client_id, secret_hash, client_secret_digest(secret)
            ):
                raise NotFoundError(f"no client named {client_id!r}")
            families, tokens = self._revoke_account_tokens("client", client_id, now)
        log.info("secret of client %r reset; its tokens revoked", client_id)
        self._client_changed(client_id)  # this process forgets at once
        return secret, families, tokens

    def set_scopes(self, name: str, scopes: Iterable[str] | str) -> str:
        """Replace the scopes of a user or client; returns its kind.

        New tokens and refreshes get the new scopes at once; access tokens
        already issued keep theirs until they expire (``disable`` then
        ``enable`` ends them at once). Raises NotFoundError, InvalidInput,
        DependencyUnavailable.
        """
        granted = check_scopes(scopes)
        kind = self._kind(name)
        if not self._accounts.set_scopes(kind, name, granted):
            raise NotFoundError(f"no user or client named {name!r}")
        log.info("scopes of %s %r set", kind, name)
        self._client_changed(name)  # this process forgets at once
        return kind

    def set_audiences(self, name: str, audiences: Iterable[str] | None) -> str:
        """Replace the audiences a user or client may ask tokens for; returns its kind.

        ``None``: the service's default audience only. Applies to new grants
        and refreshes at once, as :meth:`set_scopes`. Raises NotFoundError,
        InvalidInput, DependencyUnavailable.
        """
        allowed = check_audiences(audiences)
        kind = self._kind(name)
        if not self._accounts.set_audiences(kind, name, allowed):
            raise NotFoundError(f"no user or client named {name!r}")
        log.info("audiences of %s %r set", kind, name)
        self._client_changed(name)  # this process forgets at once
        return kind

    def rewrap_keys(self) -> int:
        """Seal every signing key in the database again under the current KEK; how many.

        The last step of a KEK rotation (the old KEK given as
        ``old_key_encryption_key_files``). Raises ``ValueError`` on SQLite
        (key files), KeyEncryptionKeyError, DependencyUnavailable.
        """
        self._check_open()
        if not self._keys.store.in_database:
            raise ValueError("the signing keys are files in the data directory (SQLite): "
                             "nothing to rewrap")
        done = self._keys.store.rewrap()
        log.info("%d signing key(s) sealed again under key-encryption key %s",
                 done, self._keys.store.sealer.kek_id.hex() if self._keys.store.sealer else "-")
        return done

    def rotate_key(self, alg: str | None = None, *, activate_after_s: float | None = None) -> str:
        """Make a new signing key (``alg`` defaults to the current one's); returns its kid.

        The key is published (JWK Set) at once and signs from
        ``activate_after_s`` later (default ``settings.key_activation_delay_s``),
        seen by every process on the data directory without a restart; ``0``
        switches at once (emergencies: a compromised key). The previous key
        keeps verifying, and stays in the JWK Set, until its tokens have
        expired. Raises ``ValueError`` (HS256 deployment or no key yet, unknown
        alg), ``OSError``, DependencyUnavailable.
        """
        self._check_open()
        return self._keys.rotate(alg, activate_after_s=activate_after_s)

    # -- lifecycle ---------------------------------------------------------

    def healthy(self) -> bool:
        """Whether the service can serve: database answers and a signing key is loaded."""
        if self._closed or not self._db.ping():
            return False
        try:
            self._keys.signer()
        except DependencyUnavailable:
            return False
        return True

    def close(self) -> None:
        """Close the database and the hashing threads. Idempotent; later calls raise
        DependencyUnavailable."""
        self._closed = True
        if self._changes is not None:
            self._changes.stop()
        self._db.close()
        self._hasher.close()

    def __enter__(self) -> AuthService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise DependencyUnavailable("service closed")

    def _maybe_purge(self, now: int) -> None:
        if now - self._purged_at < _PURGE_INTERVAL_S:
            return
        if not self._purge_lock.acquire(blocking=False):
            return
        try:
            self._purged_at = now
            removed = self._revocations.purge(now=now)
            self._issued.purge(now=now)
            self._refresh.purge(now=now)
            self._status.retire(now=now, leeway_s=LEEWAY_S)
            # A streak is over a window after its longest possible delay.
            throttle = self._login_throttle
            self._streaks.purge(before=now - throttle.window_s - throttle.max_delay_s)
            if removed:
                log.debug("purged %d expired revocations", removed)
        except DependencyUnavailable:
            log.warning("purging expired rows failed; will retry")
        finally:
            self._purge_lock.release()
