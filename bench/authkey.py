"""The current signing key of an Auth data directory, so the bench can mint tokens.

The bench mints its cold-token pools itself (thousands of distinct tokens
before a window); asking the Auth service for each would measure the Auth
service. It reads the key the service made on its first start through the
service's own key store, read-only use.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["signing_key"]


def signing_key(data_dir: Path) -> tuple[bytes, str, str]:
    """``(private PEM, kid, alg)`` of the current signer; ``RuntimeError`` if there is none."""
    from auth_rpc.auth.db import Database
    from auth_rpc.auth.keys import KeyStore
    from auth_rpc.auth.service import DB_FILENAME

    db = Database.open(data_dir / DB_FILENAME)
    try:
        store = KeyStore(db, data_dir / "keys")
        current = [r for r in store.records() if r.superseded_at is None]
        if not current:
            raise RuntimeError(f"no current signing key in {data_dir}")
        record = current[-1]
        return store.load(record).private_pem(), record.kid, record.alg
    finally:
        db.close()
