"""The default backend: a tiny page naming the worker slot and pid that served it."""

from __future__ import annotations

import os

from aiohttp import web


async def handler(request: web.Request) -> web.Response:
    """Say hello and which worker answered, so round robin is visible with curl."""
    slot = os.environ.get("BALANCER_WORKER_SLOT", "-")
    pid = os.getpid()
    return web.Response(
        text=f"Hello from balancer worker slot {slot} (pid {pid})\n",
        headers={"X-Worker-Slot": slot, "X-Worker-Pid": str(pid)},
    )
