"""The Notes service: a Thrift service of your own behind thrift-token-auth.

Run it (tokens checked with the Auth service's published keys)::

    python notes_service.py --port 9100 --jwks-url http://127.0.0.1:8080/.well-known/jwks.json \\
        --issuer http://127.0.0.1:8080 --audience notes
"""

from __future__ import annotations

import argparse
import sqlite3
import threading
from pathlib import Path

from auth_rpc.errors import Forbidden, InvalidInput, NotFoundError
from auth_rpc.idl import load_idl
from auth_rpc.serving.rpc import RpcServer
from auth_rpc.serving.runner import run_until_signal
from auth_rpc.verify import (
    GuardedHandler,
    Principal,
    TokenVerifier,
    make_verifier,
    public,
    requires,
)

notes_thrift = load_idl(Path(__file__).with_name("notes.thrift"), module_name="notes_thrift")

READ, WRITE, ADMIN = "notes:read", "notes:write", "notes:admin"
MAX_TEXT = 10_000
MAX_PAGE = 100


class NotesHandler(GuardedHandler, service=notes_thrift.Notes):
    """Every method is guarded (or declared public): a forgotten one fails at import."""

    def __init__(self, verifier: TokenVerifier, db_path: str = ":memory:") -> None:
        super().__init__(verifier)
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " owner TEXT NOT NULL, text TEXT NOT NULL)"
        )
        self._lock = threading.Lock()

    @requires(WRITE)
    def add_note(self, principal: Principal, text: str | None) -> object:
        if not isinstance(text, str) or not 0 < len(text) <= MAX_TEXT:
            raise InvalidInput("text", f"1 to {MAX_TEXT} characters")
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO notes (owner, text) VALUES (?, ?)", (principal.subject, text)
            )
        return notes_thrift.Note(id=cursor.lastrowid, owner=principal.subject, text=text)

    @requires(READ, ADMIN)
    def get_note(self, principal: Principal, id: int | None) -> object:
        with self._lock:
            row = self._db.execute(
                "SELECT id, owner, text FROM notes WHERE id = ?", (id,)
            ).fetchone()
        if row is None:
            raise NotFoundError("no such note")
        if row[1] != principal.subject and ADMIN not in principal.scopes:
            raise Forbidden("not your note")
        return notes_thrift.Note(id=row[0], owner=row[1], text=row[2])

    @requires(READ)
    def list_notes(self, principal: Principal, limit: int | None) -> list[object]:
        if not isinstance(limit, int) or not 0 < limit <= MAX_PAGE:
            raise InvalidInput("limit", f"1 to {MAX_PAGE}")
        with self._lock:
            rows = self._db.execute(
                "SELECT id, owner, text FROM notes WHERE owner = ? ORDER BY id DESC LIMIT ?",
                (principal.subject, limit),
            ).fetchall()
        return [notes_thrift.Note(id=r[0], owner=r[1], text=r[2]) for r in rows]

    @public
    def health(self) -> str:
        return "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description="The Notes example service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--db", default="notes.sqlite3")
    parser.add_argument("--jwks-url", required=True)
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--audience", default="notes")
    args = parser.parse_args()
    verifier = make_verifier(
        "jwks", jwks_url=args.jwks_url, issuer=args.issuer, audience=args.audience
    )
    handler = NotesHandler(verifier, args.db)
    server = RpcServer(notes_thrift.Notes, handler, host=args.host, port=args.port).start()

    def stop() -> None:
        server.stop()
        verifier.close()

    return run_until_signal(f"notes ready on {args.host}:{server.port}", stop)


if __name__ == "__main__":
    raise SystemExit(main())
