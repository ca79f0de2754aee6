"""Signing keys shared by Auth replicas on PostgreSQL: sealed in the database with a
key-encryption key (KEK) file; each replica with a data directory of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import psycopg
import pytest

from auth_rpc.auth.keys import SigningKey
from auth_rpc.auth.sealing import KeyEncryptionKeyError, KeySealer, new_kek_file, read_kek_file
from auth_rpc.auth.service import AuthService, AuthSettings
from auth_rpc.errors import TokenRejected
from auth_rpc.serving.private_files import UnsafeFile

PASSWORD = "correct horse battery staple"
ISSUER = "https://auth.test"


@pytest.fixture
def open_replica(
    tmp_path: Path, postgresql_url: str, key_encryption_key_file: Path
) -> Iterator[Callable[..., AuthService]]:
    """``open_replica(name, kek=..., **settings)``: an AuthService on the shared database,
    with a data directory of its own (``tmp_path/name``)."""
    opened: list[AuthService] = []

    def open_(
        name: str, kek: Path | None = key_encryption_key_file, **fields: object
    ) -> AuthService:
        settings = AuthSettings(
            data_dir=tmp_path / name, issuer=ISSUER, audience="posts",
            database_url=postgresql_url, key_encryption_key_file=kek, **fields,  # type: ignore[arg-type]
        )
        service = AuthService.open(settings)
        opened.append(service)
        return service

    yield open_
    for service in opened:
        service.close()


def _verify_with_jwks(token: str, jwks: dict[str, object]) -> dict[str, object]:
    """Verify ``token`` as a verifier would: with the published JWK Set only."""
    kid = jwt.get_unverified_header(token)["kid"]
    keys = [k for k in jwks["keys"] if k["kid"] == kid]  # type: ignore[attr-defined]
    assert keys, f"kid {kid} not in the JWK Set"
    key = jwt.PyJWK(keys[0])
    claims: dict[str, object] = jwt.decode(
        token, key.key, algorithms=[keys[0]["alg"]], audience="posts", issuer=ISSUER
    )
    return claims


def _poll(condition: Callable[[], bool], *, timeout_s: float, what: str) -> float:
    """Seconds until ``condition()`` held (polled, never slept on blindly)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.002)
    return time.monotonic() - start


def test_replicas_sign_with_one_key_and_publish_one_jwks(
    open_replica: Callable[..., AuthService],
) -> None:
    first = open_replica("a")
    second = open_replica("b")
    first.add_user("alice", PASSWORD, ["posts:read"])
    assert first.signing_key().kid == second.signing_key().kid
    assert first.jwks() == second.jwks()
    by_first = first.login("alice", PASSWORD)
    by_second = second.login("alice", PASSWORD)
    for token in (by_first.access_token, by_second.access_token):
        assert _verify_with_jwks(token, first.jwks())["sub"] == "alice"
        assert _verify_with_jwks(token, second.jwks())["sub"] == "alice"
        assert first.validate(token).subject == second.validate(token).subject == "alice"
    # A refresh token of one replica rotates at the other.
    assert second.validate(second.refresh(by_first.refresh_token).access_token)
    # No key file anywhere: the keys are in the database only.
    for name in ("a", "b"):
        keys_dir = first.settings.data_dir.parent / name / "keys"
        assert not keys_dir.exists() or not any(keys_dir.iterdir())


def test_a_replica_started_later_gets_the_keys_from_the_database(
    open_replica: Callable[..., AuthService],
) -> None:
    first = open_replica("a")
    first.add_user("alice", PASSWORD, ["posts:read"])
    pair = first.login("alice", PASSWORD)
    later = open_replica("c")  # a new machine: an empty data directory
    assert later.signing_key().kid == first.signing_key().kid
    assert later.validate(pair.access_token).subject == "alice"
    assert later.jwks() == first.jwks()


