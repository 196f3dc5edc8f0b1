"""What the worker runtime tunes after boot (workers/tuning.py): the gc thresholds and aiohttp's second TCP_NODELAY."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import pytest

from tests.harness import Balancer
from balancer_workers import aiohttp_compat, tuning

pytestmark = pytest.mark.timeout(60)


def fetch(b: Balancer) -> dict:
    with urllib.request.urlopen(b.url + "/", timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_workers_freeze_boot_objects_raise_gen0_and_keep_nodelay(loop):
    with Balancer("--backend", "tuningapp:create_app", "--workers", "1", "--loop", loop) as b:
        seen = fetch(b)
    assert seen["loop"].startswith(loop), seen
    assert seen["threshold"] == [tuning.GEN0_THRESHOLD, 10, 10], seen
    assert seen["frozen"] > 1000, seen  # aiohttp, the app and the runtime: tens of thousands of objects
    assert seen["nodelay"] == 1, seen  # small responses are never held back by Nagle, whichever loop set it


def test_an_apps_own_gc_threshold_is_kept():
    with Balancer("--backend", "tuningapp:create_app_own_gc", "--workers", "1") as b:
        seen = fetch(b)
    assert seen["threshold"] == [1234, 5, 6], seen


def test_the_second_nodelay_is_skipped_only_for_uvloop_transports(monkeypatch):
    """In process: aiohttp's helper is bypassed for uvloop's TCPTransport and still runs for any other."""
    import aiohttp.base_protocol as base_protocol
    import uvloop

    calls = []
    monkeypatch.setattr(base_protocol, "tcp_nodelay", lambda transport, value: calls.append(type(transport)))
    aiohttp_compat.skip_second_nodelay()
    aiohttp_compat.skip_second_nodelay()  # a second call must not wrap the wrapper

    async def serve_one() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        conn.setblocking(False)
        transport, _proto = await loop.connect_accepted_socket(lambda: base_protocol.BaseProtocol(loop), conn)
        transport.close()
        client.close()
        listener.close()

    uvloop.run(serve_one())
    assert calls == []
    asyncio.run(serve_one())
    assert len(calls) == 1 and "uvloop" not in calls[0].__module__, calls
