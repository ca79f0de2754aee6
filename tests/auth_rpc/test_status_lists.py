"""The Auth service's Token Status Lists: entries, revocations, retirement, the list tokens."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from auth_rpc.auth.service import AuthService, AuthSettings
from auth_rpc.auth.status import permute
from auth_rpc.auth.tokens import LEEWAY_S, mint_access_token
from auth_rpc.errors import NotFoundError, TokenRejected
from auth_rpc.verify.statuslist import StatusList

PASSWORD = "correct horse battery staple"  # the conftest's alice
USER_SCOPES = ("posts:read", "posts:write")
FakeClock = Any  # the conftest's clock: .now, .advance(seconds)


def status_of(token: str) -> tuple[str, int]:
    ref = jwt.decode(token, options={"verify_signature": False})["status"]["status_list"]
    return ref["uri"], ref["idx"]


def list_claims(service: AuthService, list_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and verified claims of list ``list_id``'s token (verified with the JWK Set)."""
    encoded = service.status_list_token(list_id)
    header = jwt.get_unverified_header(encoded.token)
    key = jwt.PyJWKSet.from_dict(service.jwks())[header["kid"]]
    claims = jwt.decode(encoded.token, key, algorithms=[header["alg"]])
    return header, claims


def bit(service: AuthService, token: str) -> int:
    uri, idx = status_of(token)
    _, claims = list_claims(service, int(uri.rsplit("/", 1)[1]))
    return StatusList.from_json(claims["status_list"]).get(idx)


def test_every_issued_token_has_its_own_entry(service: AuthService, alice: str) -> None:
    client_secret = service.add_client("svc", ["posts:read"])
    tokens = []
    for _ in range(10):
        issued = service.login(alice, PASSWORD)
        tokens.append(issued.access_token)
        tokens.append(service.refresh(issued.refresh_token).access_token)
        tokens.append(service.client_token("svc", client_secret).access_token)
    entries = {status_of(t) for t in tokens}
    assert len(entries) == len(tokens)
    assert {uri for uri, _ in entries} == {service.status_list_prefix + "1"}
    assert service.status_list_prefix == "https://auth.test/statuslists/"  # the issuer's
    assert all(0 <= idx < 1_000_000 for _, idx in entries)
    for token in tokens:
        assert service.validate(token).subject in ("alice", "svc")


def test_indices_are_a_permutation_and_a_full_list_starts_the_next(
    open_service: Callable[..., AuthService],
) -> None:
    service = open_service(status_list_size=64)
    claims = [service.allocate_status(2_000_000_000)["status_list"] for _ in range(65)]
    first = [c["idx"] for c in claims[:64]]  # type: ignore[index]
    assert sorted(first) == list(range(64))  # every index once
    assert first != list(range(64))  # not sequential (draft section 12.4 / 13.3)
    assert {c["uri"] for c in claims[:64]} == {service.status_list_prefix + "1"}  # type: ignore[index]
    assert claims[64]["uri"] == service.status_list_prefix + "2"  # type: ignore[index]
    key = b"k" * 16
    for capacity in (8, 24, 1000, 1 << 20):
        sample = range(min(capacity, 5000))
        assert len({permute(n, capacity, key) for n in sample}) == len(sample)
        assert all(0 <= permute(n, capacity, key) < capacity for n in sample)


