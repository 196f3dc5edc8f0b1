"""A heavy app for bench/preload.py: its import takes 1 s and builds ~100 MB of module state.

The state is many small Python objects (as an ORM's metadata, a parsed schema or a model's vocabulary are),
not one bytes blob: every object carries a reference count, so a process that touches them copies their pages.
The code version it serves is read at import from $HEAVY_APP_VERSION_FILE: a reload picks up a new one.
"""

from __future__ import annotations

import os
import time

from aiohttp import web

IMPORT_SECONDS = 1.0
ITEMS = int(os.environ.get("HEAVY_APP_ITEMS", "250000"))  # ~400 bytes each: ~100 MB

_started = time.perf_counter()
STATE = [{"id": i, "name": f"item-{i:08d}", "tags": [i, f"t{i % 97}"]} for i in range(ITEMS)]
_path = os.environ.get("HEAVY_APP_VERSION_FILE", "")
VERSION = open(_path).read().strip() if _path else "v1"
time.sleep(max(0.0, IMPORT_SECONDS - (time.perf_counter() - _started)))


async def handler(request: web.Request) -> web.Response:
    item = STATE[len(request.path) % ITEMS]  # read, as a real handler reads its module state
    return web.Response(text=f"{VERSION} {os.getpid()} {item['id']}\n",
                        headers={"X-Version": VERSION, "X-Worker-Pid": str(os.getpid())})


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return app


app = create_app()  # gunicorn's aiohttp worker serves module:app; balancer serves the same object
