"""Backend for the keep-alive rebalancing tests: spin some CPU, then name the request, the worker and the client."""

from __future__ import annotations

import os
from time import thread_time

from aiohttp import web


async def handler(request: web.Request) -> web.Response:
    """Busy-loop ms=<float> milliseconds of this thread's CPU, then answer "<id> <worker pid> <request.remote>"."""
    ms = min(float(request.query.get("ms", "0") or 0), 1000.0)
    end = thread_time() + ms / 1000
    while thread_time() < end:
        pass
    return web.Response(text=f"{request.query.get('id', '')} {os.getpid()} {request.remote}")