ALLOCATE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from auth_rpc.auth.service import AuthService, AuthSettings
    settings = AuthSettings(data_dir=Path(sys.argv[1]), issuer="https://auth.test",
                            status_list_size=256)
    service = AuthService.open(settings)
    print("ready", flush=True)
    sys.stdin.readline()  # both processes start allocating together
    out = [service.allocate_status(2_000_000_000)["status_list"] for _ in range(300)]
    service.close()
    print(json.dumps(out))
    """
)


def test_processes_sharing_the_database_never_share_an_entry(
    open_service: Callable[..., AuthService], data_dir: Path
) -> None:
    """--workers: the allocation is a BEGIN IMMEDIATE transaction, one writer at a time."""
    open_service(status_list_size=256).close()  # data dir, schema and key made once
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ALLOCATE, str(data_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        results += json.loads(out.strip().splitlines()[-1])
    entries = {(r["uri"], r["idx"]) for r in results}
    assert len(entries) == 600  # 600 tokens, 600 entries, across three lists
    assert len({uri for uri, _ in entries}) == 3


def test_a_full_list_is_retired_once_every_token_in_it_has_expired(
    open_service: Callable[..., AuthService], clock: FakeClock
) -> None:
    service = open_service(status_list_size=8, access_ttl_s=60)
    service.add_user("alice", PASSWORD, USER_SCOPES)
    tokens = [service.login("alice", PASSWORD).access_token for _ in range(9)]
    assert {status_of(t)[0] for t in tokens[:8]} == {service.status_list_prefix + "1"}
    assert status_of(tokens[8])[0] == service.status_list_prefix + "2"
    assert service.status_list_uris() == [
        service.status_list_prefix + "1", service.status_list_prefix + "2"
    ]
    clock.advance(60 + LEEWAY_S - 1)
    service.revoke("opportunity-to-purge")  # any write purges (every 600 s at most)
    service.status_list_token(1)  # its last tokens have not expired beyond the leeway
    clock.advance(600)
    service.revoke("opportunity-to-purge")
    with pytest.raises(NotFoundError):
        service.status_list_token(1)
    assert service.status_list_uris() == [service.status_list_prefix + "2"]
    service.status_list_token(2)  # the list in use is never retired
    assert status_of(service.login("alice", PASSWORD).access_token)[0].endswith("/2")


def test_every_kind_of_revocation_sets_the_bits_and_validate_reads_them(
    service: AuthService, alice: str
) -> None:
    # An access token.
    token, other = (service.login(alice, PASSWORD).access_token for _ in range(2))
    assert bit(service, token) == 0
    service.revoke(token)
    assert (bit(service, token), bit(service, other)) == (1, 0)
    with pytest.raises(TokenRejected, match="token revoked"):
        service.validate(token)
    assert service.introspect(token) == {"active": False}
    assert service.validate(other).subject == alice
    service.revoke(token)  # idempotent
    assert bit(service, token) == 1
    # A reused refresh token: its family, and every access token issued from it.
    first = service.login(alice, PASSWORD)
    second = service.refresh(first.refresh_token)
    with pytest.raises(TokenRejected, match="reused"):
        service.refresh(first.refresh_token)
    for revoked in (first.access_token, second.access_token):
        assert bit(service, revoked) == 1
        with pytest.raises(TokenRejected, match="token revoked"):
            service.validate(revoked)
    # Revoking a refresh token (what logout does with both): its family's access tokens.
    third = service.login(alice, PASSWORD)
    fourth = service.refresh(third.refresh_token)
    service.revoke(fourth.refresh_token)
    assert (bit(service, third.access_token), bit(service, fourth.access_token)) == (1, 1)
    assert bit(service, other) == 0


def test_the_served_list_shows_a_revocation_at_once(service: AuthService, alice: str) -> None:
    token = service.login(alice, PASSWORD).access_token
    before = service.status_list_token(1)
    assert service.status_list_token(1) is before  # encoded once per version
    service.revoke(token)
    after = service.status_list_token(1)  # same second, same clock: a new version anyway
    assert after.etag != before.etag and after.version > before.version
    assert bit(service, token) == 1


def test_the_list_token(service: AuthService, alice: str, clock: FakeClock) -> None:
    service.login(alice, PASSWORD)
    header, claims = list_claims(service, 1)
    assert header == {"alg": "EdDSA", "typ": "statuslist+jwt", "kid": service.signing_key().kid}
    uri = service.status_list_prefix + "1"
    assert claims == {
        "iss": "https://auth.test",
        "sub": uri,
        "iat": int(clock.now),
        "exp": int(clock.now) + 600,
        "ttl": 1,
        "status_list": claims["status_list"],
    }
    assert claims["status_list"]["bits"] == 1
    assert StatusList.from_json(claims["status_list"]).size == 1_000_000
    # Signed again when half its lifetime has passed, even unchanged.
    first = service.status_list_token(1)
    clock.advance(299)
    assert service.status_list_token(1) is first
    clock.advance(1)
    again = service.status_list_token(1)
    assert again.iat == first.iat + 300 and again.etag != first.etag
    with pytest.raises(NotFoundError):
        service.status_list_token(2)


def test_a_status_claim_naming_no_entry_of_ours_is_refused(
    service: AuthService, clock: FakeClock
) -> None:
    key = service.signing_key()
    service.allocate_status(int(clock.now) + 60)  # list 1 exists

    def token(status: Any) -> str:
        return mint_access_token(
            key, issuer="https://auth.test", audience="posts", subject="alice", scopes=(),
            client_id="c", ttl_s=60, now=clock.now, claims={"status": status},
        )

    for status in (
        {"status_list": {"idx": 1, "uri": service.status_list_prefix + "2"}},  # no such list
        {"status_list": {"idx": 1_000_000, "uri": service.status_list_prefix + "1"}},
        {"status_list": {"idx": 1, "uri": "https://elsewhere.test/statuslists/1"}},
        {"status_list": {"idx": 1, "uri": service.status_list_prefix + "01"}},
        {"status_list": {"uri": service.status_list_prefix + "1"}},
        "revoked",
    ):
        with pytest.raises(TokenRejected, match="invalid status claim"):
            service.validate(token(status))
    assert service.validate(token(service.allocate_status(int(clock.now) + 60)))


def test_a_token_without_an_entry_is_revoked_by_its_jti(
    service: AuthService, clock: FakeClock
) -> None:
    """Tokens issued before schema v5 carry no status claim: revoked by jti, as before."""
    legacy = mint_access_token(
        service.signing_key(), issuer="https://auth.test", audience="posts", subject="alice",
        scopes=(), client_id="c", ttl_s=60, now=clock.now,
    )
    assert service.validate(legacy).subject == "alice"
    service.revoke(legacy)
    with pytest.raises(TokenRejected, match="token revoked"):
        service.validate(legacy)


@pytest.mark.parametrize(
    "overrides",
    [
        {"status_list_size": 7},
        {"status_list_size": 0},
        {"status_list_ttl_s": 0},
        {"status_list_lifetime_s": 5},
        {"status_list_ttl_s": 400, "status_list_lifetime_s": 600},
        {"status_list_base_url": "ftp://auth.test"},
        {"status_list_base_url": "https://auth.test/?x=1"},
    ],
)
def test_settings_are_checked(tmp_path: Path, overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="status_list"):
        AuthSettings(data_dir=tmp_path, issuer="https://auth.test", **overrides)
