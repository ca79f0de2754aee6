"""The Auth service's HTTP endpoints, over real HTTP against the real service.

The app is served by waitress on 127.0.0.1, port 0, from a thread; the service
is a real :class:`auth_rpc.auth.service.AuthService` on a temporary data dir. A few
edge cases no HTTP client sends (a lying Content-Length, a failing input
stream) call the WSGI app directly, still with the real service.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import jwt
import pytest
import requests
import waitress
from waitress import wasyncore

from auth_rpc import errors
from auth_rpc.auth.http import HTTP_ERROR_MAP, OAuthError, make_app, oauth_error_for
from auth_rpc.auth.service import AuthService, AuthSettings

ISSUER = "https://auth.example.test"
AUDIENCE = "posts"
USER, PASSWORD = "alice", "correct horse battery staple"
CLIENT_ID = "posts-svc"
TIMEOUT = 10


# -- fixtures ---------------------------------------------------------------


def open_service(data_dir: Path, issuer: str = ISSUER) -> AuthService:
    return AuthService.open(AuthSettings(data_dir=data_dir, issuer=issuer, audience=AUDIENCE))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[AuthService]:
    svc = open_service(tmp_path / "data")
    svc.add_user(USER, PASSWORD, "posts:read posts:write")
    yield svc
    svc.close()


@pytest.fixture
def client_secret(service: AuthService) -> str:
    return service.add_client(CLIENT_ID, "posts:read", introspect=True)


class Served:
    """A WSGI app served by waitress on 127.0.0.1:0 from a thread."""

    def __init__(self, app: Any) -> None:
        self._server = waitress.create_server(app, host="127.0.0.1", port=0, threads=2)
        self.url = f"http://127.0.0.1:{self._server.effective_port}"
        self._thread = threading.Thread(target=self._server.run, name="test-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        # Close every dispatcher (listener, trigger, open connections) from the
        # loop's own thread; the loop then ends with an empty map.
        server = self._server
        try:
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        except OSError:
            # waitress's trigger was already closed (seen once in ~20 full runs under
            # load: EBADF on its pipe, in this plain waitress harness, not the service's
            # HttpServer); close what is left from here, the loop then ends.
            wasyncore.close_all(server._map)
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()
        server.task_dispatcher.shutdown()


@pytest.fixture
def base(service: AuthService) -> Iterator[str]:
    served = Served(make_app(service))
    yield served.url
    served.close()


def basic(client_id: str, secret: str) -> str:
    """An Authorization header as RFC 6749 2.3.1: form-encode, then Basic."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def post(base: str, path: str, data: Any, **kwargs: Any) -> requests.Response:
    return requests.post(base + path, data=data, timeout=TIMEOUT, **kwargs)


