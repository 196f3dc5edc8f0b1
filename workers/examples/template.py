"""A CPU-bound backend: an HTML page rendered per request with Jinja2, like the cluster article's."""

from __future__ import annotations

import os
import random
from pathlib import Path

from aiohttp import web

try:
    import jinja2
except ModuleNotFoundError as exc:
    if exc.name != "jinja2":
        raise
    # jinja2 is an optional extra; the worker turns this into the master's one-line boot error (exit 3).
    raise ModuleNotFoundError("the template example needs jinja2, which the 'examples' extra installs: "
                              "pip install 'balancer[examples]'", name="jinja2") from None

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
)
_page = _env.get_template("page.html")
_PRODUCTS = [
    {"id": i, "name": f"Product {i}", "price": round(5 + (i * 7919 % 9500) / 100, 2),
     "tags": [f"tag{(i * k) % 17}" for k in range(1, 4)]}
    for i in range(200)
]


async def handler(request: web.Request) -> web.Response:
    """Render the product page fresh for every request (no caching: the CPU work is the point)."""
    rng = random.Random(request.query.get("seed", ""))
    items = rng.sample(_PRODUCTS, 120)
    html = _page.render(
        title="balancer template example",
        slot=os.environ.get("BALANCER_WORKER_SLOT", "-"),
        pid=os.getpid(),
        items=items,
        total=sum(item["price"] for item in items),
    )
    return web.Response(text=html, content_type="text/html",
                        headers={"X-Worker-Slot": os.environ.get("BALANCER_WORKER_SLOT", "-")})


def create_app() -> web.Application:
    """Factory form, for `--backend balancer_workers.examples.template:create_app`."""
    app = web.Application()
    app.router.add_get("/", handler)
    return app
