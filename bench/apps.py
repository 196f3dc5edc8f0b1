"""The one backend every Python system under test serves, built from the handlers in workers/examples.

Routes by path so each system is started once per round and serves every workload:
  /template        -> balancer_workers.examples.template:handler (Jinja2 page, CPU-bound)
  /slow/<ms>       -> asyncio.sleep(ms / 1000), then the hello response (the skewed mix's slow share)
  /spin?ms=<ms>    -> a busy loop until this thread has used ms of CPU, then the hello response (the tail
                      workloads: CPU-bound handlers of mixed lengths; CPU time, not wall time, so a handler
                      preempted by a neighbour still does the same work)
  anything else    -> balancer_workers.examples.hello:handler (tiny text response)
The Node.js peer (bench/node_cluster.js) answers the same paths with equivalent responses.
"""

from __future__ import annotations

import asyncio
from time import thread_time

from aiohttp import web

from balancer_workers.examples import hello, template

MAX_SLEEP_MS = 1000


def spin(query: str) -> None:
    """Busy-loop until this thread has used the CPU milliseconds that `ms=<float>` in the query asks for."""
    try:
        ms = min(max(float(query[3:]), 0.0), MAX_SLEEP_MS) if query.startswith("ms=") else 0.0
    except ValueError:
        ms = 0.0
    end = thread_time() + ms / 1000
    while thread_time() < end:
        pass


async def handler(request: web.Request) -> web.StreamResponse:
    """Dispatch on the path to one of the example handlers (see the module docstring)."""
    path = request.path
    if path == "/spin":
        spin(request.query_string)
    elif path == "/template":
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