def login(base: str, *, client_secret: str | None = None, **extra: str) -> dict[str, Any]:
    """A password grant; with ``client_secret``, as the client CLIENT_ID (HTTP Basic)."""
    headers = {} if client_secret is None else {"Authorization": basic(CLIENT_ID, client_secret)}
    r = post(
        base,
        "/token",
        {"grant_type": "password", "username": USER, "password": PASSWORD, **extra},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def assert_oauth_error(r: requests.Response, status: int, error: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["error"] == error
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def call_app(
    app: Callable[..., Any], method: str, path: str, body: bytes = b"", **environ: Any
) -> tuple[str, dict[str, str], bytes]:
    """Call the WSGI app directly (for requests no HTTP client would send)."""
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": str(len(body)),
        **environ,
    }
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        got["status"], got["headers"] = status, dict(headers)
        return lambda data: None

    out = b"".join(app(env, start_response))
    return got["status"], got["headers"], out


class ExplodingInput:
    """A wsgi.input that must never be read."""

    def read(self, *args: Any) -> bytes:
        raise AssertionError("the body was read")


# -- JWKS and metadata --------------------------------------------------------


def test_jwks_verifies_a_login_token_with_plain_pyjwt(base: str) -> None:
    token = login(base)["access_token"]
    r = requests.get(base + "/.well-known/jwks.json", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Cache-Control"] == "public, max-age=300"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    jwk_set = r.json()
    for key in jwk_set["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(key), "private material in JWKS"

    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(jwk_set)[header["kid"]]
    claims = jwt.decode(token, key, algorithms=[header["alg"]], audience=AUDIENCE, issuer=ISSUER)
    assert header["typ"] == "at+jwt"
    assert claims["sub"] == USER
    assert set(claims["scope"].split()) == {"posts:read", "posts:write"}


def test_metadata_from_the_request_host(base: str, service: AuthService) -> None:
    r = requests.get(base + "/.well-known/oauth-authorization-server", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    meta = r.json()
    assert meta == {
        "issuer": service.issuer,
        "token_endpoint": base + "/token",
        "jwks_uri": base + "/.well-known/jwks.json",
        "introspection_endpoint": base + "/introspect",
        "revocation_endpoint": base + "/revoke",
        "status_list_aggregation_endpoint": base + "/statuslists",
        "grant_types_supported": ["password", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "introspection_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
        ],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "response_types_supported": [],
    }
    # The advertised URLs are the ones that answer.
    assert requests.get(meta["jwks_uri"], timeout=TIMEOUT).status_code == 200


def test_metadata_uses_base_url_when_given(service: AuthService) -> None:
    app = make_app(service, base_url="https://auth.example.test/oauth/")
    status, _, body = call_app(app, "GET", "/.well-known/oauth-authorization-server")
    assert status == "200 OK"
    meta = json.loads(body)
    assert meta["token_endpoint"] == "https://auth.example.test/oauth/token"
    assert meta["jwks_uri"] == "https://auth.example.test/oauth/.well-known/jwks.json"


@pytest.mark.parametrize("host", ["evil.test/x", "a b", "x@evil.test", "host:99999999"])
def test_metadata_refuses_a_strange_host_header(service: AuthService, host: str) -> None:
    status, _, body = call_app(
        make_app(service), "GET", "/.well-known/oauth-authorization-server", HTTP_HOST=host
    )
    assert status.startswith("400")
    assert json.loads(body)["error"] == "invalid_request"


def test_metadata_at_the_issuer_path_form(tmp_path: Path) -> None:
    svc = open_service(tmp_path / "d", issuer="https://auth.example.test/tenant1")
    try:
        app = make_app(svc, base_url="https://auth.example.test/tenant1")
        status, _, body = call_app(app, "GET", "/.well-known/oauth-authorization-server/tenant1")
        assert status == "200 OK"
        assert json.loads(body)["issuer"] == "https://auth.example.test/tenant1"
    finally:
        svc.close()


@pytest.mark.parametrize(
    ("kwargs"),
    [
        {"base_url": "ftp://x"},
        {"base_url": "/relative"},
        {"base_url": "https://h/?q=1"},
        {"max_body_bytes": 0},
    ],
)
def test_make_app_refuses_bad_settings(service: AuthService, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_app(service, **kwargs)


def test_healthz(base: str) -> None:
    r = requests.get(base + "/healthz", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    head = requests.head(base + "/healthz", timeout=TIMEOUT)
    assert head.status_code == 200
    assert head.content == b""


def test_unknown_path_is_404_json(base: str) -> None:
    r = requests.get(base + "/nope", timeout=TIMEOUT)
    assert r.status_code == 404
    assert r.json() == {"error": "not_found"}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/token", "POST"),
        ("PUT", "/introspect", "POST"),
        ("GET", "/revoke", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/.well-known/jwks.json", "GET, HEAD"),
    ],
)
def test_wrong_method_is_405_with_allow(base: str, method: str, path: str, allow: str) -> None:
    r = requests.request(method, base + path, timeout=TIMEOUT)
    assert r.status_code == 405
    assert r.headers["Allow"] == allow


# -- /token: password grant ----------------------------------------------------


def test_password_grant(base: str) -> None:
    r = post(base, "/token", {"grant_type": "password", "username": USER, "password": PASSWORD})
    assert r.status_code == 200
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["Pragma"] == "no-cache"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    body = r.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope", "refresh_token"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert set(body["scope"].split()) == {"posts:read", "posts:write"}
    assert body["refresh_token"]


def test_password_grant_narrows_scope(base: str) -> None:
    assert login(base, scope="posts:read")["scope"] == "posts:read"


@pytest.mark.parametrize("scope", ["posts:admin", 'bad"scope', "two  spaces"])
def test_password_grant_refuses_a_scope_beyond_the_user(base: str, scope: str) -> None:
    r = post(
        base,
        "/token",
        {"grant_type": "password", "username": USER, "password": PASSWORD, "scope": scope},
    )
    assert_oauth_error(r, 400, "invalid_scope")


@pytest.mark.parametrize(("username", "password"), [(USER, "wrong"), ("nobody", PASSWORD)])
def test_wrong_password_or_unknown_user_is_invalid_grant(
    base: str, username: str, password: str
) -> None:
    r = post(base, "/token", {"grant_type": "password", "username": username, "password": password})
    assert_oauth_error(r, 400, "invalid_grant")
    assert r.headers["Pragma"] == "no-cache"


def test_unknown_user_and_wrong_password_look_the_same(base: str) -> None:
    a = post(base, "/token", {"grant_type": "password", "username": USER, "password": "x"})
    b = post(base, "/token", {"grant_type": "password", "username": "nobody", "password": "x"})
    assert a.json() == b.json()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({}, "invalid_request"),
        ({"grant_type": "password", "username": USER}, "invalid_request"),
        ({"grant_type": "password", "password": PASSWORD}, "invalid_request"),
        # RFC 6749 3.2: blank parameters count as omitted.
        ({"grant_type": "password", "username": USER, "password": ""}, "invalid_request"),
        ({"grant_type": "refresh_token"}, "invalid_request"),
        ({"grant_type": "authorization_code", "code": "x"}, "unsupported_grant_type"),
        ({"grant_type": "implicit"}, "unsupported_grant_type"),
    ],
)
def test_token_request_faults(base: str, data: dict[str, str], error: str) -> None:
    assert_oauth_error(post(base, "/token", data), 400, error)


@pytest.mark.parametrize(
    "body",
    [
        f"grant_type=password&grant_type=password&username={USER}&password=x",
        f"grant_type=password&username={USER}&password=a&password=b",
        "grant_type=password&username=&username=alice&password=x",
    ],
)
def test_duplicate_parameters_are_invalid_request(base: str, body: str) -> None:
    r = post(base, "/token", body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_oauth_error(r, 400, "invalid_request")


@pytest.mark.parametrize(
    "body",
    [
        b"grant_type",
        b"grant_type=password&&x=1",
        b"a=%ff",
        b"\xff=1",
        b"=x",
        b"&".join(b"f%d=1" % i for i in range(40)),
    ],
)
def test_malformed_form_bodies_are_invalid_request(base: str, body: bytes) -> None:
    r = post(base, "/token", body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_oauth_error(r, 400, "invalid_request")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded; charset=latin-1",
    ],
)
def test_wrong_content_type_is_invalid_request(base: str, content_type: str) -> None:
    r = post(base, "/token", "grant_type=password", headers={"Content-Type": content_type})
    assert_oauth_error(r, 400, "invalid_request")


def test_form_with_utf8_charset_parameter_is_accepted(base: str) -> None:
    r = post(
        base,
        "/token",
        f"grant_type=password&username={USER}&password={quote_plus(PASSWORD)}",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"},
    )
    assert r.status_code == 200


def test_credentials_in_the_query_string_are_refused(base: str) -> None:
    r = requests.post(
        base + "/token?password=" + quote_plus(PASSWORD),
        data={"grant_type": "password", "username": USER, "password": PASSWORD},
        timeout=TIMEOUT,
    )
    assert_oauth_error(r, 400, "invalid_request")


def test_oversize_body_is_413(service: AuthService) -> None:
    served = Served(make_app(service, max_body_bytes=1024))
    try:
        r = post(served.url, "/token", {"grant_type": "password", "username": "x" * 2000})
        assert r.status_code == 413
        assert r.json()["error"] == "invalid_request"
    finally:
        served.close()


def test_oversize_body_is_refused_without_reading_it(service: AuthService) -> None:
    status, _, _ = call_app(
        make_app(service, max_body_bytes=10),
        "POST",
        "/token",
        CONTENT_LENGTH="11",
        **{"wsgi.input": ExplodingInput()},
    )
    assert status.startswith("413")


@pytest.mark.parametrize("length", ["abc", "-1", "1.5", "\u00b2", "9" * 30])
def test_invalid_content_length_is_invalid_request(service: AuthService, length: str) -> None:
    status, _, body = call_app(
        make_app(service),
        "POST",
        "/token",
        CONTENT_LENGTH=length,
        **{"wsgi.input": ExplodingInput()},
    )
    assert status.startswith(("400", "413"))
    assert json.loads(body)["error"] == "invalid_request"


def test_missing_content_length_is_an_empty_body(service: AuthService) -> None:
    status, _, body = call_app(
        make_app(service), "POST", "/token", CONTENT_LENGTH="", **{"wsgi.input": ExplodingInput()}
    )
    assert status.startswith("400")
    assert json.loads(body) == {
        "error": "invalid_request",
        "error_description": "missing parameter: grant_type",
    }


def test_body_shorter_than_content_length_is_invalid_request(service: AuthService) -> None:
    status, _, _ = call_app(
        make_app(service), "POST", "/token", b"grant_type=password", CONTENT_LENGTH="500"
    )
    assert status.startswith("400")


def test_throttled_login_is_429_with_retry_after(base: str) -> None:
    wrong = {"grant_type": "password", "username": USER, "password": "wrong"}
    statuses = [post(base, "/token", wrong).status_code for _ in range(5)]
    assert statuses == [400] * 5
    r = post(base, "/token", {"grant_type": "password", "username": USER, "password": PASSWORD})
    assert_oauth_error(r, 429, "slow_down")
    retry_after = r.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1


# -- /token: refresh_token grant ----------------------------------------------


def test_refresh_rotates_and_reuse_revokes_the_family(base: str) -> None:
    first = login(base)
    r = post(
        base, "/token", {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert r.headers["Cache-Control"] == "no-store"

    # The old refresh token again: reuse, and the whole family is revoked.
    reused = post(
        base, "/token", {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert_oauth_error(reused, 400, "invalid_grant")
    after = post(
        base, "/token", {"grant_type": "refresh_token", "refresh_token": second["refresh_token"]}
    )
    assert_oauth_error(after, 400, "invalid_grant")


def test_refresh_with_an_unknown_token_is_invalid_grant(base: str) -> None:
    r = post(base, "/token", {"grant_type": "refresh_token", "refresh_token": "A" * 43})
    assert_oauth_error(r, 400, "invalid_grant")


# -- /token: client_credentials grant ------------------------------------------


def test_client_credentials_with_basic(base: str, client_secret: str) -> None:
    r = post(
        base,
        "/token",
        {"grant_type": "client_credentials"},
        headers={"Authorization": basic(CLIENT_ID, client_secret)},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert "refresh_token" not in body
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "posts:read"
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["Pragma"] == "no-cache"


def test_client_credentials_basic_values_are_form_decoded(base: str, client_secret: str) -> None:
    # RFC 6749 2.3.1: the id and secret are form-encoded before Basic; "%2D" is "-".
    raw = f"posts%2Dsvc:{client_secret}".encode()
    r = post(
        base,
        "/token",
        {"grant_type": "client_credentials"},
        headers={"Authorization": "Basic " + base64.b64encode(raw).decode()},
    )
    assert r.status_code == 200, r.text


def test_client_credentials_in_the_body(base: str, client_secret: str) -> None:
    r = post(
        base,
        "/token",
        {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": client_secret,
        },
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "wrong-secret",
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"nocolon").decode(),
        "Bearer abc",
    ],
)
def test_client_credentials_failures_are_401_invalid_client(
    base: str, client_secret: str, authorization: str | None
) -> None:
    headers = {}
    if authorization == "wrong-secret":
        headers["Authorization"] = basic(CLIENT_ID, client_secret + "x")
    elif authorization is not None:
        headers["Authorization"] = authorization
    r = post(base, "/token", {"grant_type": "client_credentials"}, headers=headers)
    assert_oauth_error(r, 401, "invalid_client")
    assert r.headers["WWW-Authenticate"].startswith("Basic ")


def test_unknown_client_is_401_invalid_client(base: str) -> None:
    r = post(
        base,
        "/token",
        {"grant_type": "client_credentials"},
        headers={"Authorization": basic("nobody", "secret")},
    )
    assert_oauth_error(r, 401, "invalid_client")


def test_wrong_secret_in_the_body_is_401(base: str, client_secret: str) -> None:
    r = post(
        base,
        "/token",
        {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": "nope"},
    )
    assert_oauth_error(r, 401, "invalid_client")


@pytest.mark.parametrize(
    "body",
    [{"client_secret": "s"}, {"client_id": "someone-else"}],
)
def test_two_client_authentication_methods_are_invalid_request(
    base: str, client_secret: str, body: dict[str, str]
) -> None:
    r = post(
        base,
        "/token",
        {"grant_type": "client_credentials", **body},
        headers={"Authorization": basic(CLIENT_ID, client_secret)},
    )
    assert_oauth_error(r, 400, "invalid_request")


def test_client_id_in_the_body_matching_basic_is_tolerated(base: str, client_secret: str) -> None:
    r = post(
        base,
        "/token",
        {"grant_type": "client_credentials", "client_id": CLIENT_ID},
        headers={"Authorization": basic(CLIENT_ID, client_secret)},
    )
    assert r.status_code == 200, r.text


def test_password_grant_holds_a_client_to_its_credentials(base: str, client_secret: str) -> None:
    data = {"grant_type": "password", "username": USER, "password": PASSWORD}
    ok = post(base, "/token", data, headers={"Authorization": basic(CLIENT_ID, client_secret)})
    assert ok.status_code == 200
    bad = post(base, "/token", data, headers={"Authorization": basic(CLIENT_ID, "wrong")})
    assert_oauth_error(bad, 401, "invalid_client")


def test_password_grant_token_names_the_authenticated_client(base: str, client_secret: str) -> None:
    auth = {"Authorization": basic(CLIENT_ID, client_secret)}
    r = post(
        base,
        "/token",
        {"grant_type": "password", "username": USER, "password": PASSWORD},
        headers=auth,
    )
    assert r.status_code == 200
    token = r.json()["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["client_id"] == CLIENT_ID
    plain = jwt.decode(login(base)["access_token"], options={"verify_signature": False})
    assert plain["client_id"] != CLIENT_ID


# -- /introspect ---------------------------------------------------------------


def test_introspect_active_token(base: str, client_secret: str) -> None:
    token = login(base)["access_token"]
    r = post(
        base,
        "/introspect",
        {"token": token, "token_type_hint": "access_token"},
        headers={"Authorization": basic(CLIENT_ID, client_secret)},
    )
    assert r.status_code == 200, r.text
    assert r.headers["Cache-Control"] == "no-store"
    body = r.json()
    assert body["active"] is True
    assert body["sub"] == USER
    assert set(body["scope"].split()) == {"posts:read", "posts:write"}


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "x" * 5000])
def test_introspect_invalid_token_is_inactive(base: str, client_secret: str, token: str) -> None:
    r = post(
        base,
        "/introspect",
        {"token": token},
        headers={"Authorization": basic(CLIENT_ID, client_secret)},
    )
    assert r.status_code == 200
    assert r.json() == {"active": False}


@pytest.mark.parametrize("path", ["/introspect", "/revoke"])
@pytest.mark.parametrize("auth", ["none", "wrong", "unknown"])
def test_introspect_and_revoke_require_client_authentication(
    base: str, client_secret: str, path: str, auth: str
) -> None:
    headers = {
        "none": {},
        "wrong": {"Authorization": basic(CLIENT_ID, "wrong")},
        "unknown": {"Authorization": basic("nobody", client_secret)},
    }[auth]
    r = post(base, path, {"token": "whatever"}, headers=headers)
    assert_oauth_error(r, 401, "invalid_client")
    assert r.headers["WWW-Authenticate"].startswith("Basic ")


@pytest.mark.parametrize("path", ["/introspect", "/revoke"])
def test_introspect_and_revoke_need_a_token(base: str, client_secret: str, path: str) -> None:
    r = post(
        base,
        path,
        {"token_type_hint": "access_token"},
        headers={"Authorization": basic(CLIENT_ID, client_secret)},
    )
    assert_oauth_error(r, 400, "invalid_request")


# -- /revoke -------------------------------------------------------------------


def test_revoke_then_introspect_is_inactive(base: str, client_secret: str) -> None:
    auth = {"Authorization": basic(CLIENT_ID, client_secret)}
    token = login(base, client_secret=client_secret)["access_token"]
    r = post(base, "/revoke", {"token": token}, headers=auth)
    assert r.status_code == 200
    assert r.headers["Cache-Control"] == "no-store"
    again = post(base, "/revoke", {"token": token}, headers=auth)  # idempotent
    assert again.status_code == 200
    r = post(base, "/introspect", {"token": token}, headers=auth)
    assert r.json() == {"active": False}


def test_revoke_a_refresh_token(base: str, client_secret: str) -> None:
    tokens = login(base, client_secret=client_secret)
    r = post(
        base,
        "/revoke",
        {"token": tokens["refresh_token"], "token_type_hint": "refresh_token"},
        headers={"Authorization": basic(CLIENT_ID, client_secret)},
    )
    assert r.status_code == 200
    refreshed = post(
        base,
        "/token",
        {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        headers={"Authorization": basic(CLIENT_ID, client_secret)},
    )
    assert_oauth_error(refreshed, 400, "invalid_grant")


def test_a_client_cannot_revoke_another_clients_tokens(
    base: str, client_secret: str, service: AuthService
) -> None:
    """RFC 7009 2.1: only tokens issued to the requesting client are revoked."""
    mine = login(base, client_secret=client_secret)
    other_secret = service.add_client("other-svc", "posts:read")
    other = {"Authorization": basic("other-svc", other_secret)}
    for token in (mine["access_token"], mine["refresh_token"]):
        assert post(base, "/revoke", {"token": token}, headers=other).status_code == 200
    auth = {"Authorization": basic(CLIENT_ID, client_secret)}
    assert post(base, "/introspect", {"token": mine["access_token"]}, headers=auth).json()[
        "active"
    ]
    refreshed = post(
        base,
        "/token",
        {"grant_type": "refresh_token", "refresh_token": mine["refresh_token"]},
        headers=auth,
    )
    assert refreshed.status_code == 200, refreshed.text


def test_a_refresh_token_is_bound_to_its_client(base: str, client_secret: str) -> None:
    """RFC 6749 6: a refresh token issued to a client needs that client's authentication."""
    theirs = login(base, client_secret=client_secret)["refresh_token"]
    anonymous = post(base, "/token", {"grant_type": "refresh_token", "refresh_token": theirs})
    assert_oauth_error(anonymous, 400, "invalid_grant")
    public = login(base)["refresh_token"]
    as_client = post(
        base,
        "/token",
        {"grant_type": "refresh_token", "refresh_token": public},
        headers={"Authorization": basic(CLIENT_ID, client_secret)},
    )
    assert_oauth_error(as_client, 400, "invalid_grant")
    # Refused requests changed nothing: each token still works for its own client.
    ok = post(
        base,
        "/token",
        {"grant_type": "refresh_token", "refresh_token": theirs},
        headers={"Authorization": basic(CLIENT_ID, client_secret)},
    )
    assert ok.status_code == 200, ok.text
    ok = post(base, "/token", {"grant_type": "refresh_token", "refresh_token": public})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "A" * 43])
def test_revoke_an_unknown_token_is_200(base: str, client_secret: str, token: str) -> None:
    r = post(
        base,
        "/revoke",
        {"token": token},
        headers={"Authorization": basic(CLIENT_ID, client_secret)},
    )
    assert r.status_code == 200


# -- service unavailable ---------------------------------------------------------


def test_a_closed_service_is_503_and_unhealthy(base: str, service: AuthService) -> None:
    service.close()
    health = requests.get(base + "/healthz", timeout=TIMEOUT)
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable"}
    r = post(base, "/token", {"grant_type": "refresh_token", "refresh_token": "A" * 43})
    assert_oauth_error(r, 503, "temporarily_unavailable")


# -- errors and logging ----------------------------------------------------------


def _all_subclasses(cls: type) -> set[type]:
    out = set(cls.__subclasses__())
    for sub in list(out):
        out |= _all_subclasses(sub)
    return out


def _instance(cls: type[errors.AuthError]) -> errors.AuthError:
    if issubclass(cls, errors.InvalidInput):
        return cls("field", "bad")
    if issubclass(cls, errors.Throttled):
        return cls("slow down", 1500)
    return cls("message")


@pytest.mark.parametrize("cls", sorted(_all_subclasses(errors.AuthError), key=lambda c: c.__name__))
def test_every_internal_error_has_an_http_mapping(cls: type[errors.AuthError]) -> None:
    assert any(issubclass(cls, mapped) for mapped in HTTP_ERROR_MAP)
    err = oauth_error_for(_instance(cls))
    assert isinstance(err, OAuthError)
    assert 400 <= err.status < 600


def test_error_mapping_details() -> None:
    assert oauth_error_for(errors.Throttled("x", 1001)).headers == [("Retry-After", "2")]
    assert oauth_error_for(errors.Throttled("x", 0)).headers == [("Retry-After", "1")]
    assert oauth_error_for(errors.InvalidInput("scope", "bad")).error == "invalid_scope"
    client = oauth_error_for(errors.InvalidCredentials("no"), client_auth=True)
    assert (client.status, client.error) == (401, "invalid_client")
    # RFC 6749 5.2: error_description is printable ASCII without '"' and '\'.
    assert OAuthError(400, "x", 'a"b\\c\u00e9\n').body()["error_description"] == "a?b?c??"


def test_an_unexpected_failure_is_a_500_logged_once_without_the_body(
    service: AuthService, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenInput:
        def read(self, *args: Any) -> bytes:
            raise RuntimeError(f"boom {PASSWORD}")

    caplog.set_level(logging.DEBUG)
    status, headers, body = call_app(
        make_app(service), "POST", "/token", CONTENT_LENGTH="10", **{"wsgi.input": BrokenInput()}
    )
    assert status.startswith("500")
    assert json.loads(body) == {"error": "server_error"}
    assert headers["Cache-Control"] == "no-store"
    records = [r for r in caplog.records if r.name == "auth_rpc.auth.http"]
    assert len(records) == 1
    assert "RuntimeError" in caplog.text
    assert PASSWORD not in caplog.text


def test_no_secret_reaches_the_logs(
    base: str, client_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = {"Authorization": basic(CLIENT_ID, client_secret)}
    tokens = login(base)
    post(base, "/token", {"grant_type": "password", "username": USER, "password": "wrong-pw-42"})
    post(base, "/token", {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
    post(base, "/token", {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
    post(base, "/introspect", {"token": tokens["access_token"]}, headers=auth)
    post(base, "/revoke", {"token": tokens["access_token"]}, headers=auth)
    post(
        base,
        "/introspect",
        {"token": tokens["access_token"]},
        headers={"Authorization": basic(CLIENT_ID, "wrong-secret-42")},
    )
    text = caplog.text
    for secret in (
        PASSWORD,
        "wrong-pw-42",
        client_secret,
        "wrong-secret-42",
        tokens["access_token"],
        tokens["refresh_token"],
        auth["Authorization"][6:],
    ):
        assert secret not in text


def test_wrong_secrets_for_a_client_id_do_not_lock_the_client_out(
    base: str, service: AuthService, client_secret: str
) -> None:
    """Regression: five wrong Basic secrets for the resource server's id at /introspect
    throttled the id itself; once its remembered success expired, every introspection
    by the real resource server got 429 (and Posts refused every uncached token)."""
    token = login(base)["access_token"]
    wrong = {"Authorization": basic(CLIENT_ID, "not-the-secret")}
    statuses = [post(base, "/introspect", {"token": token}, headers=wrong).status_code
                for _ in range(8)]
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}, statuses
    service._client_cache.clear()  # as after the memory's expiry, or a restart
    right = {"Authorization": basic(CLIENT_ID, client_secret)}
    r = post(base, "/introspect", {"token": token}, headers=right)
    assert r.status_code == 200, r.text
    assert r.json()["active"] is True
    assert post(base, "/introspect", {"token": token}, headers=wrong).status_code == 429
