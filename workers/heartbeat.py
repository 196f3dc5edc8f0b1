"""Heartbeats from the worker's event loop, carrying its figures; the last one goes out after the drain."""

from __future__ import annotations

import logging

from balancer import wire
from balancer_workers.stats import HEARTBEAT_BYTES

log = logging.getLogger("balancer.worker")


class Heartbeat:
    """Sends the stats snapshot every interval from the loop itself: a blocked loop sends none."""

    def __init__(self, loop, channel, stats, connections, interval: float) -> None:
        self.loop = loop
        self.channel = channel
        self.stats = stats
        self.connections = connections
        self.interval = interval
        self.recycle = False  # ask the master for a graceful replacement (--max-requests reached)
        self._timer = None

    def start(self) -> None:
        """Beat now and every interval until send_final()."""
        self._tick()

    def _tick(self) -> None:
        # Re-armed first: one failing beat must not end the heartbeat, or the master takes us for hung.
        self._timer = None if self.channel.gone else self.loop.call_later(self.interval, self._tick)
        try:
            self.beat()
        except Exception:
            log.exception("building a heartbeat failed")

    def beat(self, final: bool = False) -> None:
        """Send the figures so far (each beat carries the totals since start, so a lost one costs nothing)."""
        body = self.stats.snapshot(min(HEARTBEAT_BYTES, self.channel.beat_room))
        body["open"] = self.connections.open
        if final:
            body["final"] = True  # the worker is about to exit: nothing follows, and no recycle is asked
        elif self.recycle:
            body["recycle"] = True
        self.channel.send_beat(wire.encode_json(wire.BEAT, body))

    def ask_recycle(self) -> None:
        """Tell the master now, once, that this worker wants replacing."""
        if not self.recycle:
            self.recycle = True
            self.beat()

    def send_final(self) -> None:
        """Stop beating and send the last figures, which count every request this worker finished."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.beat(final=True)
