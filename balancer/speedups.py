"""The optional C module (`_speedups.c`), loaded once for the master and the workers alike."""

from __future__ import annotations

import os

from balancer import board, wire


def load():
    """(the module, "") when it is built, matches this Python code and is not switched off; else (None, why).

    why: "off" (BALANCER_NO_EXTENSIONS), "missing" (not built: no C compiler at install), or "stale" (a build
    from older sources, whose message or board layout differs from wire.py's and board.py's).
    """
    if os.environ.get("BALANCER_NO_EXTENSIONS"):
        return None, "off"
    try:
        from balancer import _speedups
    except ImportError:
        return None, "missing"
    names = ("MAX_FDS", "BOARD_COUNT", "BOARD_SUM_NS", "BOARD_STARTED", "BOARD_ASK", "BOARD_CHANNEL_FD",
             "BOARD_WINDOW_SUM", "BOARD_RUNNABLE_PER_MILLE", "IDLE", "BOARD_FIRSTS", "BOARD_CPU_NS")
    built = tuple(getattr(_speedups, name, None) for name in names)
    if built != (wire.MAX_FDS_PER_MSG, board.COUNT, board.SUM_NS, board.STARTED, board.ASK, board.CHANNEL_FD,
                 board.WINDOW_SUM, board.RUNNABLE_PER_MILLE, wire.IDLE, board.FIRSTS, board.CPU_NS):
        return None, "stale"
    return _speedups, ""


MODULE, WHY = load()
