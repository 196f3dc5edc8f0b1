"""Backends for the limit tests: body readers of each kind, a handler that answers before reading, slow ones,
a streamed response that waits for the drain, apps with a body limit of their own."""

from __future__ import annotations

import asyncio

from aiohttp import web

from testapp import _ident, crash, echo, slow, whoami


async def read_all(request: web.Request) -> web.Response:
    """request.read(): aiohttp checks the Application's client_max_size here."""
    body = await request.read()
    return web.Response(text=f"{len(body)}\n", headers=_ident())


async def reject(request: web.Request) -> web.Response:
    """Answer before reading the body, as an auth check does after a lookup of ?s= seconds."""
    await asyncio.sleep(float(request.query.get("s", "0.05")))
    return web.Response(status=401, text="no\n", headers=_ident())


async def lazy_echo(request: web.Request) -> web.Response:
    """Busy for ?s= seconds before reading the body: it piles up unread meanwhile."""
    await asyncio.sleep(float(request.query.get("s", "2")))
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    return web.Response(text=f"{total}\n", headers=_ident())


DRAINING = web.AppKey("draining", asyncio.Event)


async def stream_across_drain(request: web.Request) -> web.StreamResponse:
    """A streamed response whose headers go out at once, and whose end waits for the worker's drain to begin."""
    response = web.StreamResponse(headers=_ident())
    await response.prepare(request)
    await response.write(b"first\n")
    await asyncio.wait_for(request.app[DRAINING].wait(), 60)  # set by on_shutdown: the drain has begun
    await response.write(b"last\n")
    await response.write_eof()
    return response


async def note_drain(app: web.Application) -> None:
    app[DRAINING].set()


def create_app(client_max_size: int = 1024 ** 2) -> web.Application:
    app = web.Application(client_max_size=client_max_size)
    app[DRAINING] = asyncio.Event()
    app.on_shutdown.append(note_drain)
    app.router.add_get("/", whoami)
    app.router.add_get("/slow", slow)
    app.router.add_get("/crash", crash)
    app.router.add_post("/echo", echo)
    app.router.add_post("/read", read_all)
    app.router.add_post("/reject", reject)
    app.router.add_post("/lazy", lazy_echo)
    app.router.add_get("/stream", stream_across_drain)
    return app


app = create_app()  # an Application instance, not a factory
big_app = create_app(5 * 1024 ** 2)  # its own client_max_size, 5 MiB
no_limit_app = create_app(0)  # aiohttp's "no limit"


def create_big_app() -> web.Application:
    return create_app(5 * 1024 ** 2)
