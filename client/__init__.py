"""The client side: a library and the ``posts-client`` command.

:func:`connect_auth` and :func:`connect_posts` open one Thrift connection to the
Auth or the Posts service and yield the IDL's methods as they are. A
:class:`Session` logs in (with a password, or with OAuth client credentials
for a service) and hands out clients whose methods leave out the ``token``
argument (``session.posts().list_posts(limit=10)``, or
``session.client(service, "host:port", safe_to_repeat={...})`` for any Thrift
service): it attaches the access token to every call, refreshes it shortly
before it expires, renews it once and retries once when a call is refused as
unauthenticated, pools connections so it can be shared between threads, and
reconnects after a dropped connection (retrying once the methods declared
safe to repeat, any other never after its request was sent). The IDL's
exceptions (``Unauthenticated``, ``PermissionDenied``, ``InvalidArgument``,
``NotFound``, ``Unavailable``, ``RateLimited``) come through unchanged and are
re-exported here (the classes of ``auth_rpc.idl``; a service whose IDL was
loaded separately has its own classes: :func:`is_common_error` recognises
both by name); :class:`ClientError` and its subclasses are the client's own.
"""

from auth_rpc.idl import common_thrift
from client.session import (
    ClientError,
    ConnectionLost,
    Endpoint,
    NotLoggedIn,
    ProtocolError,
    Session,
    TokenClient,
    Tokens,
    TransportError,
    connect_auth,
    connect_posts,
    is_common_error,
)

Unauthenticated = common_thrift.Unauthenticated
PermissionDenied = common_thrift.PermissionDenied
InvalidArgument = common_thrift.InvalidArgument
NotFound = common_thrift.NotFound
Unavailable = common_thrift.Unavailable
RateLimited = common_thrift.RateLimited

__all__ = [
    "ClientError",
    "ConnectionLost",
    "Endpoint",
    "InvalidArgument",
    "NotFound",
    "NotLoggedIn",
    "PermissionDenied",
    "ProtocolError",
    "RateLimited",
    "Session",
    "TokenClient",
    "Tokens",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "connect_auth",
    "connect_posts",
    "is_common_error",
]
