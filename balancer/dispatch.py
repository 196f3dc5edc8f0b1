"""Least-loaded pick (round-robin among equals), fds held until acknowledged, re-dispatch of refused ones."""

from __future__ import annotations

import enum
import errno
import socket
import time
from collections import deque
from typing import Callable

from balancer import board, handoff, wire


class Phase(enum.Enum):
    """Where a worker process is in its life: the supervisor's one state per record."""

    BOOTING = "booting"
    READY = "ready"
    DRAINING = "draining"
    EXITED = "exited"


# Send errors that say the worker's end is gone; any other error (ENOBUFS, ENOMEM) is the kernel being short of
# memory for a moment: the worker rests until the next tick and its fds go elsewhere, it is not given up.
PEER_GONE_ERRNOS = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ECONNREFUSED))


class Link:
    """The dispatcher's view of one worker process: its channel, its load, and the fds it has not acked."""

    def __init__(self, slot: int, channel: socket.socket | None, ack_board: memoryview | None = None) -> None:
        self.slot = slot
        self.channel = channel
        self.board = ack_board if ack_board is not None else board.private()  # the worker's acks and closes
        self.phase = Phase.BOOTING  # written only by the supervisor's record (balancer/process.py)
        self.open_conns = 0  # acked and not yet reported closed
        self.unacked: dict[int, tuple[int, int]] = {}  # conn id -> (master's fd copy, family)
        self.sent: deque[tuple[int, list[int]]] = deque()  # (message number, its conn ids), not yet handled
        self.sent_msgs = 0  # handoff messages sent, masked like the board's handled count
        self.seen_word = 0  # board word 0 as last collected
        self.refused_seen = 0  # REFUSE messages processed, masked like the board's refused count
        self.acked_total = 0  # connections the worker acknowledged since it started
        self.send_blocked = False  # channel full: the worker is not reading (stalled or stopped)
        self.ack_overdue = False  # fds have waited too long for an ack: its loop is blocked or stopped
        self.resting = False  # it refused fds or a send failed for want of memory: nothing more until the tick
        self.channel_lost = False  # a send found its end closed: it is dying, the reap follows
        self.ack_progress = 0.0  # monotonic time of the last ack, or of the first fd sent since
        self.dispatched = 0  # connections handed to this worker, for metrics

    @property
    def load(self) -> int:
        """Connections this worker holds or is about to."""
        return self.open_conns + len(self.unacked)


