"""argon2id hashing, the dummy hash and bounded concurrency."""

from __future__ import annotations

import argon2
import pytest

from auth_rpc.auth.passwords import ARGON2_PARAMETERS, SecretHasher, constant_time_equals
from auth_rpc.errors import Throttled


@pytest.fixture(scope="module")
def hasher() -> SecretHasher:
    return SecretHasher()


def test_hash_is_argon2id_with_owasp_parameters(hasher: SecretHasher) -> None:
    h = hasher.hash("secret")
    assert h.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert hasher.parameters == {"time_cost": 2, "memory_cost": 19456, "parallelism": 1}
    assert ARGON2_PARAMETERS["memory_cost"] >= 19456


def test_verify(hasher: SecretHasher) -> None:
    h = hasher.hash("secret")
    assert hasher.verify(h, "secret")
    assert not hasher.verify(h, "Secret")
    assert not hasher.verify(h, "")
    assert hasher.hash("secret") != h  # salted


def test_unknown_account_verifies_against_the_dummy(hasher: SecretHasher) -> None:
    assert not hasher.verify(None, "anything")


def test_corrupt_hash_is_a_mismatch(hasher: SecretHasher) -> None:
    assert not hasher.verify("not a hash", "secret")
    assert not hasher.verify("$argon2id$v=19$m=19456,t=2,p=1$broken", "secret")


def test_needs_rehash(hasher: SecretHasher) -> None:
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("secret")
    assert hasher.needs_rehash(weak)
    assert hasher.verify(weak, "secret")
    assert not hasher.needs_rehash(hasher.hash("secret"))
    assert not hasher.needs_rehash("garbage")


@pytest.mark.parametrize("kwargs", [{"memory_cost": 8192}, {"time_cost": 1}, {"parallelism": 0}])
def test_refuses_weak_parameters(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="OWASP"):
        SecretHasher(**kwargs)


def test_saturated_hasher_throttles() -> None:
    hasher = SecretHasher(max_concurrent=1, acquire_timeout_s=0.01)
    held = hasher.admission.acquire("192.0.2.1")  # another call holds the only slot
    try:
        with pytest.raises(Throttled) as info:
            hasher.verify(None, "x")
        assert info.value.retry_after_ms > 0
        with pytest.raises(Throttled):
            hasher.hash("x")
    finally:
        hasher.admission.release(held)
    assert not hasher.verify(None, "x")
    hasher.close()


def test_constant_time_equals() -> None:
    assert constant_time_equals("abc", "abc")
    assert constant_time_equals(b"abc", "abc")
    assert not constant_time_equals("abc", "abd")
    assert not constant_time_equals("abc", "abcd")
