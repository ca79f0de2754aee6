"""The plugins as an installed package provides them: test suites run by ``pytester``.

The inner suites know nothing of this checkout's conftest files: their
fixtures come only from the ``pytest11`` entry points.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]

PLUGINS = {
    "auth_rpc.testing": [
        "make_auth_server",
        "auth_server",
        "make_user",
        "make_client",
        "auth_client",
        "token_factory",
        "serve_thrift",
        "make_verifier",
    ],
    "posts_rpc.testing": ["make_posts_server", "posts_server"],
    "client.testing": ["make_session", "posts_session"],
}


def test_each_layer_registers_its_own_plugin() -> None:
    modules = {ep.value for ep in entry_points(group="pytest11")}
    assert set(PLUGINS) <= modules


def test_every_fixture_comes_from_its_layers_plugin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--fixtures", "-p", "no:cacheprovider")
    result.assert_outcomes()
    defined_in: dict[str, str] = {}  # fixture -> the plugin module whose section lists it
    section = ""
    for line in result.outlines:
        if match := re.fullmatch(r"-+ fixtures defined from (\S+) -+", line):
            section = match[1]
        elif match := re.match(r"(\w+) -- ", line):
            defined_in[match[1]] = section
    for module, fixtures in PLUGINS.items():
        assert {name: defined_in.get(name) for name in fixtures} == dict.fromkeys(fixtures, module)


NOTES_SUITE = """
import pytest

from auth_rpc.errors import TokenRejected
from auth_rpc.testing import VERIFIER_MODES

closed = []


@pytest.fixture
def auth_server(make_auth_server):
    return make_auth_server(audience="notes")


@pytest.mark.parametrize("mode", VERIFIER_MODES)
def test_notes_tokens(mode, make_verifier, token_factory):
    verifier = make_verifier(mode, cache_ttl_s=0)
    assert verifier.verify(token_factory.mint("nina", ["notes:read"])).subject == "nina"
    with pytest.raises(TokenRejected):
        verifier.verify(token_factory.expired("nina", ["notes:read"]))


def test_verifiers_are_closed_at_teardown(make_verifier):
    for mode in VERIFIER_MODES:
        verifier = make_verifier(mode)
        close = verifier.close
        verifier.close = lambda close=close, mode=mode: (closed.append(mode), close())
    assert closed == []


def test_after_the_teardown():
    assert sorted(closed) == sorted(VERIFIER_MODES)
"""


def test_a_notes_suite_runs_on_the_plugin_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_notes=NOTES_SUITE)
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=len(("local", "jwks", "introspect", "thrift")) + 2)
