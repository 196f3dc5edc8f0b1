"""A websocket app in aiohttp's documented style: on_shutdown closes every open socket (GOING_AWAY).

Each hook appends "<event> <pid>" to the file named by WSAPP_EVENTS, so a test can see which ran, and when.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref

from aiohttp import WSCloseCode, web

SOCKETS = web.AppKey("sockets", weakref.WeakSet)


def note(event: str) -> None:
    with open(os.environ["WSAPP_EVENTS"], "a") as f:
        f.write(f"{event} {os.getpid()} {time.monotonic():.3f}\n")


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    request.app[SOCKETS].add(sock)
    note("ws_open")
    async for msg in sock:
        await sock.send_str(msg.data)
    return sock


async def on_shutdown(app: web.Application) -> None:
    note(f"on_shutdown open={len(app[SOCKETS])}")
    for sock in set(app[SOCKETS]):
        await sock.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")


async def on_cleanup(app: web.Application) -> None:
    await asyncio.sleep(float(os.environ.get("WSAPP_CLEANUP", "0")))  # a slow cleanup still finishes
    note("on_cleanup_done")


def create_app() -> web.Application:
    app = web.Application()
    app[SOCKETS] = weakref.WeakSet()
    app.router.add_get("/ws", ws)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
