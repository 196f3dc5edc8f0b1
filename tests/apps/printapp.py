"""A backend that prints and logs, as apps do, to see each line arrive whole in the shared log."""

from __future__ import annotations

import json
import logging
import os
import sys

from aiohttp import web

log = logging.getLogger("printapp.talk")


async def chatter(request: web.Request) -> web.Response:
    """n rounds of: a print(), a multi-line print(), a line on stderr, a log record of the app's own logger."""
    slot = os.environ.get("BALANCER_WORKER_SLOT")
    for i in range(int(request.query.get("n", "1"))):
        print(f"print slot={slot} i={i}", "x" * (i % 200))
        print(json.dumps({"slot": slot, "i": i}, indent=1))  # {, two fields, }: four lines in one write()
        print(f"stderr slot={slot} i={i}", file=sys.stderr)
        log.info("log slot=%s i=%d", slot, i)
    return web.Response(text="said\n")


def application() -> web.Application:
    app = web.Application()
    app.router.add_get("/{tail:.*}", chatter)
    return app