def test_rotate_key_reaches_every_replica_without_restart(
    open_replica: Callable[..., AuthService],
) -> None:
    first = open_replica("a")
    second = open_replica("b")
    first.add_user("alice", PASSWORD, ["posts:read"])
    old_kid = first.signing_key().kid
    old_token = second.login("alice", PASSWORD).access_token

    # Published at once everywhere, signing later (by the clock, at every replica).
    pending = first.rotate_key(activate_after_s=2)
    waited = _poll(
        lambda: pending in [k["kid"] for k in second.jwks()["keys"]],  # type: ignore[index]
        timeout_s=5, what="the pending key in the other replica's JWK Set",
    )
    print(f"pending key published by the other replica after {waited * 1000:.1f} ms")
    assert second.signing_key().kid == old_kid
    _poll(lambda: second.signing_key().kid == pending, timeout_s=10, what="activation")
    token = second.login("alice", PASSWORD).access_token
    assert jwt.get_unverified_header(token)["kid"] == pending
    assert _verify_with_jwks(token, first.jwks())["sub"] == "alice"

    # An emergency rotation (rotate-key --now) switches every replica at once.
    emergency = second.rotate_key(activate_after_s=0)
    waited = _poll(
        lambda: first.signing_key().kid == emergency, timeout_s=5,
        what="the other replica signing with the new key",
    )
    print(f"emergency rotation seen by the other replica after {waited * 1000:.1f} ms")
    assert first.jwks() == second.jwks()
    # Older keys keep verifying until their tokens expire.
    for service in (first, second):
        assert service.validate(old_token).subject == "alice"
    assert old_kid in [k["kid"] for k in first.jwks()["keys"]]  # type: ignore[index]


