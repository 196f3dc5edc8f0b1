"""A module written for `python runapp_at_import.py`: it serves itself at import, with no __main__ guard."""

from __future__ import annotations

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hi")


async def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", hello)
    return app


web.run_app(make_app(), host="127.0.0.1", port=0)
