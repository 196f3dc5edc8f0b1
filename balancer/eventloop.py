"""--loop: the one chooser of the event loop, for the master and its workers alike."""

from __future__ import annotations

import asyncio

LOOPS = ("auto", "asyncio", "uvloop")


class LoopUnavailable(ValueError):
    """--loop uvloop, and uvloop is not installed."""


def loop_factory(choice: str):
    """The event loop constructor for --loop: auto is uvloop when installed, else asyncio's."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise LoopUnavailable("--loop uvloop, but uvloop is not installed (pip install uvloop, or "
                                      "--loop auto)") from None
            return asyncio.new_event_loop
        return uvloop.new_event_loop
    return asyncio.new_event_loop
