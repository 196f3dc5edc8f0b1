"""Per-connection costs the worker runtime removes from aiohttp and CPython once the backend has booted."""

from __future__ import annotations

import gc
import logging
import sys

log = logging.getLogger("balancer.worker")

# CPython's own thresholds: 3.13 raised the young generation's from 700 to 2,000. Anything else is a choice.
CPYTHON_DEFAULT_THRESHOLD = (700, 10, 10) if sys.version_info < (3, 13) else (2000, 10, 10)
# A connection's objects (its protocol, transport, request, response, parser, timers) live across a few loop
# turns, so at CPython's 700 (or 2,000) the young generation fills with objects that are still in use: every
# collection walks them and finds nothing (the worker's own path makes no reference cycles), then walks them again
# in the older generations. 10,000 is far above what 64 to a few hundred open connections keep alive between turns;
# an app that does make cyclic garbage still has it collected, a few MB later at most.
GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Freeze what booting allocated and raise the young generation's threshold, unless the app set its own."""
    gc.collect()
    gc.freeze()  # the app's modules and routes stay out of every later collection, full ones included
    current = gc.get_threshold()
    if current == CPYTHON_DEFAULT_THRESHOLD:
        gc.set_threshold(GEN0_THRESHOLD, *current[1:])
    else:  # an on_startup hook or a sitecustomize chose: theirs stands
        log.debug("gc threshold %s set by the app; kept", current)


def skip_second_nodelay() -> None:
    """Let aiohttp skip setting TCP_NODELAY on connections uvloop already set it on.

    aiohttp's BaseProtocol.connection_made sets TCP_NODELAY on every connection through
    transport.get_extra_info("socket"), which under uvloop builds a socket object for the fd (a getsockname,
    a setsockopt and a detach). The fd has it already twice over: the master sets it on its TCP listeners
    (Linux copies it to each accepted socket) and uvloop's TCPTransport sets it when it opens the fd. Any
    other transport (asyncio's, with --loop asyncio) still gets aiohttp's call.
    """
    try:
        import aiohttp.base_protocol as base_protocol
        from uvloop.loop import TCPTransport
    except ImportError:
        return
    original = getattr(base_protocol, "tcp_nodelay", None)
    if original is None or getattr(original, "skips_uvloop", False):
        return

    def tcp_nodelay(transport, value: bool) -> None:
        if value and type(transport) is TCPTransport:
            return
        original(transport, value)

    tcp_nodelay.skips_uvloop = True
    base_protocol.tcp_nodelay = tcp_nodelay
