"""Signing keys: generation per algorithm, files, JWKs, HS256 secrets."""

from __future__ import annotations

import inspect
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from auth_rpc.auth.db import Database
from auth_rpc.auth.keys import (
    KEY_ACTIVATION_DELAY_S,
    RETIRE_SLACK_S,
    KeyManager,
    KeyStore,
    SigningKey,
    read_hs256_secret,
)
from auth_rpc.errors import DependencyUnavailable
from auth_rpc.serving.private_files import UnsafeFile

ASYMMETRIC = ["EdDSA", "RS256", "ES256"]
NOBODY = 65534


@pytest.mark.parametrize("alg", [*ASYMMETRIC, "HS256"])
def test_generate_sign_verify(alg: str) -> None:
    key = SigningKey.generate(alg)
    token = jwt.encode({"a": 1}, key.private_key, algorithm=alg, headers={"kid": key.kid})
    assert jwt.decode(token, key.verification_key, algorithms=[alg]) == {"a": 1}


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_public_jwk_has_no_private_part(alg: str) -> None:
    key = SigningKey.generate(alg)
    jwk = key.public_jwk()
    assert jwk is not None
    assert jwk["kid"] == key.kid and jwk["alg"] == alg and jwk["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(jwk)
    assert jwt.PyJWK(jwk).key is not None


def test_kid_is_the_rfc7638_thumbprint() -> None:
    # RFC 7638 section 3.1's example key and thumbprint.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJE"
        "CPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2Q"
        "vzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6"
        "WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    public = rsa.RSAPublicNumbers(65537, int.from_bytes(jwt.utils.base64url_decode(n), "big"))
    from auth_rpc.auth.keys import _public_jwk, _thumbprint

    jwk = _public_jwk("RS256", public.public_key())
    assert _thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_repr_hides_the_key() -> None:
    key = SigningKey.hs256(b"k" * 32, kid="hs")
    assert "kkkk" not in repr(key)


def test_hs256_kid_does_not_reveal_the_secret() -> None:
    secret = b"s" * 40
    key = SigningKey.hs256(secret)
    assert key.kid.startswith("hs-") and "sss" not in key.kid
    assert key.public_jwk() is None
    with pytest.raises(ValueError):
        key.private_pem()
    with pytest.raises(ValueError):
        key.public_pem()


@pytest.mark.parametrize(
    ("alg", "private"),
    [
        ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP384R1())),
        ("EdDSA", lambda: ec.generate_private_key(ec.SECP256R1())),
        ("HS256", lambda: b"short"),
        ("none", lambda: b"x" * 32),
    ],
)
def test_unsuitable_keys_are_refused(alg: str, private: object) -> None:
    with pytest.raises(ValueError):
        SigningKey(kid="k", alg=alg, private_key=private())  # type: ignore[operator]


def test_generate_refuses_unknown_algorithms() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        SigningKey.generate("HS512")


def test_pem_round_trip() -> None:
    key = SigningKey.generate("ES256")
    again = SigningKey.from_pem(key.private_pem(), kid=key.kid, alg="ES256")
    assert again.public_jwk() == key.public_jwk()
    assert b"PUBLIC KEY" in key.public_pem()


def test_read_hs256_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"x" * 32 + b"\r\n")
    assert read_hs256_secret(path) == b"x" * 32
    path.write_bytes(b"x" * 31 + b"\n")
    with pytest.raises(ValueError, match="at least 32"):
        read_hs256_secret(path)
    with pytest.raises(OSError):
        read_hs256_secret(tmp_path / "missing")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(tmp_path / "t.sqlite3")
    yield database
    database.close()


def test_key_files_are_0600_in_a_0700_dir(db: Database, tmp_path: Path) -> None:
    store = KeyStore(db, tmp_path / "keys")
    manager = KeyManager(store, alg="EdDSA", access_ttl_s=900, clock=lambda: 1000.0)
    manager.start(create=True)
    kid = manager.signer().kid
    path = tmp_path / "keys" / f"{kid}.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_missing_key_file_is_unavailable(db: Database, tmp_path: Path) -> None:
    store = KeyStore(db, tmp_path / "keys")
    manager = KeyManager(store, alg="EdDSA", access_ttl_s=900, clock=lambda: 1000.0)
    manager.start(create=True)
    kid = manager.signer().kid
    (tmp_path / "keys" / f"{kid}.pem").unlink()
    fresh = KeyManager(store, alg="EdDSA", access_ttl_s=900, clock=lambda: 1000.0)
    with pytest.raises(DependencyUnavailable):
        fresh.start(create=True)


