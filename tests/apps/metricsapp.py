"""A backend that registers its own prometheus_client metrics, as a user's handler would."""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

ORDERS = Counter("shop_orders", "Orders placed, by kind.", ["kind"])
BASKET = Histogram("shop_basket_items", "Items per basket.", buckets=(1, 5, 10))
WORKER_SLOT = Gauge("shop_worker_slot", "The slot this worker serves, to prove the label lands right.")
WORKER_SLOT.set(float(os.environ.get("BALANCER_WORKER_SLOT", "-1")))


async def order(request: web.Request) -> web.Response:
    kind = request.query.get("kind", "book")
    ORDERS.labels(kind).inc()
    BASKET.observe(int(request.query.get("items", "3")))
    slot = os.environ.get("BALANCER_WORKER_SLOT", "-")
    return web.Response(text=f"ordered {kind}\n", headers={"X-Worker-Slot": slot, "X-Worker-Pid": str(os.getpid())})


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", order)
    return app