def test_rotate_key_by_the_command_reaches_running_replicas(
    open_replica: Callable[..., AuthService], postgresql_url: str,
    key_encryption_key_file: Path, tmp_path: Path,
) -> None:
    first = open_replica("a")
    second = open_replica("b")
    done = subprocess.run(  # our own command, fixed arguments
        [sys.executable, "-m", "auth_rpc.auth.cli", "rotate-key", "--now", "--data-dir",
         str(tmp_path / "admin"), "--database-url", postgresql_url,
         "--key-encryption-key-file", str(key_encryption_key_file)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    kid = done.stdout.split()[3].rstrip(":")
    for service in (first, second):
        _poll(lambda s=service: s.signing_key().kid == kid, timeout_s=5, what="the new key")


def test_the_database_holds_no_private_key_in_clear(
    open_replica: Callable[..., AuthService], postgresql_url: str,
) -> None:
    service = open_replica("a")
    key = service.signing_key()
    with psycopg.connect(postgresql_url) as conn:
        rows = conn.execute("SELECT kid, alg, sealed_key FROM signing_keys").fetchall()
        dump = b"".join(  # every column of the table, as a dump would hold them
            v if isinstance(v, bytes) else str(v).encode()
            for row in conn.execute("SELECT * FROM signing_keys").fetchall()
            for v in row
        )
    assert [(r[0], r[1]) for r in rows] == [(key.kid, key.alg)]
    secret = key.private_der()
    raw = key.private_key.private_bytes_raw()  # the 32-byte Ed25519 seed
    for clear in (secret, raw, key.private_pem()):
        assert clear not in bytes(rows[0][2]) and clear not in dump


def test_a_wrong_kek_is_refused_naming_the_problem(
    open_replica: Callable[..., AuthService], tmp_path: Path,
) -> None:
    open_replica("a")
    other = tmp_path / "other-kek"
    new_kek_file(other)
    with pytest.raises(KeyEncryptionKeyError, match="sealed with another key-encryption key"):
        open_replica("b", kek=other)
    with pytest.raises(KeyEncryptionKeyError, match="give --key-encryption-key-file"):
        open_replica("c", kek=None)


def test_a_sealed_key_moved_to_another_row_is_refused(
    open_replica: Callable[..., AuthService], postgresql_url: str,
) -> None:
    first = open_replica("a")
    first.rotate_key(activate_after_s=0)
    first.close()
    with psycopg.connect(postgresql_url) as conn:
        rows = conn.execute("SELECT kid, sealed_key FROM signing_keys ORDER BY kid").fetchall()
        assert len(rows) == 2
        # An attacker who may write the database swaps the sealed keys of two rows.
        for (kid, _), (_, sealed) in zip(rows, reversed(rows), strict=True):
            conn.execute("UPDATE signing_keys SET sealed_key = %s WHERE kid = %s", (sealed, kid))
    with pytest.raises(KeyEncryptionKeyError, match="fails authentication"):
        open_replica("b")


def test_a_key_sealed_for_another_kid_is_refused_even_with_matching_data() -> None:
    sealer = KeySealer(os.urandom(32))
    key = SigningKey.generate("EdDSA")
    sealed = sealer.seal(key.kid, "EdDSA", key.private_der())
    assert sealer.unseal(key.kid, "EdDSA", sealed) == key.private_der()
    for kid, alg in ((key.kid, "ES256"), ("another-kid", "EdDSA")):
        with pytest.raises(KeyEncryptionKeyError, match="fails authentication"):
            sealer.unseal(kid, alg, sealed)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(KeyEncryptionKeyError, match="fails authentication"):
        sealer.unseal(key.kid, "EdDSA", bytes(tampered))
    assert "kek_id=" in repr(sealer) and sealed.hex() not in repr(sealer)


def test_kek_files_are_checked(tmp_path: Path) -> None:
    made = tmp_path / "kek"
    kek_id = new_kek_file(made)
    assert (made.stat().st_mode & 0o777) == 0o600 and made.stat().st_size == 32
    assert KeySealer(read_kek_file(made)).kek_id.hex() == kek_id
    with pytest.raises(FileExistsError):
        new_kek_file(made)  # never overwrites a KEK
    hex_form = tmp_path / "hex"
    hex_form.write_text(made.read_bytes().hex() + "\n")
    hex_form.chmod(0o600)
    assert read_kek_file(hex_form) == made.read_bytes()
    made.chmod(0o640)
    with pytest.raises(UnsafeFile, match="chmod 600"):
        read_kek_file(made)
    short = tmp_path / "short"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    with pytest.raises(KeyEncryptionKeyError, match="expected exactly 32"):
        read_kek_file(short)
    with pytest.raises(KeyEncryptionKeyError, match="cannot read"):
        read_kek_file(tmp_path / "missing")


def test_a_kek_rotation_rewraps_every_key(
    open_replica: Callable[..., AuthService], key_encryption_key_file: Path, tmp_path: Path,
) -> None:
    first = open_replica("a")
    first.add_user("alice", PASSWORD, ["posts:read"])
    first.rotate_key(activate_after_s=60)  # a pending key too
    token = first.login("alice", PASSWORD).access_token
    first.close()
    new = tmp_path / "new-kek"
    new_kek_file(new)
    both = open_replica("b", kek=new, old_key_encryption_key_files=(key_encryption_key_file,))
    assert both.rewrap_keys() == 2
    assert both.rewrap_keys() == 0  # idempotent
    assert open_replica("c", kek=new).validate(token).subject == "alice"
    with pytest.raises(KeyEncryptionKeyError, match="another key-encryption key"):
        open_replica("d", kek=key_encryption_key_file)


def test_tokens_of_a_replica_are_not_accepted_with_a_foreign_key(
    open_replica: Callable[..., AuthService],
) -> None:
    first = open_replica("a")
    first.add_user("alice", PASSWORD, ["posts:read"])
    token = first.login("alice", PASSWORD).access_token
    stranger = SigningKey.generate("EdDSA", kid=first.signing_key().kid)
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode(claims, stranger.private_key, algorithm="EdDSA", headers=header)
    with pytest.raises(TokenRejected):
        open_replica("b").validate(forged)


# -- the commands ------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own command, fixed arguments
        [sys.executable, "-m", "auth_rpc.auth.cli", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_serve_with_a_wrong_or_missing_kek_exits_1_saying_why(
    open_replica: Callable[..., AuthService], postgresql_url: str, tmp_path: Path,
) -> None:
    open_replica("a")
    wrong = tmp_path / "wrong-kek"
    made = _cli("new-kek", str(wrong))
    assert made.returncode == 0, made.stderr
    assert "mode 0600" in made.stdout
    assert _cli("new-kek", str(wrong)).returncode == 1  # never overwritten
    serve = ["serve", "--port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "b"),
             "--database-url", postgresql_url]
    for extra, expected in (
        (["--key-encryption-key-file", str(wrong)], "sealed with another key-encryption key"),
        ([], "give --key-encryption-key-file"),
        (["--key-encryption-key-file", str(tmp_path / "nope")], "cannot read the key-encryption"),
    ):
        done = _cli(*serve, *extra)
        assert done.returncode == 1, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("auth-rpc: error:") and expected in last, done.stderr
        assert "Traceback" not in done.stderr
    # A KEK without a database URL is a mistake, said as such.
    sqlite = _cli("keys", "--data-dir", str(tmp_path / "s"), "--key-encryption-key-file",
                  str(wrong))
    assert sqlite.returncode == 1 and "goes with --database-url" in sqlite.stderr