def test_superseded_key_retires_after_its_longest_token(db: Database, tmp_path: Path) -> None:
    now = [1000.0]
    store = KeyStore(db, tmp_path / "keys")
    manager = KeyManager(store, alg="EdDSA", access_ttl_s=300, clock=lambda: now[0])
    manager.start(create=True)
    old = manager.signer().kid
    # Another process served with a longer lifetime: the longest one counts.
    store.note_ttl(old, 3600)
    manager.reload(force=True)
    new = manager.rotate(activate_after_s=0)
    assert manager.signer().kid == new
    now[0] += 3600 + 60
    assert manager.find(old) is not None
    now[0] += 1
    assert manager.find(old) is None
    keys = manager.jwks()["keys"]
    assert isinstance(keys, list) and [k["kid"] for k in keys] == [new]


def test_manager_settings_are_checked(db: Database, tmp_path: Path) -> None:
    store = KeyStore(db, tmp_path / "keys")
    with pytest.raises(ValueError):
        KeyManager(store, alg="none", access_ttl_s=1, clock=lambda: 0.0)
    with pytest.raises(ValueError, match="HS256"):
        KeyManager(store, alg="HS256", access_ttl_s=1, clock=lambda: 0.0)


def test_a_key_made_elsewhere_takes_the_servers_lifetime(db: Database, tmp_path: Path) -> None:
    now = [1000.0]
    store = KeyStore(db, tmp_path / "keys")
    server = KeyManager(store, alg="EdDSA", access_ttl_s=3600, clock=lambda: now[0])
    server.start(create=True)
    admin = KeyManager(store, alg="EdDSA", access_ttl_s=60, clock=lambda: now[0])
    admin.start(create=False)
    made_elsewhere = admin.rotate(activate_after_s=0)
    server.reload()
    assert server.signer().kid == made_elsewhere
    server.rotate(activate_after_s=0)
    now[0] += 60 + 60 + 1  # the admin's lifetime would have retired it by now
    assert server.find(made_elsewhere) is not None
    now[0] += 3600
    assert server.find(made_elsewhere) is None


# -- rotation publishes before it signs -----------------------------------------------


def _jwks_kids(manager: KeyManager) -> list[str]:
    keys = manager.jwks()["keys"]
    assert isinstance(keys, list)
    return [k["kid"] for k in keys]


def test_rotation_publishes_the_new_key_before_it_signs(db: Database, tmp_path: Path) -> None:
    now = [1000.0]
    manager = KeyManager(
        KeyStore(db, tmp_path / "keys"), alg="EdDSA", access_ttl_s=300, clock=lambda: now[0]
    )
    manager.start(create=True)
    old = manager.signer().kid
    new = manager.rotate()  # default delay
    assert _jwks_kids(manager) == [new, old]  # published at once...
    assert manager.signer().kid == old  # ...but not signing yet
    now[0] += KEY_ACTIVATION_DELAY_S - 1
    assert manager.signer().kid == old
    now[0] += 1
    assert manager.signer().kid == new  # switched by the clock: no reload, no restart
    # The old key signed until the switch: it retires after its tokens from then expire.
    now[0] += 300 + RETIRE_SLACK_S
    assert manager.find(old) is not None
    now[0] += 1
    assert manager.find(old) is None and _jwks_kids(manager) == [new]


def test_a_key_scheduled_by_another_process_activates_without_a_restart(
    db: Database, tmp_path: Path
) -> None:
    now = [1000.0]
    store = KeyStore(db, tmp_path / "keys")
    server = KeyManager(store, alg="EdDSA", access_ttl_s=900, clock=lambda: now[0])
    server.start(create=True)
    old = server.signer().kid
    admin = KeyManager(store, alg="EdDSA", access_ttl_s=900, clock=lambda: now[0])
    admin.start(create=False)
    new = admin.rotate(activate_after_s=60)  # auth-rpc rotate-key --activate-after 60
    server.reload()  # what the running service does every 5 s
    assert _jwks_kids(server) == [new, old] and server.signer().kid == old
    now[0] += 60
    assert server.signer().kid == new


def test_emergency_rotation_switches_at_once_and_cancels_a_pending_key(
    db: Database, tmp_path: Path
) -> None:
    now = [1000.0]
    manager = KeyManager(
        KeyStore(db, tmp_path / "keys"), alg="EdDSA", access_ttl_s=300, clock=lambda: now[0]
    )
    manager.start(create=True)
    manager.rotate(activate_after_s=100)  # pending
    urgent = manager.rotate(activate_after_s=0)  # auth-rpc rotate-key --now
    assert manager.signer().kid == urgent
    now[0] += 100
    assert manager.signer().kid == urgent  # the pending key never signs


