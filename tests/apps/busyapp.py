"""A backend for the dispatch tests: CPU-bound handlers of a chosen length, and which worker answered."""

from __future__ import annotations

import os
import sys
import time

from aiohttp import web


def _ident() -> dict:
    return {"X-Worker-Pid": str(os.getpid())}


async def whoami(request: web.Request) -> web.Response:
    return web.Response(text=f"{os.getpid()}\n", headers=_ident())


async def spin(request: web.Request) -> web.Response:
    """Busy-loop for ?s= seconds of this thread's CPU time: the worker is in a handler, on a CPU, all along."""
    seconds = float(request.query.get("s", "1"))
    if request.query.get("say"):
        print(f"spinning {seconds}s in pid {os.getpid()}", file=sys.stderr, flush=True)
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return web.Response(text="spun\n", headers=_ident())


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", whoami)
    app.router.add_get("/spin", spin)
    return app
