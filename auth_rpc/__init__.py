"""Token authentication for Thrift RPC services.

The Auth service (``auth_rpc.server``) issues RFC 9068 JWT access tokens and
rotating refresh tokens over Thrift and HTTP; ``auth_rpc.verifiers`` is the
library other services embed to check those tokens (locally, with a JWKS URL,
by RFC 7662 introspection, or by ``Auth.validate`` over Thrift);
``auth_rpc.serving`` is the hardened Thrift serving layer both services use;
``auth_rpc.testing`` is a pytest plugin with in-process servers and a token
factory.
"""

__all__: list[str] = []
