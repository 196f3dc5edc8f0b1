"""A backend that leaves orphans behind: each request backgrounds a short-lived process and does not wait for it."""

from __future__ import annotations

import asyncio
import os
import time

from aiohttp import web


def double_fork(seconds: float) -> None:
    """Fork a child that forks a grandchild and exits at once: the grandchild is orphaned while it sleeps."""
    child = os.fork()
    if child == 0:
        try:
            if os.fork() == 0:
                time.sleep(seconds)
        finally:
            os._exit(0)
    os.waitpid(child, 0)  # the intermediate child is ours to reap; only the grandchild is orphaned


async def handler(request: web.Request) -> web.Response:
    """?how=fork: a double fork; otherwise `sleep &` in a shell that exits before it does."""
    seconds = float(request.query.get("s", "0.1"))
    if request.query.get("how") == "fork":
        double_fork(seconds)
    else:
        shell = await asyncio.create_subprocess_exec(
            "sh", "-c", f"sleep {seconds} &", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await shell.wait()
    return web.Response(text=f"backgrounded from {os.getpid()}\n")
