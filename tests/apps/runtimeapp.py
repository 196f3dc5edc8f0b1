"""Backends for tests/test_worker_runtime.py: a flood of prometheus_client series, a segfault, fast answers."""

from __future__ import annotations

import ctypes
import os

from aiohttp import web
from prometheus_client import Counter

# Far past the heartbeat's room for backend metrics: FAMILIES families of ~200 bytes of JSON each.
FAMILIES = int(os.environ.get("RUNTIMEAPP_FAMILIES", "2000"))
FLOOD = [Counter(f"flood_{i:05d}_events", "One of many families, as a backend with a metric per table would have.",
                 ["table"]) for i in range(FAMILIES)]
for i, counter in enumerate(FLOOD):
    counter.labels(f"table-{i:05d}-" + "x" * 40).inc(i)


async def fast(request: web.Request) -> web.Response:
    return web.Response(text="ok\n", headers={"X-Worker-Pid": str(os.getpid())})


async def crash_hard(request: web.Request) -> web.Response:
    return web.Response(body=read_address_zero())


def read_address_zero() -> bytes:
    """Dereference NULL: the process dies of SIGSEGV, as a buggy C extension would make it."""
    return ctypes.string_at(0)


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", fast)
    app.router.add_get("/segv", crash_hard)
    return app
