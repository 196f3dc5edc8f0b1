"""Backends used by the integration tests: slow, crashing, blocking and identifying handlers."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from aiohttp import web


def _ident() -> dict:
    return {"X-Worker-Slot": os.environ.get("BALANCER_WORKER_SLOT", "-"), "X-Worker-Pid": str(os.getpid())}


async def whoami(request: web.Request) -> web.Response:
    return web.Response(text=f"{os.environ.get('BALANCER_WORKER_SLOT')} {os.getpid()}\n", headers=_ident())


async def slow(request: web.Request) -> web.Response:
    print(f"slow request started in pid {os.getpid()}", file=sys.stderr, flush=True)
    await asyncio.sleep(float(request.query.get("s", "2")))
    return web.Response(text="slow done\n", headers=_ident())


async def nap(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "0.05")))
    return web.Response(text="rested\n", headers=_ident())


class Custom(BaseException):
    """Neither an Exception nor a cancellation."""


CRASHES = {"error": lambda: RuntimeError("handler crashed on purpose"), "exit": lambda: SystemExit(1),
           "interrupt": KeyboardInterrupt, "generator-exit": GeneratorExit, "base": lambda: Custom("custom")}


async def crash(request: web.Request) -> web.Response:
    if request.query.get("how") == "sys.exit":
        sys.exit(3)
    raise CRASHES[request.query.get("how", "error")]()


async def block(request: web.Request) -> web.Response:
    print(f"blocking pid {os.getpid()}", file=sys.stderr, flush=True)
    time.sleep(float(request.query.get("s", "60")))  # blocks the event loop: heartbeats stop
    return web.Response(text="unblocked\n")


async def exit_worker(request: web.Request) -> web.Response:
    os._exit(1)


async def echo(request: web.Request) -> web.Response:
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    return web.Response(text=f"{total}\n", headers=_ident())


async def request_info(request: web.Request) -> web.Response:
    """What a bare handler sees of aiohttp's Request (it is served without the router)."""
    body = await request.read()
    request.match_info[request.path] = "seen"  # written per request: the next request must not see it
    return web.json_response({"method": request.method, "path": request.path, "body": len(body),
                              "request_class": type(request).__name__, "app": type(request.app).__name__,
                              "config_dict": len(request.config_dict),
                              "route_method": request.match_info.route.method,
                              "match_info": sorted(request.match_info)})


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", whoami)
    app.router.add_get("/slow", slow)
    app.router.add_get("/nap", nap)
    app.router.add_get("/crash", crash)
    app.router.add_get("/block", block)
    app.router.add_get("/exit", exit_worker)
    app.router.add_post("/echo", echo)
    return app


app = create_app  # a factory under another name


async def async_factory() -> web.Application:
    return create_app()


async def slow_boot() -> web.Application:
    """A factory that takes SLOW_BOOT seconds (default 60): workers stay booting meanwhile."""
    print(f"slow boot started pid={os.getpid()}", file=sys.stderr, flush=True)
    await asyncio.sleep(float(os.environ.get("SLOW_BOOT", "60")))
    return create_app()


not_callable = 42


def init_func(argv):
    """aiohttp's CLI factory style (`python -m aiohttp.web testapp:init_func`): called with the extra args."""
    assert argv == [], argv
    return create_app()


def init_any(args):
    """aiohttp's CLI calls any one-argument factory with the extra args, whatever the parameter's name."""
    return create_app()


def sync_handler(request):
    """A handler that forgot `async`: taken for aiohttp's init_func(argv), which it is not."""
    return web.Response(text="never served")


async def ainit_func(argv):
    assert argv == [], argv
    return create_app()


def configured(name: str, *, shout: bool = False) -> web.Application:
    """gunicorn's `module:factory(args)` spelling passes literals."""
    app = create_app()

    async def named(request: web.Request) -> web.Response:
        return web.Response(text=name.upper() if shout else name, headers=_ident())

    app.router.add_get("/name", named)
    return app


def two_args(a, b):
    return None


_hoard: list[bytes] = []


async def hog(request: web.Request) -> web.Response:
    _hoard.append(b"x" * int(request.query.get("mb", "64")) * 1024 * 1024)
    return web.Response(text="hoarded\n", headers=_ident())


def create_app_with_hog() -> web.Application:
    app = create_app()
    app.router.add_get("/hog", hog)
    return app
