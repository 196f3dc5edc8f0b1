"""Per-connection costs the worker runtime removes from CPython once the backend has booted (aiohttp's: see
aiohttp_compat.skip_second_nodelay)."""

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
