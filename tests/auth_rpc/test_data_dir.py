"""The Auth data directory at start: a lost or damaged database, unknown keys, unsafe owners.

A new (missing or emptied) database beside an existing ``keys/`` directory, or
key files the database does not know, are refused unless ``init``; a damaged
database is refused naming SQLite's message; a data directory, key directory,
key file or database that another user owns, or that group or others may
write, is refused naming the path (as sshd's StrictModes does).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from auth_rpc.auth.keys import SigningKey
from auth_rpc.auth.service import AuthService, AuthSettings
from auth_rpc.errors import DependencyUnavailable
from auth_rpc.serving.private_files import UnsafeFile

ISSUER = "https://auth.test"
PASSWORD = "correct horse battery staple"
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@pytest.fixture
def opener(data_dir: Path, clock: Any) -> Iterator[Callable[..., AuthService]]:
    opened: list[AuthService] = []

    def open_(*, init: bool = False, create_key: bool = True, **fields: Any) -> AuthService:
        settings = AuthSettings(data_dir=data_dir, issuer=ISSUER, **fields)
        service = AuthService.open(settings, clock=clock, init=init, create_key=create_key)
        opened.append(service)
        return service

    yield open_
    for service in opened:
        service.close()


@pytest.fixture
def used_dir(opener: Callable[..., AuthService], data_dir: Path) -> str:
    """A data dir that served: a user, a key; returns the key's kid."""
    service = opener()
    service.add_user("alice", PASSWORD, ["posts:read"])
    kid = str(jwt.get_unverified_header(service.login("alice", PASSWORD).access_token)["kid"])
    service.close()
    return kid


def lose_database(data_dir: Path, how: str) -> None:
    db = data_dir / "auth.sqlite3"
    if how == "emptied":
        db.write_bytes(b"")  # : > DATA/auth.sqlite3
    else:
        db.unlink()


# -- a lost database -----------------------------------------------------------


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_a_lost_database_beside_keys_is_refused_unless_init(
    opener: Callable[..., AuthService], data_dir: Path, used_dir: str, how: str
) -> None:
    lose_database(data_dir, how)
    for create_key in (True, False):  # serve, and the admin commands
        with pytest.raises(ValueError, match=r"auth.sqlite3 is missing or empty.*--init"):
            opener(create_key=create_key)
    db = data_dir / "auth.sqlite3"
    assert (db.stat().st_size == 0) if how == "emptied" else not db.exists()  # left untouched
    assert (data_dir / "keys" / f"{used_dir}.pem").exists()

    fresh = opener(init=True)  # auth-rpc serve --init: start afresh, on purpose
    assert fresh.signing_key().kid != used_dir
    (aside,) = data_dir.glob("keys-unknown-*")
    assert [p.name for p in aside.iterdir()] == [f"{used_dir}.pem"]
    fresh.close()
    opener()  # consistent again: no flag needed


