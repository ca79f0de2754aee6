"""The Notes service, tested with the thrift-token-auth pytest plugin in all four modes."""

from __future__ import annotations

import contextlib

import pytest
from notes_service import NotesHandler, notes_thrift

from auth_rpc.serving.transport import open_client
from auth_rpc.testing import VERIFIER_MODES

common = notes_thrift.common  # the package's exception classes (load_idl shares them)


@pytest.fixture
def auth_server(make_auth_server):
    """One Auth service whose tokens are for this service (audience "notes")."""
    return make_auth_server(audience="notes")


@pytest.fixture(params=VERIFIER_MODES)
def notes(request, make_verifier, serve_thrift):
    """The Notes service checking tokens in each mode: local, jwks, introspect, thrift."""
    server = serve_thrift(notes_thrift.Notes, NotesHandler(make_verifier(request.param)))
    with contextlib.closing(open_client(notes_thrift.Notes, "127.0.0.1", server.port)) as client:
        yield client, server


def test_a_logged_in_session_adds_and_reads_notes(notes, make_session):
    _, server = notes
    session = make_session("nina", "notes:read notes:write")
    with session.client(notes_thrift.Notes, f"127.0.0.1:{server.port}",
                        safe_to_repeat={"get_note", "list_notes"}) as api:
        note = api.add_note(text="buy milk")
        assert (note.owner, note.text) == ("nina", "buy milk")
        assert api.get_note(id=note.id) == note
        assert api.list_notes(limit=10) == [note]


def test_tokens_that_must_be_refused_are(notes, token_factory):
    client, _ = notes
    with pytest.raises(common.Unauthenticated):
        client.list_notes("", 10)
    with pytest.raises(common.Unauthenticated):
        client.list_notes(token_factory.expired("nina", ["notes:read"]), 10)
    with pytest.raises(common.Unauthenticated):  # a token for another service
        client.list_notes(token_factory.mint("nina", ["notes:read"], audience="posts"), 10)
    with pytest.raises(common.PermissionDenied):
        client.add_note(token_factory.mint("nina", ["notes:read"]), "no write scope")
    assert client.health() == "ok"  # declared public: no token


def test_a_note_is_its_owners(notes, token_factory):
    client, _ = notes
    nina = token_factory.mint("nina", ["notes:read", "notes:write"])
    note = client.add_note(nina, "private")
    with pytest.raises(common.PermissionDenied):
        client.get_note(token_factory.mint("omar", ["notes:read"]), note.id)
    assert client.get_note(token_factory.mint("ada", ["notes:admin"]), note.id) == note
    with pytest.raises(common.NotFound):
        client.get_note(nina, note.id + 1)
    with pytest.raises(common.InvalidArgument):
        client.add_note(nina, "")
