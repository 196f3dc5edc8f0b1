"""The master's accept path: read the listeners, hand batches to the dispatcher, pause when no worker has room."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time

from balancer import handoff
from balancer.config import COALESCE_BUSY
from balancer.dispatch import Link
from balancer.errnos import RESOURCE_ERRNOS  # accept() errors: back off, keep serving
from balancer.listeners import Listener

log = logging.getLogger("balancer")

ACCEPT_BATCH = 64  # connections accepted per readable event: fair to other listeners and to the loop
# While every worker is at its cap, how often the master reads their ack boards for closes (they send no message).
CAPACITY_POLL = 0.002
# accept() errors that concern one connection only: skip it and keep accepting (see trio's list).
SKIP_ERRNOS = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                         errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH))


def accept_batch(sock, limit: int) -> tuple[list[int], int]:
    """Accept up to limit connections, past ones gone before accept() (SKIP_ERRNOS): (fds, the errno it ended on)."""
    fds, err = handoff.accept_many(sock, limit)
    skipped = 0
    while err in SKIP_ERRNOS and len(fds) + skipped < limit:  # that connection is gone; the next may be fine
        skipped += 1
        more, err = handoff.accept_many(sock, limit - len(fds) - skipped)
        fds += more
    return fds, err


class AcceptPath:
    """The accept half of the Master (its state lives in Master.__init__); split out to keep each file readable."""

    def _on_readable(self, listener: Listener) -> None:
        """Accept a bounded batch and hand it out; stop reading when no worker has room."""
        dispatcher = self.dispatcher
        room = dispatcher.survey()  # acks and closes since the last look: free fds and room, in one pass
        if room <= 0 or dispatcher.homeless:
            self._pause()
            self._watch_capacity()
            return
        fds, err = accept_batch(listener.sock, min(room, ACCEPT_BATCH))
        if err and err != errno.EAGAIN and err not in SKIP_ERRNOS:
            self._accept_failed(OSError(err, os.strerror(err)))
        family = listener.family
        items = [(fd, family) for fd in fds]
        if items:
            self._accept_backoff = 0.0
            self.accepted += len(items)
            dispatcher.dispatch(items, surveyed=True)
            if dispatcher.holding is not None and dispatcher.holding.items:
                self._arm_hold_timer()
            # room - len(items) can only overestimate (a channel found full meanwhile); the next call re-counts
            if dispatcher.homeless or room - len(items) <= 0:
                self._pause()
                self._watch_capacity()
            elif (self.config.accept_coalesce and dispatcher.min_open_ready is not None
                  and dispatcher.min_open_ready >= COALESCE_BUSY):  # every ready worker is busy
                self._coalesce()

    def _on_return(self, link: Link, fd: int, family: int, peer: bytes) -> None:
        """A worker gave back an idle keep-alive connection: watch it, or close it if the workers are draining."""
        if self.draining:  # no worker takes connections any more: closed idle, as at the keep-alive timeout
            self.parking.refuse(fd)
            return
        self.parking.park(fd, family, peer)

    def _dispatch_resumed(self, items: list[tuple[int, int]]) -> None:
        """Parked connections whose next request came: to a free worker first, as new ones go."""
        dispatcher = self.dispatcher
        dispatcher.survey()
        dispatcher.dispatch(items, surveyed=True)
        if dispatcher.holding is not None and dispatcher.holding.items:
            self._arm_hold_timer()
        if dispatcher.homeless:
            self._pause()
            self._watch_capacity()

    def _coalesce(self) -> None:
        """Every worker is busy: let connections gather in the backlog for a moment, then take them as one batch.

        Measured with Connection: close on 2 workers, a wait of 1 ms halved the master's wake-ups and hand-off
        messages and raised req/s by 16%: each wake-up, message and worker wake-up is paid per batch, and
        a worker with COALESCE_BUSY connections open has more than the wait's worth of work in hand.
        """
        if self._coalesce_timer is not None:  # a wait is on already (several listeners read in one turn)
            return
        self._read_listeners(False)
        self.coalesced += 1
        self._coalesce_timer = asyncio.get_running_loop().call_later(self.config.accept_coalesce, self._end_coalesce)

    def _end_coalesce(self) -> None:
        """Take what gathered in the backlogs now; read the listeners again unless another wait began.

        While the workers stay busy the master goes from one wait to the next on the timer alone: watching the
        listeners again between waits cost two epoll_ctl calls and a wake-up per batch for nothing.
        Nothing is done if accepting was paused meanwhile (then _resume re-adds the listeners).
        """
        self._coalesce_timer = None
        for listener in self.listeners:  # every one, even once a new wait began: none is left behind
            if self.paused:
                break
            self._on_readable(listener)
        if not self.paused and self._coalesce_timer is None:
            self._read_listeners(True)

    def _accept_failed(self, exc: OSError) -> None:
        """Out of fds or memory: pause accepting with a growing delay instead of spinning a core."""
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        self.accept_errors[name] = self.accept_errors.get(name, 0) + 1
        if exc.errno not in RESOURCE_ERRNOS:
            log.error("accept failed: %s", exc)
        self._accept_backoff = min(1.0, max(0.01, self._accept_backoff * 2))
        if self.accept_errors[name] in (1, 10, 100) or self.accept_errors[name] % 1000 == 0:
            log.warning("accept: %s (%d so far); backing off %.2fs", exc.strerror, self.accept_errors[name],
                        self._accept_backoff)
        self._pause()
        if self._accept_retry is None:
            self._accept_retry = asyncio.get_running_loop().call_later(self._accept_backoff, self._retry_accept)

    def _retry_accept(self) -> None:
        """The accept back-off is over."""
        self._accept_retry = None
        self._on_capacity()

    def _read_listeners(self, reading: bool) -> None:
        """Start or stop reading every listener (for a pause, or a coalescing wait)."""
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            if reading:
                loop.add_reader(listener.sock.fileno(), self._on_readable, listener)
            else:
                loop.remove_reader(listener.sock.fileno())

    def _pause(self) -> None:
        """Stop reading the listeners; the kernel backlog holds new connections meanwhile.

        Held connections go out now, as least-connections places them (homeless if nothing has room): a pause
        for room or for a stop is no time to wait for a free worker.
        """
        self.dispatcher.release_held()
        if not self.paused:
            self._read_listeners(False)
            self.paused = True
            self._paused_since = time.monotonic()
            self._pause_for_room = self.dispatcher.any_ready()

    def _recount_pause(self) -> None:
        """A pause is backpressure only while some worker is ready; with none (start, all down) it is not."""
        for_room = self.dispatcher.any_ready()
        if for_room != self._pause_for_room:
            now = time.monotonic()
            if self._pause_for_room:
                self.paused_seconds += now - self._paused_since
            self._paused_since = now
            self._pause_for_room = for_room

    def _resume(self) -> None:
        """Read the listeners again."""
        if self.paused:
            if self._coalesce_timer is not None:  # room came back during a wait: end it now
                self._coalesce_timer.cancel()
                self._coalesce_timer = None
            self._read_listeners(True)
            self.paused = False
            if self._pause_for_room:
                self.paused_seconds += time.monotonic() - self._paused_since

    def paused_total(self) -> float:
        """Seconds spent with accepting paused while some worker was ready, including the current pause."""
        if self.paused and not self.draining:
            self._recount_pause()
            if self._pause_for_room:
                return self.paused_seconds + time.monotonic() - self._paused_since
        return self.paused_seconds

    def _on_capacity(self) -> None:
        """A worker got ready, acked, closed or refused: place waiting fds, maybe resume accepting."""
        dispatcher = self.dispatcher
        if dispatcher.holding is not None and dispatcher.holding.items:
            self._release_held()
        if self.paused and not self.draining:
            self._recount_pause()
        if dispatcher.homeless:
            dispatcher.retry_homeless()
            if dispatcher.homeless:
                self._watch_capacity()
        if (self.paused and not self.draining and self._accept_retry is None and not dispatcher.homeless
                and dispatcher.free_capacity() > 0):
            self._resume()

    def _watch_capacity(self) -> None:
        """Workers are full: look at their boards every CAPACITY_POLL until a close makes room."""
        if self._capacity_poll is None and not self.draining:
            self._capacity_poll = asyncio.get_running_loop().call_later(CAPACITY_POLL, self._poll_capacity)

    def _poll_capacity(self) -> None:
        """One look at the boards; keep looking while connections wait or accepting is paused for room."""
        self._capacity_poll = None
        self.dispatcher.collect_all()
        self._on_capacity()
        # With no READY worker there is nothing to poll for: a READY message calls _on_capacity itself.
        if (self.dispatcher.homeless or (self.paused and self._accept_retry is None)) and self.dispatcher.any_ready():
            self._watch_capacity()

    # ---- held connections (balancer/holding.py) ----------------------------------------------------

    def _release_held(self) -> None:
        """Look at the boards and place the held connections whose worker is free or whose time came."""
        dispatcher = self.dispatcher
        dispatcher.survey()
        dispatcher.dispatch([], surveyed=True)
        self._arm_hold_timer()

    def _arm_hold_timer(self) -> None:
        """Wake up at the earliest held connection's deadline (HOLD_CAP), whatever the workers say."""
        holding = self.dispatcher.holding
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if holding is not None and holding.items:
            wait = max(0.0, min(item.deadline for item in holding.items) - time.monotonic())
            self._hold_timer = asyncio.get_running_loop().call_later(wait, self._on_hold_deadline)

    def _on_hold_deadline(self) -> None:
        self._hold_timer = None
        self._release_held()

    def _on_blocked(self, link: Link) -> None:
        """A worker's channel is full: it gets nothing until the kernel says it drained."""
        loop = asyncio.get_running_loop()

        def writable() -> None:
            loop.remove_writer(link.channel.fileno())
            link.send_blocked = False
            self._on_capacity()

        loop.add_writer(link.channel.fileno(), writable)
