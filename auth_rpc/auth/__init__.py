"""The Auth service: accounts, keys, tokens, and the Thrift and HTTP servers that issue them.

:class:`~auth_rpc.auth.service.AuthService` is the core (login, refresh,
client credentials, validate, revoke, JWKS); :mod:`~auth_rpc.auth.handler`
exposes it over Thrift, :mod:`~auth_rpc.auth.http` over HTTP (JWKS, RFC 8414
metadata, the OAuth 2.0 token endpoint, RFC 7662 introspection, RFC 7009
revocation); :mod:`~auth_rpc.auth.server` runs both, and ``auth-rpc``
(:mod:`~auth_rpc.auth.cli`) is its command line. It builds on the
verification library and the serving layer, never on ``posts_rpc`` or
``client``.
"""
