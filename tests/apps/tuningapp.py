"""Backends for tests/test_tuning.py: each page reports the worker's gc settings and its socket's TCP_NODELAY."""

from __future__ import annotations

import asyncio
import gc
import socket

from aiohttp import web


async def report(request: web.Request) -> web.Response:
    sock = request.transport.get_extra_info("socket")
    nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) if sock.family != socket.AF_UNIX else None
    return web.json_response({"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count(),
                              "nodelay": nodelay, "loop": type(asyncio.get_running_loop()).__module__})


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", report)
    return app


async def choose_own_threshold(app: web.Application) -> None:
    gc.set_threshold(1234, 5, 6)


def create_app_own_gc() -> web.Application:
    app = create_app()
    app.on_startup.append(choose_own_threshold)
    return app
