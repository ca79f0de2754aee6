"""The draft's own example Status List Token, read by our verifier's checker.

draft-ietf-oauth-status-list-20 (examples/status_list_jwt_raw.md and the key of
its src/util.py): an ES256 Status List Token of ``https://example.com`` (kid
``12``) whose 16 statuses are ``1001110111000101``. Our checker, given the
draft's public key as the issuer's JWK Set, must accept the token (typ,
signature, ``sub``, ``iat``, ``exp``, ``ttl``), read the same 16 statuses and
refuse index 16. The token is served by a requests adapter: no network. (Its
``exp`` is 2291720170, in 2042.)
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import requests
import urllib3
from requests.adapters import HTTPAdapter

from auth_rpc.errors import DependencyUnavailable, TokenRejected
from auth_rpc.verify.local import LocalVerifier
from auth_rpc.verify.statuslist import StatusListChecker, StatusReference

DRAFT_TOKEN = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6IjEyIiwidHlwIjoic3RhdHVzbGlzdCtqd3QifQ.e"
    "yJleHAiOjIyOTE3MjAxNzAsImlhdCI6MTY4NjkyMDE3MCwiaXNzIjoiaHR0cHM6Ly9le"
    "GFtcGxlLmNvbSIsInN0YXR1c19saXN0Ijp7ImJpdHMiOjEsImxzdCI6ImVOcmJ1UmdBQ"
    "WhjQlhRIn0sInN1YiI6Imh0dHBzOi8vZXhhbXBsZS5jb20vc3RhdHVzbGlzdHMvMSIsI"
    "nR0bCI6NDMyMDB9.2lKUUNG503R9htu4aHAYi7vjmr3sgApbfoDvPrl65N3URUO1EYqq"
    "Ql45Jfzd-Av4QzlKa3oVALpLwOEUOq-U_g"
)
DRAFT_KEY = {
    "kty": "EC", "crv": "P-256", "kid": "12", "alg": "ES256", "use": "sig",
    "x": "I3HWm_0Ds1dPMI-IWmf4mBmH-YaeAVbPVu7vB27CxXo",
    "y": "6N_d5Elj9bs1htgV3okJKIdbHEpkgTmAluYKJemzn1M",
}
URI = "https://example.com/statuslists/1"
STATUSES = "1001110111000101"


class DraftServer(HTTPAdapter):
    """Answers every request with the draft's token, as the issuer would."""

    def __init__(self, body: str) -> None:
        super().__init__()
        self.body = body
        self.urls: list[str] = []

    def send(self, request: Any, **kwargs: Any) -> requests.Response:
        self.urls.append(request.url)
        raw = urllib3.HTTPResponse(
            body=io.BytesIO(self.body.encode()), status=200, preload_content=False,
            headers={"Content-Type": "application/statuslist+jwt"},
        )
        return self.build_response(request, raw)


def _checker(body: str) -> tuple[StatusListChecker, DraftServer, LocalVerifier]:
    verifier = LocalVerifier(
        issuer="https://example.com", audience="any", jwk_set={"keys": [DRAFT_KEY]},
        algorithms=["ES256"], status_list="off",
    )
    server = DraftServer(body)
    session = requests.Session()
    session.mount("https://", server)
    checker = StatusListChecker(
        uri_prefix="https://example.com/statuslists/",
        verify_token=verifier._verify_status_list_token,
        issuer="https://example.com", session=session, background=False,
    )
    return checker, server, verifier


def test_the_drafts_example_token_reads_as_the_draft_says() -> None:
    checker, server, verifier = _checker(DRAFT_TOKEN)
    try:
        read = ""
        for idx in range(16):
            try:
                checker.check(StatusReference(URI, idx))
                read += "0"
            except TokenRejected as exc:
                assert exc.message == "token revoked"
                read += "1"
        assert read == STATUSES
        with pytest.raises(TokenRejected, match="out of range"):
            checker.check(StatusReference(URI, 16))
        assert server.urls == [URI]  # fetched once, then held
    finally:
        checker.close()
        verifier.close()


def test_the_drafts_example_token_altered_is_refused() -> None:
    head, payload, signature = DRAFT_TOKEN.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    checker, _, verifier = _checker(f"{head}.{payload}.{flipped}")
    try:
        # A list that fails its checks is not used: fail closed, never "valid".
        with pytest.raises((DependencyUnavailable, TokenRejected)) as refused:
            checker.check(StatusReference(URI, 0))
        assert "revoked" not in str(refused.value)
    finally:
        checker.close()
        verifier.close()

