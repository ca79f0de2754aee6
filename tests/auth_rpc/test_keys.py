"""Signing keys: generation per algorithm, files, JWKs, HS256 secrets."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from auth_rpc.auth.db import Database
from auth_rpc.auth.keys import KeyManager, KeyStore, SigningKey, read_hs256_secret
from auth_rpc.errors import DependencyUnavailable

ASYMMETRIC = ["EdDSA", "RS256", "ES256"]


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
    new = manager.rotate()
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
    made_elsewhere = admin.rotate()
    server.reload()
    assert server.signer().kid == made_elsewhere
    server.rotate()
    now[0] += 60 + 60 + 1  # the admin's lifetime would have retired it by now
    assert server.find(made_elsewhere) is not None
    now[0] += 3600
    assert server.find(made_elsewhere) is None
