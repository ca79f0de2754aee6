"""Token authentication for Thrift RPC services, in three layers.

- :mod:`auth_rpc.auth`: the Auth service, which issues RFC 9068 JWT access
  tokens and rotating refresh tokens over Thrift and HTTP (``auth-rpc``);
- :mod:`auth_rpc.verify`: the verification library other services embed to
  check those tokens (locally, with a JWKS URL, by RFC 7662 introspection, or
  by ``Auth.validate`` over Thrift), and the guard that protects a service;
- :mod:`auth_rpc.serving`: the hardened Thrift serving layer both services use.

Imports run one way: ``auth`` -> ``verify`` -> ``serving``; :mod:`auth_rpc.errors`
and :mod:`auth_rpc.idl` are shared by all three. :mod:`auth_rpc.testing` is a
pytest plugin with in-process servers and a token factory.
"""

__all__: list[str] = []
