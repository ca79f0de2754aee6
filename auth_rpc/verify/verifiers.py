"""Embeddable access-token verifiers, one module per mode, and :func:`make_verifier`.

Every verifier implements :class:`auth_rpc.verify.principal.TokenVerifier`:
``verify(token) -> Principal`` raising :class:`~auth_rpc.errors.TokenRejected`
(the token is not acceptable) or :class:`~auth_rpc.errors.DependencyUnavailable`
(what is needed to decide cannot be reached: the caller refuses the call, it
never accepts it), and ``close()``.

- :class:`LocalVerifier`: an HS256 secret or a PEM public key held in memory.
- :class:`JwksVerifier`: public keys fetched from a configured JWK Set URL.
- :class:`IntrospectionVerifier`: RFC 7662 token introspection, any server.
- :class:`ThriftVerifier`: ``Auth.validate`` over pooled Thrift connections.

All of them share the verified-token cache of :mod:`auth_rpc.verify.cache`. For the
remote modes its TTL (``cache_ttl_s``, 30 s by default) is how long a revoked
token may still be accepted; ``cache_ttl_s=0`` turns it off. The local modes
read each token's bit in the Token Status List its ``status`` claim names
(:mod:`auth_rpc.verify.statuslist`; on by default, ``status_list="if-present"``
or ``"off"`` for tokens of an issuer without status lists), and consult a
:class:`~auth_rpc.verify.principal.RevocationCheck` if given: both on every
call, cached or not.

Misconfiguration (a short HS256 secret, an algorithm the key cannot verify,
``none``) raises ``ValueError`` at construction: it is never a token rejection.
Rejection messages are short and generic and never contain the token.
"""


from __future__ import annotations

from pathlib import Path
from typing import Any

from auth_rpc.serving.transport import parse_hostport
from auth_rpc.verify.cache import CachingVerifier
from auth_rpc.verify.introspect import IntrospectionVerifier
from auth_rpc.verify.jwks import JwksVerifier
from auth_rpc.verify.local import LocalVerifier, read_secret_file
from auth_rpc.verify.principal import TokenVerifier
from auth_rpc.verify.thrift import ThriftVerifier

__all__ = [
    "IntrospectionVerifier",
    "JwksVerifier",
    "LocalVerifier",
    "ThriftVerifier",
    "make_verifier",
    "read_secret_file",
]


# -- factory ------------------------------------------------------------------

_MODES: dict[str, type[CachingVerifier]] = {
    "local": LocalVerifier,
    "jwks": JwksVerifier,
    "introspect": IntrospectionVerifier,
    "thrift": ThriftVerifier,
}


def make_verifier(mode: str, **settings: Any) -> TokenVerifier:
    """Build the verifier for ``mode`` (``local``, ``jwks``, ``introspect``, ``thrift``).

    ``settings`` are the constructor's keywords, plus conveniences for the
    command line: ``public_key_file`` and ``hs256_secret_file`` (local),
    ``client_secret_file`` (introspect) and ``auth_addr="HOST:PORT"`` (thrift).
    Secret files lose a trailing newline. Raises ``ValueError`` for an unknown
    mode or setting or a bad configuration, ``OSError`` for an unreadable file.
    """
    cls = _MODES.get(mode)
    if cls is None:
        raise ValueError(f"unknown verification mode {mode!r}; expected one of {sorted(_MODES)}")
    settings = dict(settings)
    if mode == "local":
        if (path := settings.pop("public_key_file", None)) is not None:
            settings["public_key_pem"] = Path(path).read_bytes()
        if (path := settings.pop("hs256_secret_file", None)) is not None:
            settings["hs256_secret"] = read_secret_file(path)
    elif mode == "introspect":
        if (path := settings.pop("client_secret_file", None)) is not None:
            settings["client_secret"] = read_secret_file(path).decode("utf-8")
    elif mode == "thrift" and (addr := settings.pop("auth_addr", None)) is not None:
        settings["host"], settings["port"] = parse_hostport(addr)
    try:
        verifier = cls(**settings)
    except TypeError as exc:
        raise ValueError(f"bad settings for verification mode {mode!r}: {exc}") from exc
    assert isinstance(verifier, TokenVerifier)
    return verifier
