"""The verifiers' fast JWS path accepts exactly what PyJWS accepts.

``_JwtVerifier._verify_signature`` checks a token in the plain compact form
itself (strict base64url, canonical segments, the key prepared once) and
sends every other token to PyJWS's ``decode_complete``, the reference. Here
both paths judge the same tokens: valid ones, hand-made oddities (padding,
``+`` and ``/``, non-canonical last characters, ``b64`` and ``kid`` headers,
signatures of other keys and lengths) and a few thousand seeded random
mutations of valid tokens. Each must get the same answer from both: the same
principal, or the same error class and message. An attacker who finds a
token only the fast path accepts finds a failure here first.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import random
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from auth_rpc.errors import AuthError
from auth_rpc.verify import _jwt
from auth_rpc.verify.local import LocalVerifier

ISS, AUD = "https://issuer.example", "posts"
NOW = 1_900_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS, "aud": AUD, "sub": "alice", "jti": "j-1", "iat": int(NOW) - 10,
        "exp": int(NOW) + 600, "scope": "posts:read", "client_id": "c",
    }
    base.update(over)
    return base


class SlowOnly(LocalVerifier):
    """The same verifier with the fast path never taken: PyJWS judges every token."""

    def _verify_compact(self, *args: Any) -> bytes | None:
        return None


KEYS: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    "HS256": lambda: (secret := b"s" * 16 + bytes(range(16)), {"hs256_secret": secret}),
    "EdDSA": lambda: (k := ed25519.Ed25519PrivateKey.generate(), {"key": k.public_key()}),
    "ES256": lambda: (k := ec.generate_private_key(ec.SECP256R1()), {"key": k.public_key()}),
    "RS256": lambda: (
        k := rsa.generate_private_key(public_exponent=65537, key_size=2048),
        {"key": k.public_key()},
    ),
}


def pair(alg: str) -> tuple[Any, LocalVerifier, LocalVerifier]:
    signing, settings = KEYS[alg]()
    common = dict(issuer=ISS, audience=AUD, status_list="off", cache_ttl_s=0,
                  clock=lambda: NOW, algorithms=[alg], **settings)
    return signing, LocalVerifier(**common), SlowOnly(**common)


def outcome(verifier: LocalVerifier, token: str) -> Any:
    try:
        return verifier.verify(token)
    except AuthError as exc:
        return (type(exc).__name__, str(exc))


def sign(signing: Any, alg: str, header: dict[str, Any], payload: dict[str, Any]) -> str:
    return jwt.encode(payload, signing, algorithm=alg, headers=header)


def hand_made(signing: Any, alg: str) -> list[str]:
    """Valid tokens and the oddities an attacker would try first."""
    good = sign(signing, alg, {"typ": "at+jwt", "kid": "k"}, claims())
    head, body, sig = good.split(".")
    raw_sig = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    tokens = [
        good,
        f"{head}.{body}.{sig}=",
        f"{head}.{body}.{sig}==",
        f"{head}=.{body}.{sig}",
        f"{head}.{body}.{sig}.",
        f"{head}.{body}..{sig}",
        f"{head}..{sig}",
        f"{head}.{body}.",
        f".{body}.{sig}",
        f"{head}.{body}.{sig[:-1]}",
        f"{head}.{body}.{sig}A",
        f"{head}.{body}.{b64(raw_sig[:-1])}",
        f"{head}.{body}.{b64(raw_sig + b'x')}",
        f"{head}.{body}.{sig.replace('-', '+').replace('_', '/')}",
        f"{head}.{body.replace('-', '+').replace('_', '/')}.{sig}",
        f"{head} .{body}.{sig}",
        f"{head}.{body}.{sig}\n",
        f"{head}.{body[:-1]}.{sig}",
        f"{head}.{b64(b'{}')}.{sig}",
        f"{head}.{body}.{b64(b'')}",
    ]
    # Non-canonical last characters: same bytes decoded, different text.
    for segment_index in range(3):
        parts = good.split(".")
        seg = parts[segment_index]
        if len(seg) % 4 in (2, 3):
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            value = alphabet.index(seg[-1])
            for low in range(1, 16 if len(seg) % 4 == 2 else 4):
                parts[segment_index] = seg[:-1] + alphabet[value | low]
                tokens.append(".".join(parts))
    # Headers the fast path must hand to PyJWS, or refuse as it does.
    for header in (
        {"typ": "at+jwt", "b64": False, "crit": ["b64"]},
        {"typ": "at+jwt", "b64": False},
        {"typ": "at+jwt", "b64": True},
        {"typ": "at+jwt", "kid": 7},
        {"typ": "at+jwt", "kid": None},
        {"typ": "at+jwt", "crit": []},
        {"typ": "JWT"},
        {"typ": "at+jwt", "alg": "none"},
        {"typ": "at+jwt", "jku": "https://evil.example/jwks"},
    ):
        head_json = {"alg": alg, **header}
        signing_input = f"{b64(json.dumps(head_json).encode())}.{body}"
        tokens.append(f"{signing_input}.{sig}")
        if alg == "HS256":
            mac = hmac.new(signing, signing_input.encode(), hashlib.sha256).digest()
            tokens.append(f"{signing_input}.{b64(mac)}")
        else:
            with contextlib.suppress(Exception):  # PyJWT refuses to make some of them
                tokens.append(sign(signing, alg, header, claims()))
    # Another key of the same kind; the other algorithms' tokens.
    other, _ = KEYS[alg]()
    tokens.append(sign(other, alg, {"typ": "at+jwt"}, claims()))
    tokens.append(sign(b"x" * 32, "HS256", {"typ": "at+jwt"}, claims()))
    # Claims that fail after the signature: the checks after it are shared, but the
    # payload bytes must be the same ones.
    for over in ({"exp": int(NOW) - 100}, {"aud": "other"}, {"iss": "x"}, {"scope": 5}):
        tokens.append(sign(signing, alg, {"typ": "at+jwt"}, claims(**over)))
    return tokens


def mutations(token: str, rng: random.Random, count: int) -> list[str]:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=. \x00"
    out = []
    for _ in range(count):
        chars = list(token)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            i = rng.randrange(len(chars))
            action = rng.random()
            if action < 0.6:
                chars[i] = rng.choice(alphabet)
            elif action < 0.8:
                del chars[i]
            else:
                chars.insert(i, rng.choice(alphabet))
        mutant = "".join(chars)
        if mutant != token and mutant:
            out.append(mutant)
    return out


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_fast_path_agrees_with_pyjws(alg: str) -> None:
    signing, fast, slow = pair(alg)
    rng = random.Random(f"issue-14-{alg}")
    tokens = hand_made(signing, alg)
    good = tokens[0]
    tokens += mutations(good, rng, 1500 if alg in ("HS256", "EdDSA") else 400)
    accepted = 0
    for token in tokens:
        expected = outcome(slow, token)
        got = outcome(fast, token)
        assert got == expected, f"{alg}: {token!r}: fast {got!r}, PyJWS {expected!r}"
        accepted += not isinstance(expected, tuple)
    assert not isinstance(outcome(fast, good), tuple)
    print(f"\n{alg}: {len(tokens)} tokens, {accepted} accepted by both")
    # The base64url alphabet's case flips and the like may leave a few valid (a
    # changed signature character in the bits decoding ignores is refused, above).
    assert accepted < 0.01 * len(tokens) + 2


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_fast_path_is_taken_for_a_plain_token(alg: str) -> None:
    """The speed this path exists for is not silently lost: a normal token uses it."""
    signing, fast, _ = pair(alg)
    token = sign(signing, alg, {"typ": "at+jwt", "kid": "k"}, claims())
    header, checked_alg = fast._header(token)
    payload = fast._verify_compact(token, fast._key, checked_alg, header)
    assert payload is not None and json.loads(payload)["sub"] == "alice"


def test_fast_path_refuses_an_algorithm_not_configured() -> None:
    """Even when a caller passes it a header it did not check."""
    signing, fast, _ = pair("HS256")
    token = sign(signing, "HS256", {"typ": "at+jwt"}, claims())
    with pytest.raises(AuthError, match="algorithm not allowed"):
        fast._verify_compact(token, fast._key, "HS512", {"alg": "HS512"})


def test_prepared_keys_follow_the_key_object() -> None:
    """A key prepared once is never used for another key object (no id() reuse)."""
    signing, fast, _ = pair("EdDSA")
    token = sign(signing, "EdDSA", {"typ": "at+jwt"}, claims())
    header, alg = fast._header(token)
    assert fast._verify_compact(token, fast._key, alg, header) is not None
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(AuthError, match="invalid token signature"):
        fast._verify_compact(token, other, alg, header)
    assert len(fast._prepared) == 2
    for _ in range(100):  # bounded however many keys come and go
        fast._prepared_key(ed25519.Ed25519PrivateKey.generate().public_key(), "EdDSA")
    assert len(fast._prepared) <= 64
    assert _jwt._canonical_b64url("AQ") and not _jwt._canonical_b64url("AR")
