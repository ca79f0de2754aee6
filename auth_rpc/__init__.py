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

import re
from importlib import metadata
from pathlib import Path

__all__ = ["__version__"]

_DISTRIBUTION = "thrift-token-auth"


def _version() -> str:
    """The installed distribution's version; else, in a source checkout, pyproject.toml's."""
    try:
        return metadata.version(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return "0+unknown"
    if not re.search(rf'^name\s*=\s*"{_DISTRIBUTION}"', text, re.MULTILINE):
        return "0+unknown"  # some other project's file
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return match[1] if match else "0+unknown"


#: The version of the ``thrift-token-auth`` distribution (``auth-rpc --version``).
__version__: str = _version()
