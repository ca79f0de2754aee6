"""Clients generated from the IDL as first released keep working against today's services.

``tests/interop/idl_first_release/`` is a frozen copy of ``idl/`` as it was
first published (no ``namespace`` lines, no ``audience`` arguments, fewer
``throws``). Apache Thrift's compiler generates Python code from it at test
time, as a user did then and never regenerated; the code runs in a process of
its own (its top-level packages ``auth``, ``posts`` and ``common`` would clash
with nothing here, but stay out of this process anyway) against the Auth and
Posts services of today: login, refresh, client credentials, validate, revoke,
JWKS, every Posts method, and the typed exceptions as the old client's own
classes. The contract only grows: this test fails if a field id, a name or an
argument an old client sends changes meaning.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

FIRST_RELEASE_IDL = Path(__file__).parent / "idl_first_release"
PASSWORD = "first release password"

SCRIPT = r"""
import json, sys
from thrift.protocol import TBinaryProtocol
from thrift.transport import TSocket, TTransport
from auth import Auth
from posts import Posts
from common.ttypes import Unauthenticated, NotFound, InvalidArgument

cfg = json.loads(sys.argv[1])

def open_client(module, port):
    sock = TSocket.TSocket("127.0.0.1", port)
    sock.setTimeout(10_000)
    transport = TTransport.TBufferedTransport(sock)
    transport.open()
    return module.Client(TBinaryProtocol.TBinaryProtocol(transport)), transport

auth, t1 = open_client(Auth, cfg["auth_port"])
posts, t2 = open_client(Posts, cfg["posts_port"])
seen = []
pair = auth.login("olga", cfg["password"])
assert pair.token_type == "Bearer" and pair.expires_in > 0 and pair.refresh_token
principal = auth.validate(pair.access_token)
assert principal.subject == "olga" and "posts:write" in principal.scopes
seen.append("login+validate")
try:
    auth.login("olga", "wrong password!")
except Unauthenticated as exc:
    assert exc.message
    seen.append("Unauthenticated")
rotated = auth.refresh(pair.refresh_token)
assert auth.validate(rotated.access_token).subject == "olga"
seen.append("refresh")
svc = auth.client_token("old-reporting", cfg["client_secret"], "posts:read")
assert auth.validate(svc.access_token).client_id == "old-reporting"
seen.append("client_token")
assert "keys" in json.loads(auth.jwks())
seen.append("jwks")

token = rotated.access_token
post = posts.create_post(token, "from 2026-11", "an old client")
assert posts.get_post(token, post.id).title == "from 2026-11"
page = posts.list_posts(token, 10, 0)
assert [p.id for p in page.posts] == [post.id]
assert posts.update_post(token, post.id, "still here", "b").title == "still here"
posts.delete_post(token, post.id)
try:
    posts.get_post(token, post.id)
except NotFound:
    seen.append("NotFound")
try:
    posts.list_posts(token, 0, -5)
except InvalidArgument:
    seen.append("InvalidArgument")
seen.append("posts")
auth.revoke(token)
try:
    auth.validate(token)
except Unauthenticated:
    seen.append("revoked")
t1.close(); t2.close()
print(json.dumps(seen))
"""


def _generate(out: Path) -> None:
    compiler = shutil.which("thrift")
    if compiler is None:
        pytest.skip("Apache Thrift compiler not installed (make tools)")
    pytest.importorskip("thrift", reason="the thrift Python library is in the test extra")
    for name in ("auth", "posts"):
        subprocess.run(  # fixed arguments
            [compiler, "-r", "--gen", "py", "-out", str(out), "-I", str(FIRST_RELEASE_IDL),
             str(FIRST_RELEASE_IDL / f"{name}.thrift")],
            check=True,
        )


def test_the_frozen_idl_is_the_first_release() -> None:
    """The frozen copy is what was published: no namespace, no audience argument."""
    auth = (FIRST_RELEASE_IDL / "auth.thrift").read_text()
    assert "namespace" not in auth and "audience)" not in auth
    assert "TokenPair login(1: string username, 2: string password)" in auth


def test_first_release_clients_work_against_todays_services(
    tmp_path: Path, auth_server: Any, make_user: Any, make_client: Any, make_posts_server: Any
) -> None:
    gen = tmp_path / "gen"
    gen.mkdir()
    _generate(gen)
    make_user("olga", PASSWORD, "posts:read posts:write")
    secret = make_client("old-reporting", "posts:read")
    posts_server = make_posts_server("thrift")
    cfg = {
        "auth_port": auth_server.port,
        "posts_port": posts_server.port,
        "password": PASSWORD,
        "client_secret": secret,
    }
    done = subprocess.run(  # fixed script; its arguments are this test's own values
        [sys.executable, "-c", SCRIPT, json.dumps(cfg)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(gen)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        "login+validate", "Unauthenticated", "refresh", "client_token", "jwks",
        "NotFound", "InvalidArgument", "posts", "revoked",
    ]