def test_a_switch_of_algorithm_at_start_is_published_first(db: Database, tmp_path: Path) -> None:
    now = [1000.0]
    store = KeyStore(db, tmp_path / "keys")
    first = KeyManager(store, alg="EdDSA", access_ttl_s=300, clock=lambda: now[0])
    first.start(create=True)
    old = first.signer()
    again = KeyManager(
        store, alg="RS256", access_ttl_s=300, clock=lambda: now[0], activation_delay_s=120
    )
    again.start(create=True)
    assert again.signer().kid == old.kid
    (new,) = set(_jwks_kids(again)) - {old.kid}
    now[0] += 120
    assert again.signer().kid == new and again.signer().alg == "RS256"
    restarted = KeyManager(store, alg="RS256", access_ttl_s=300, clock=lambda: now[0])
    restarted.start(create=True)  # nothing more to make
    assert set(_jwks_kids(restarted)) == {old.kid, new}


def test_rotation_is_refused_where_an_hs256_secret_signs(db: Database, tmp_path: Path) -> None:
    store = KeyStore(db, tmp_path / "keys")
    hs = SigningKey.hs256(b"s" * 32)
    server = KeyManager(store, alg="HS256", access_ttl_s=300, clock=lambda: 1000.0, hs256_key=hs)
    server.start(create=True)
    admin = KeyManager(store, alg="EdDSA", access_ttl_s=300, clock=lambda: 1000.0)
    admin.start(create=False)  # what auth-rpc rotate-key opens
    for manager in (admin, server):
        with pytest.raises(ValueError, match=r"HS256 secret.*--hs256-secret-file.*verifier"):
            manager.rotate()
        with pytest.raises(ValueError, match="HS256 secret"):
            manager.rotate("ES256")
    assert store.records() == [] and list((tmp_path / "keys").iterdir()) == []
    server.reload(force=True)
    assert server.jwks() == {"keys": []} and server.signer() is hs


def test_activation_delay_covers_what_verifiers_may_cache() -> None:
    from auth_rpc.auth.http import JWKS_MAX_AGE_S
    from auth_rpc.verify.jwks import JwksVerifier

    defaults = inspect.signature(JwksVerifier).parameters
    reload_s = inspect.signature(KeyManager).parameters["reload_interval_s"].default
    delay = KEY_ACTIVATION_DELAY_S
    assert delay >= JWKS_MAX_AGE_S + reload_s + 30  # HTTP caches (Cache-Control max-age)
    assert delay >= defaults["max_key_age_s"].default + reload_s + 30  # the jwks verifier
    assert delay > defaults["refresh_cooldown_s"].default + reload_s


# -- files another user could have written ----------------------------------------------


def test_a_key_file_whose_kid_is_not_its_thumbprint_is_refused(
    db: Database, tmp_path: Path
) -> None:
    store = KeyStore(db, tmp_path / "keys")
    manager = KeyManager(store, alg="EdDSA", access_ttl_s=900, clock=lambda: 1000.0)
    manager.start(create=True)
    path = tmp_path / "keys" / f"{manager.signer().kid}.pem"
    path.write_bytes(SigningKey.generate("EdDSA").private_pem())  # someone else's key
    fresh = KeyManager(store, alg="EdDSA", access_ttl_s=900, clock=lambda: 1000.0)
    with pytest.raises(UnsafeFile, match=rf"{path}.*thumbprint"):
        fresh.start(create=True)


@pytest.mark.parametrize(
    ("target", "mode"), [("dir", 0o770), ("dir", 0o707), ("file", 0o620), ("file", 0o602)]
)
def test_group_or_other_writable_keys_are_refused(
    db: Database, tmp_path: Path, target: str, mode: int
) -> None:
    store = KeyStore(db, tmp_path / "keys")
    manager = KeyManager(store, alg="EdDSA", access_ttl_s=900, clock=lambda: 1000.0)
    manager.start(create=True)
    path = tmp_path / "keys"
    if target == "file":
        path = path / f"{manager.signer().kid}.pem"
    path.chmod(mode)
    fresh = KeyManager(store, alg="EdDSA", access_ttl_s=900, clock=lambda: 1000.0)
    with pytest.raises(UnsafeFile, match=rf"{path} is writable by group or others"):
        fresh.start(create=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("target", ["dir", "file"])
def test_keys_owned_by_another_user_are_refused(
    db: Database, tmp_path: Path, target: str
) -> None:
    store = KeyStore(db, tmp_path / "keys")
    manager = KeyManager(store, alg="EdDSA", access_ttl_s=900, clock=lambda: 1000.0)
    manager.start(create=True)
    path = tmp_path / "keys"
    if target == "file":
        path = path / f"{manager.signer().kid}.pem"
    os.chown(path, NOBODY, NOBODY)
    fresh = KeyManager(store, alg="EdDSA", access_ttl_s=900, clock=lambda: 1000.0)
    with pytest.raises(UnsafeFile, match=rf"{path} is owned by uid {NOBODY}"):
        fresh.start(create=True)
