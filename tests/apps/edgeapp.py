"""A bare handler telling what the worker made of the connection: client address, scheme, TLS details."""

from __future__ import annotations

import os

from aiohttp import web


async def handler(request: web.Request) -> web.Response:
    """The request's view of its connection, as JSON."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    cert = transport.get_extra_info("peercert") if transport is not None else None
    client_cn = next((value for rdn in (cert or {}).get("subject", ()) for key, value in rdn if key == "commonName"),
                     None)
    return web.json_response({
        "remote": request.remote,
        "scheme": request.scheme,
        "peer": transport.get_extra_info("peername")[0] if transport is not None else None,  # the socket's peer
        "tls": ssl_object.version() if ssl_object is not None else None,
        "alpn": ssl_object.selected_alpn_protocol() if ssl_object is not None else None,
        "client_cn": client_cn,
        "pid": os.getpid(),
    })
