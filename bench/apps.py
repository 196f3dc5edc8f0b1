"""The one backend every Python system under test serves, built from the handlers in workers/examples.

Routes by path so each system is started once per round and serves every workload:
  /template        -> balancer_workers.examples.template:handler (Jinja2 page, CPU-bound)
  /slow/<ms>       -> asyncio.sleep(ms / 1000), then the hello response (the skewed mix's slow share)
  anything else    -> balancer_workers.examples.hello:handler (tiny text response)
The Node.js peer (bench/node_cluster.js) answers the same paths with equivalent responses.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from balancer_workers.examples import hello, template

MAX_SLEEP_MS = 1000


async def handler(request: web.Request) -> web.StreamResponse:
    """Dispatch on the path to one of the example handlers (see the module docstring)."""
    path = request.path
    if path == "/template":
        return await template.handler(request)
    if path.startswith("/slow/"):
        try:
            ms = min(max(int(path[6:]), 0), MAX_SLEEP_MS)
        except ValueError:
            ms = 0
        await asyncio.sleep(ms / 1000)
    return await hello.handler(request)


def create_app() -> web.Application:
    """An Application routing every GET path to handler (for gunicorn and the plain aiohttp peers)."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return app
