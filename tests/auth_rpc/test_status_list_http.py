"""GET /statuslists/<k> and /statuslists over real HTTP, and a plain PyJWT + zlib reader."""

from __future__ import annotations

import contextlib
import gzip
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from typing import Any

import jwt
import requests

from auth_rpc.auth.service import DB_FILENAME
from auth_rpc.idl import auth_thrift
from auth_rpc.serving.transport import open_client
from auth_rpc.testing import TokenFactory
from auth_rpc.verify.statuslist import StatusList

TIMEOUT = 10
JWT_TYPE = "application/statuslist+jwt"


def get(url: str, **headers: str) -> requests.Response:
    return requests.get(url, headers={"Accept": JWT_TYPE, **headers}, timeout=TIMEOUT)


def entry(token: str) -> tuple[str, int]:
    ref = jwt.decode(token, options={"verify_signature": False})["status"]["status_list"]
    return ref["uri"], ref["idx"]


def test_the_list_endpoint(auth_server: Any, token_factory: TokenFactory) -> None:
    token = token_factory.mint("alice")
    uri, idx = entry(token)
    assert uri == f"{auth_server.http_url}/statuslists/1"
    r = get(uri, **{"Accept-Encoding": "identity"})
    assert r.status_code == 200
    assert r.headers["Content-Type"] == JWT_TYPE
    assert "Content-Encoding" not in r.headers
    assert r.headers["Cache-Control"] == "public, max-age=1"
    etag = r.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    header = jwt.get_unverified_header(r.text)
    assert header["typ"] == "statuslist+jwt"
    key = jwt.PyJWKSet.from_dict(requests.get(auth_server.jwks_url, timeout=TIMEOUT).json())
    claims = jwt.decode(r.text, key[header["kid"]], algorithms=[header["alg"]])
    assert claims["sub"] == uri and claims["ttl"] == 1 and claims["exp"] > claims["iat"]
    assert StatusList.from_json(claims["status_list"]).get(idx) == 0
    # gzip when asked (requests asks by default), the same token inside.
    zipped = requests.get(uri, headers={"Accept": JWT_TYPE}, timeout=TIMEOUT, stream=True)
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(zipped.raw.read(decode_content=False)).decode() == r.text
    assert zipped.headers["Vary"] == "Accept-Encoding"
    # Unchanged: 304, for the tag as sent, weak, in a list, or *.
    for condition in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        not_modified = get(uri, **{"If-None-Match": condition})
        assert not_modified.status_code == 304, condition
        assert not_modified.content == b""
        assert not_modified.headers["ETag"] == etag
    assert get(uri, **{"If-None-Match": '"other"'}).status_code == 200
    # A revocation changes it at once.
    auth_server.service.revoke(token)
    changed = get(uri, **{"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    claims = jwt.decode(changed.text, key[header["kid"]], algorithms=[header["alg"]])
    assert StatusList.from_json(claims["status_list"]).get(idx) == 1
    # Content negotiation, methods, unknown lists.
    for accept in (JWT_TYPE, "application/*", "*/*", f"text/html, {JWT_TYPE};q=0.5", ""):
        assert get(uri, Accept=accept).status_code == 200, accept
    for accept in ("application/json", "application/statuslist+cwt", f"{JWT_TYPE};q=0"):
        assert get(uri, Accept=accept).status_code == 406, accept
    head = requests.head(uri, timeout=TIMEOUT)
    assert head.status_code == 200 and head.headers["ETag"] == changed.headers["ETag"]
    assert requests.post(uri, timeout=TIMEOUT).status_code == 405
    for path in ("2", "0", "01", "abc", "1/x", "-1", "99999999999999999999"):
        assert get(f"{auth_server.http_url}/statuslists/{path}").status_code == 404, path


def test_the_aggregation_and_the_metadata(auth_server: Any, token_factory: TokenFactory) -> None:
    base = auth_server.http_url
    assert requests.get(f"{base}/statuslists", timeout=TIMEOUT).json() == {"status_lists": []}
    token_factory.mint()
    r = requests.get(f"{base}/statuslists", timeout=TIMEOUT)
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"status_lists": [f"{base}/statuslists/1"]}
    meta = requests.get(f"{base}/.well-known/oauth-authorization-server", timeout=TIMEOUT).json()
    assert meta["status_list_aggregation_endpoint"] == f"{base}/statuslists"


def test_revocation_over_thrift_and_http_reaches_the_list(
    auth_server: Any, make_user: Any, make_client: Any
) -> None:
    make_user("alice", "a password long enough")
    secret = make_client("rs")
    with contextlib.closing(open_client(auth_thrift.Auth, "127.0.0.1", auth_server.port)) as auth:
        by_thrift = auth.login("alice", "a password long enough", "").access_token
        by_http = auth.client_token("rs", secret, "", "").access_token
        auth.revoke(by_thrift)
    r = requests.post(
        f"{auth_server.http_url}/revoke", data={"token": by_http}, auth=("rs", secret),
        timeout=TIMEOUT,
    )
    assert r.status_code == 200
    uri, _ = entry(by_thrift)
    claims = jwt.decode(get(uri).text, options={"verify_signature": False})
    status_list = StatusList.from_json(claims["status_list"])
    assert status_list.get(entry(by_thrift)[1]) == 1
    assert status_list.get(entry(by_http)[1]) == 1


def test_a_million_entries_at_one_percent_revoked_under_20_kb_on_the_wire(
    auth_server: Any, token_factory: TokenFactory
) -> None:
    token = token_factory.mint()
    uri, idx = entry(token)
    # 10,000 revoked entries at random, written straight into the list (the same rows
    # 10,000 revocations would write, in one transaction).
    revoked = random.Random(3).sample([i for i in range(1_000_000) if i != idx], 10_000)
    db = sqlite3.connect(auth_server.service.settings.data_dir / DB_FILENAME)
    with db:
        db.executemany(
            "INSERT INTO status_bits (list_id, idx) VALUES (1, ?)", [(i,) for i in revoked]
        )
        db.execute("UPDATE status_lists SET version = version + 1 WHERE list_id = 1")
    db.close()
    started = time.perf_counter()
    r = requests.get(uri, headers={"Accept": JWT_TYPE}, timeout=TIMEOUT, stream=True)
    wire = r.raw.read(decode_content=False)
    encode_s = time.perf_counter() - started
    assert r.headers["Content-Encoding"] == "gzip"
    jwt_text = gzip.decompress(wire).decode()
    claims = jwt.decode(jwt_text, options={"verify_signature": False})
    status_list = StatusList.from_json(claims["status_list"])
    assert status_list.size == 1_000_000 and status_list.get(idx) == 0
    assert all(status_list.get(i) == 1 for i in revoked[:500])
    print(
        f"\n1,000,000 entries, 10,000 revoked at random: lst {len(claims['status_list']['lst']):,} "
        f"chars, JWT {len(jwt_text):,} bytes, on the wire (gzip) {len(wire):,} bytes; "
        f"first request after the change (read + encode + sign + gzip) {encode_s * 1000:.0f} ms"
    )
    assert len(wire) < 20_000
    started = time.perf_counter()
    again = get(uri, **{"If-None-Match": r.headers["ETag"]})
    print(f"unchanged: {again.status_code} in {(time.perf_counter() - started) * 1000:.1f} ms")
    assert again.status_code == 304


#: A resource server that knows nothing of this project: PyJWT, zlib and urllib only.
PLAIN_READER = textwrap.dedent(
    """
    import base64, json, sys, urllib.request, zlib
    import jwt

    jwks_url, token = sys.argv[1], sys.argv[2]
    ref = jwt.decode(token, options={"verify_signature": False})["status"]["status_list"]
    request = urllib.request.Request(ref["uri"], headers={"Accept": "application/statuslist+jwt"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.headers["Content-Type"] == "application/statuslist+jwt"
        status_token = answer.read().decode()
    header = jwt.get_unverified_header(status_token)
    assert header["typ"] == "statuslist+jwt"
    with urllib.request.urlopen(jwks_url, timeout=10) as answer:
        keys = jwt.PyJWKSet.from_dict(json.load(answer))
    claims = jwt.decode(status_token, keys[header["kid"]], algorithms=[header["alg"]],
                        options={"require": ["sub", "iat", "exp"]})
    assert claims["sub"] == ref["uri"]
    lst = claims["status_list"]["lst"]
    data = zlib.decompress(base64.urlsafe_b64decode(lst + "=" * (-len(lst) % 4)))
    idx = ref["idx"]
    print((data[idx // 8] >> (idx % 8)) & 1)
    """
)


def test_a_plain_pyjwt_and_zlib_script_reads_a_tokens_bit(
    auth_server: Any, make_user: Any
) -> None:
    assert "auth_rpc" not in PLAIN_READER
    make_user("alice", "a password long enough")
    service = auth_server.service
    revoked = service.login("alice", "a password long enough").access_token
    valid = service.login("alice", "a password long enough").access_token
    service.revoke(revoked)

    def read_bit(token: str) -> str:
        done = subprocess.run(
            [sys.executable, "-I", "-c", PLAIN_READER, auth_server.jwks_url, token],
            capture_output=True, text=True, timeout=60, check=True,
        )
        return done.stdout.strip()

    assert (read_bit(revoked), read_bit(valid)) == ("1", "0")