def test_a_lost_database_is_refused_with_an_hs256_secret_too(
    opener: Callable[..., AuthService], data_dir: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    hs = {"alg": "HS256", "hs256_secret_file": secret}
    service = opener(**hs)
    service.add_user("alice", PASSWORD, ["posts:read"])
    service.close()
    lose_database(data_dir, "deleted")  # no key file: keys/ itself tells the dir was in use
    with pytest.raises(ValueError, match="missing or empty"):
        opener(**hs)


def test_key_files_the_database_does_not_know_are_refused_unless_init(
    opener: Callable[..., AuthService], data_dir: Path, used_dir: str
) -> None:
    stray = SigningKey.generate("EdDSA")
    path = data_dir / "keys" / f"{stray.kid}.pem"
    path.write_bytes(stray.private_pem())
    path.chmod(0o600)
    opener().close()  # just written: maybe a rotation by another process, about to add its row
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    with pytest.raises(ValueError, match=rf"1 signing key file.*{stray.kid}\.pem.*--init"):
        opener()
    service = opener(init=True)
    assert not path.exists() and service.signing_key().kid == used_dir
    assert service.login("alice", PASSWORD)  # the database was kept


def test_a_first_start_needs_no_flag(opener: Callable[..., AuthService], data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)  # an empty directory made beforehand
    opener(create_key=False).close()  # add-user before the first serve (the quick start)
    assert opener().signing_key()


# -- a damaged database --------------------------------------------------------


def test_a_damaged_database_is_refused_naming_sqlites_message(
    opener: Callable[..., AuthService], data_dir: Path, used_dir: str
) -> None:
    db = data_dir / "auth.sqlite3"
    data = bytearray(db.read_bytes())
    data[4096 : 4096 + 16] = b"\xff" * 16  # page 2: the root of the users table
    db.write_bytes(bytes(data))
    with pytest.raises(DependencyUnavailable, match=r"auth\.sqlite3.*disk image is malformed"):
        opener()


def test_a_file_that_is_not_a_database_is_refused(
    opener: Callable[..., AuthService], data_dir: Path, used_dir: str
) -> None:
    (data_dir / "auth.sqlite3").write_bytes(b"this is not SQLite" * 500)
    with pytest.raises(DependencyUnavailable, match=r"auth\.sqlite3.*not a database"):
        opener()


# -- paths another user could have written --------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_data_dir_writable_by_others_is_refused(
    opener: Callable[..., AuthService], data_dir: Path, mode: int
) -> None:
    data_dir.mkdir()
    data_dir.chmod(mode)
    with pytest.raises(UnsafeFile, match=rf"data directory {data_dir} is writable by group"):
        opener()
    assert not (data_dir / "keys").exists()  # nothing was made in it


def test_a_database_writable_by_others_is_refused(
    opener: Callable[..., AuthService], data_dir: Path, used_dir: str
) -> None:
    (data_dir / "auth.sqlite3").chmod(0o662)
    with pytest.raises(UnsafeFile, match=r"auth\.sqlite3 is writable by group or others"):
        opener()


def test_readable_bits_are_still_tightened(
    opener: Callable[..., AuthService], data_dir: Path, used_dir: str
) -> None:
    data_dir.chmod(0o755)
    opener()
    assert data_dir.stat().st_mode & 0o777 == 0o700


@as_root
@pytest.mark.parametrize("target", ["data dir", "database", "keys dir", "key file"])
def test_paths_owned_by_another_user_are_refused(
    opener: Callable[..., AuthService], data_dir: Path, used_dir: str, target: str
) -> None:
    path = {
        "data dir": data_dir,
        "database": data_dir / "auth.sqlite3",
        "keys dir": data_dir / "keys",
        "key file": data_dir / "keys" / f"{used_dir}.pem",
    }[target]
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(UnsafeFile, match=rf"{path} is owned by uid {NOBODY}"):
        opener()


@as_root
def test_the_swapped_keys_attack_is_refused(
    opener: Callable[..., AuthService], data_dir: Path, tmp_path: Path, used_dir: str
) -> None:
    # A 0777 directory owned by nobody, whose owner swaps keys/ before a restart.
    data_dir.chmod(0o777)
    os.chown(data_dir, NOBODY, NOBODY)
    theirs = SigningKey.generate("EdDSA")
    shutil.rmtree(data_dir / "keys")
    (data_dir / "keys").mkdir(mode=0o700)
    (data_dir / "keys" / f"{used_dir}.pem").write_bytes(theirs.private_pem())
    with pytest.raises(UnsafeFile, match="owned by uid 65534"):
        opener()


# -- HS256 -------------------------------------------------------------------------


def test_rotate_key_is_refused_on_an_hs256_deployment(
    opener: Callable[..., AuthService], data_dir: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    served = opener(alg="HS256", hs256_secret_file=secret)
    admin = opener(create_key=False)  # what auth-rpc rotate-key opens
    with pytest.raises(ValueError, match=r"HS256 secret.*hs256-secret-file"):
        admin.rotate_key()
    assert list((data_dir / "keys").iterdir()) == []
    served._keys.reload(force=True)
    assert served.jwks() == {"keys": []}
