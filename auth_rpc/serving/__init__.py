"""The serving layer: the hardened Thrift server both services run on.

It knows nothing of tokens. :mod:`~auth_rpc.serving.rpc` is the server
(:class:`RpcServer`, connection caps, deadlines, typed internal errors,
:class:`Preencoded` replies); :mod:`~auth_rpc.serving.wire` validates every
incoming message against the wire limits before thriftpy2 decodes it;
:mod:`~auth_rpc.serving.transport` opens client connections (plain, framed,
TLS); :mod:`~auth_rpc.serving.tls_front` terminates TLS in front of an HTTP
app; :mod:`~auth_rpc.serving.runner` runs a server from a command line (ready
line, signals, pre-forked workers).

Imports run one way: this layer imports nothing from the verification
library (:mod:`auth_rpc.verify`), the Auth service (:mod:`auth_rpc.auth`),
``posts_rpc`` or ``client``.
"""

from __future__ import annotations

from auth_rpc.serving.rpc import CallContext, Preencoded, RpcServer, current_call
from auth_rpc.serving.transport import TLSClientConfig, open_client
from auth_rpc.serving.wire import WireLimits

__all__ = [
    "CallContext",
    "Preencoded",
    "RpcServer",
    "TLSClientConfig",
    "WireLimits",
    "current_call",
    "open_client",
]
