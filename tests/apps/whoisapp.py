"""Backends for the forwarded-header and privilege tests: what the handler sees of the client and of itself."""

from __future__ import annotations

import os

from aiohttp import web


async def whois(request: web.Request) -> web.Response:
    """The client as the request describes it, plus the worker's uid, gid and groups."""
    return web.json_response({"remote": request.remote, "scheme": request.scheme, "secure": request.secure,
                              "host": request.host, "url": str(request.url), "uid": os.getuid(),
                              "gid": os.getgid(), "groups": sorted(os.getgroups())})


@web.middleware
async def seen_by_middleware(request: web.Request, handler):
    """Middlewares see the forwarded values too: echo what this one saw in a header."""
    response = await handler(request)
    response.headers["X-Middleware-Remote"] = str(request.remote)
    return response


def application() -> web.Application:
    """The same handler behind aiohttp's router and a middleware."""
    app = web.Application(middlewares=[seen_by_middleware])
    app.router.add_get("/{tail:.*}", whois)
    return app
