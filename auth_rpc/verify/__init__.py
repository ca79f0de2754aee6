"""The verification library: what a Thrift service embeds to check access tokens.

- :mod:`~auth_rpc.verify.principal`: :class:`Principal` (who is calling, with
  which scopes) and the :class:`TokenVerifier` protocol every mode implements;
- the four modes, behind :func:`make_verifier`: local (a shared HS256 secret
  or a public key), jwks (keys fetched from a JWKS URL), introspect (RFC 7662
  over HTTP) and thrift (``Auth.validate``);
- :mod:`~auth_rpc.verify.cache`: the bounded cache of verified tokens;
- :mod:`~auth_rpc.verify.statuslist`: Token Status Lists (draft-ietf-oauth-status-list),
  read by the local and jwks modes on every call: a revoked token is refused
  within about a second;
- :mod:`~auth_rpc.verify.guard`: the token guard for the handler of any
  Thrift service (:class:`GuardedHandler`, :func:`requires`, :func:`public`):
  every method checked at class definition, every call's token verified,
  scopes checked and errors mapped to the service's own IDL exceptions;
- :mod:`~auth_rpc.verify.rpc_errors`: the mapping of library errors to the
  exceptions declared in ``common.thrift``.

It builds on the serving layer (:mod:`auth_rpc.serving`) and never imports
the Auth service (:mod:`auth_rpc.auth`), ``posts_rpc`` or ``client``.
"""

from __future__ import annotations

from auth_rpc.verify.guard import (
    MAX_TOKEN_CHARS,
    GuardedHandler,
    public,
    public_methods,
    required_scopes,
    requires,
)
from auth_rpc.verify.principal import Principal, TokenVerifier
from auth_rpc.verify.verifiers import (
    IntrospectionVerifier,
    JwksVerifier,
    LocalVerifier,
    ThriftVerifier,
    make_verifier,
)

__all__ = [
    "MAX_TOKEN_CHARS",
    "GuardedHandler",
    "IntrospectionVerifier",
    "JwksVerifier",
    "LocalVerifier",
    "Principal",
    "ThriftVerifier",
    "TokenVerifier",
    "make_verifier",
    "public",
    "public_methods",
    "required_scopes",
    "requires",
]