class Dispatcher:
    """Chooses the least-loaded ready worker under its cap, round-robin among equals, and hands fds to it."""

    def __init__(self, cap: int, max_unacked: int = 256, on_blocked: Callable[[Link], None] | None = None) -> None:
        self.cap = cap
        # A worker that stops acking (SIGSTOP, a hung loop) gets at most this many fds in limbo.
        self.max_unacked = max_unacked
        self.links: list[Link] = []  # every live worker's link, in slot order: a view of the supervisor's table
        self.homeless: deque[tuple[int, int]] = deque()  # accepted fds no worker could take yet
        self.redispatched = 0
        self._next = 0
        self._next_id = 0
        self._on_blocked = on_blocked or (lambda link: None)

    def set_links(self, links: list[Link]) -> None:
        """Replace the view of live workers (the supervisor calls this whenever its table changes)."""
        self.links = links
        if self._next >= len(links):
            self._next = 0

    def eligible(self, link: Link | None) -> bool:
        """True when link may be given one more connection now."""
        return (
            link is not None
            and link.phase is Phase.READY
            and not link.send_blocked
            and not link.ack_overdue
            and not link.resting
            and not link.channel_lost
            and link.load < self.cap
            and len(link.unacked) < self.max_unacked
        )

    def pick(self) -> Link | None:
        """The least-loaded eligible link, ties going round-robin from the last one picked; None when all are full.

        Least-loaded, not plain round-robin: workers drift apart in speed (one shares its core with the load
        generator or a noisy neighbour), and a new connection given to the one with a queue waits while the
        other worker sits idle.
        """
        # eligible() inlined: this runs once per connection.
        links = self.links
        n = len(links)
        idx = self._next
        cap, max_unacked, ready = self.cap, self.max_unacked, Phase.READY
        best = None
        best_load = cap
        best_idx = 0
        for _ in range(n):
            if idx >= n:
                idx = 0
            link = links[idx]
            idx += 1
            if (link.phase is ready and not link.send_blocked and not link.ack_overdue and not link.resting
                    and not link.channel_lost and len(link.unacked) < max_unacked):
                load = link.open_conns + len(link.unacked)
                if load < best_load:
                    best, best_load, best_idx = link, load, idx
                    if load == 0:
                        break
        if best is not None:
            self._next = best_idx
        return best

    def any_ready(self) -> bool:
        """True when some worker is READY (full or not)."""
        return any(link.phase is Phase.READY for link in self.links)

    def all_busy(self, busy: int) -> bool:
        """True when every ready worker has at least `busy` connections open."""
        found = False
        for link in self.links:
            if link.phase is Phase.READY:
                if link.open_conns < busy:
                    return False
                found = True
        return found

    def free_capacity(self) -> int:
        """How many more connections the ready workers can take right now."""
        room = 0
        for link in self.links:
            if self.eligible(link):
                room += min(self.cap - link.open_conns - len(link.unacked), self.max_unacked - len(link.unacked))
        return room

    def dispatch(self, items: list[tuple[int, int]]) -> None:
        """Hand each (fd, family) to a worker; what no worker can take waits in homeless."""
        batches: dict[Link, tuple[list[int], list[int], list[int]]] = {}
        pick = self.pick
        conn_id = self._next_id
        for item in items:
            link = pick()
            if link is None:
                self.homeless.append(item)
                continue
            conn_id = (conn_id + 1) & 0xFFFFFFFF
            unacked = link.unacked
            if not unacked:
                link.ack_progress = time.monotonic()
            unacked[conn_id] = item
            batch = batches.get(link)
            if batch is None:
                batch = batches[link] = ([], [], [])
            batch[0].append(conn_id)
            batch[1].append(item[0])
            batch[2].append(item[1])
            if len(batch[0]) >= wire.MAX_FDS_PER_MSG:
                self._next_id = conn_id
                self._send(link, *batches.pop(link))
                conn_id = self._next_id
        self._next_id = conn_id
        for link, batch in batches.items():
            self._send(link, *batch)

    def _send(self, link: Link, ids: list[int], fds: list[int], families: list[int]) -> None:
        """Send one handoff message; on a full or broken channel take the fds back and re-route them."""
        try:
            handoff.send_handoff(link.channel, ids, families, fds)
            link.dispatched += len(ids)
            link.sent_msgs = seq = (link.sent_msgs + 1) & board.HANDLED_MASK
            link.sent.append((seq, ids))
            return
        except BlockingIOError:
            link.send_blocked = True
            self._on_blocked(link)
        except OSError as exc:
            if exc.errno in PEER_GONE_ERRNOS:
                link.channel_lost = True  # the supervisor reaps it; its fds must not wait for that
            else:
                link.resting = True  # ENOBUFS, ENOMEM: the kernel is short for a moment, the worker is fine
        reclaimed = [link.unacked.pop(i) for i in ids]
        self.redispatched += len(reclaimed)
        self.dispatch(reclaimed)

    def mark_overdue(self, now: float, after: float) -> None:
        """Stop choosing workers whose oldest unacked fd has waited more than `after` seconds; end rests.

        A worker whose loop is blocked still looks READY until its heartbeat times out; without this,
        new connections would keep being parked on it for the whole --timeout.
        """
        for link in self.links:
            link.resting = False
            if link.unacked:
                if now - link.ack_progress > after:
                    link.ack_overdue = True
            else:
                link.ack_overdue = False

    def retry_homeless(self) -> None:
        """Give waiting fds to workers that have room again."""
        if self.homeless:
            items = list(self.homeless)
            self.homeless.clear()
            self.dispatch(items)

    def collect(self, link: Link, closing: list[int] | None = None) -> None:
        """Read the worker's ack board: close the master's copies of what it took, update its open count.

        With closing given, the fds to close are added to it for the caller to close with other workers' fds.
        """
        words = link.board
        word = words[board.HANDLED]
        if word != link.seen_word:
            handled, refused = board.unpack(word)
            if refused != link.refused_seen:
                # Its REFUSE message went out before this store but is not read yet: until it is, acked and
                # refused ids cannot be told apart. on_refuse() collects again once it has read it.
                return
            link.seen_word = word
            sent, unacked, handled_by = link.sent, link.unacked, board.handled_by
            done: list[int] = []
            while sent and handled_by(sent[0][0], handled):
                for conn_id in sent.popleft()[1]:
                    item = unacked.pop(conn_id, None)  # None: refused, already re-dispatched
                    if item is not None:
                        done.append(item[0])
            link.ack_progress = time.monotonic()
            if done:
                if closing is None:
                    handoff.close_fds(done)  # the worker holds its own copies
                else:
                    closing += done
                link.acked_total += len(done)
                link.ack_overdue = False  # not after refusals alone: a refusing worker rests until the tick
        link.open_conns = max(0, link.acked_total - words[board.CLOSED])

    def collect_all(self) -> None:
        """Collect every worker's board, closing what they took in one call.

        A batch of accepted fds is mostly consecutive numbers, but ties in the pick alternate between workers,
        so each worker's share has gaps: closed together, the runs come back and close_fds ends each run
        with one close_range() instead of one close() per fd.
        """
        closing: list[int] = []
        for link in self.links:
            self.collect(link, closing)
        if closing:
            handoff.close_fds(closing)

    def on_refuse(self, link: Link, ids: list[int]) -> None:
        """The worker did not take these: give them to another worker."""
        link.refused_seen = (link.refused_seen + 1) & board.REFUSED_MASK
        reclaimed = [item for item in (link.unacked.pop(i, None) for i in ids) if item is not None]
        # A READY worker refuses when the fds did not fit (MSG_CTRUNC: it is out of fds). Rest it until the
        # next tick, or fds would bounce between workers that are all full, as fast as the loop turns.
        link.resting = True
        self.redispatched += len(reclaimed)
        self.dispatch(reclaimed)
        self.collect(link)  # acks that waited for this refusal to be read

    def evict(self, link: Link) -> int:
        """The worker is gone: the fds it never took go to other workers; returns how many.

        Call it only after every message left on the worker's channel has been read: a REFUSE still queued
        there is what tells the fds it refused from the ones it acked and served.
        """
        self.collect(link)  # what it took is its own: those clients go with it, never to a second worker
        reclaimed = list(link.unacked.values())
        link.unacked.clear()
        link.sent.clear()
        link.open_conns = 0
        if reclaimed:
            self.redispatched += len(reclaimed)
            self.dispatch(reclaimed)
        return len(reclaimed)

    def close_homeless(self) -> None:
        """At shutdown, close the fds no worker will ever take."""
        wire.close_all([fd for fd, _ in self.homeless])
        self.homeless.clear()
