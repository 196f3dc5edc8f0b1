"""A free worker first, else the least-loaded (round-robin among equals); fds held until acknowledged; re-dispatch."""

from __future__ import annotations

import socket
import time
from collections import deque
from typing import Callable

from balancer import handoff, speedups, wire
from balancer.board import (CLOSED, FINISHED, FIRSTS, HANDLED, HANDLED_MASK, REFUSED_MASK, STARTED, handled_by,
                            unpack)
from balancer.board import private as private_board
from balancer.errnos import PEER_GONE_ERRNOS
from balancer.holding import BUSY_COST, HOLD_DEPTH, PENDING_EXPIRY, Holding


def pick_key(load: int, busy: bool) -> int:
    """A worker's key in the picks (fill(..., BUSY_COST)): a request in hand weighs BUSY_COST connections, and at
    equal weight a free worker goes first."""
    return 2 * (load + BUSY_COST) + 1 if busy else 2 * load


def fill_py(loads: list[int], rooms: list[int], start: int, count: int,
            busy_cost: int = 0) -> tuple[list[int], int, int]:
    """Make count picks, one at a time, of the least-loaded link with room, ties going round-robin from start.

    Returns how many picks each link got, where the round robin goes on from, and how many picks were made
    (fewer than count when every link ran out of room). With busy_cost > 0 the loads are pick keys (pick_key):
    a pick adds a connection, and makes a free worker busy. `_speedups.fill` is the same in C.
    """
    n = len(loads)
    loads, rooms = list(loads), list(rooms)
    counts = [0] * n
    placed = 0
    while placed < count:
        idx, best, best_load, best_idx = start, -1, 0, 0
        for _ in range(n):
            if idx >= n:
                idx = 0
            i = idx
            idx += 1
            if rooms[i] > 0 and (best < 0 or loads[i] < best_load):
                best, best_load, best_idx = i, loads[i], idx
                if best_load <= 0:
                    break
        if best < 0:
            break
        counts[best] += 1
        if busy_cost:
            if not loads[best] & 1:
                loads[best] += 2 * busy_cost + 1
            loads[best] += 2
        else:
            loads[best] += 1
        rooms[best] -= 1
        start = best_idx
        placed += 1
    return counts, start, placed


fill = speedups.MODULE.fill if speedups.MODULE is not None else fill_py


class Link:
    """The dispatcher's view of one worker process: its channel, its load, and the fds it has not acked."""

    def __init__(self, slot: int, channel: socket.socket | None, board: memoryview | None = None) -> None:
        self.slot = slot
        self.channel = channel
        self.board = board if board is not None else private_board()  # the worker's acks and closes
        self.ready = False  # its worker is READY, not draining: kept by its record's phase (balancer/process.py)
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
        self.returned = 0  # idle keep-alive connections it gave back (balancer/parking.py), for metrics
        self.resumed = 0  # of those handed to it, connections that served elsewhere before, for metrics
        # What it is doing, from its board (STARTED, FINISHED and FIRSTS) at the last look:
        self.handed = 0  # connections handed over (less those refused or taken back)
        self.unbegun = 0  # of those, connections whose first request never began (closed first, or silent)
        self.pending = 0  # handed over and no request begun yet: handed - FIRSTS - unbegun
        self.handed_at = 0.0  # monotonic time of the last hand-off
        self.queue = 0  # requests in hand: running, or handed over and not begun; 0 is a free worker
        self.asked = False  # asked to say when it is free (holding.Holding.ask_busy)
        self.asked_at = 0  # ... or once FINISHED reaches this

    def note(self, started: int, finished: int, firsts: int) -> int:
        """Take in the board's STARTED, FINISHED and FIRSTS (FINISHED read first); the requests in hand."""
        running = started - finished
        pending = self.handed - firsts - self.unbegun
        self.pending = pending = self.settle(pending) if pending else 0
        self.queue = (running if running > 0 else 0) + pending
        return self.queue

    def settle(self, pending: int) -> int:
        """The connections handed over and not begun, of pending (handed - FIRSTS - unbegun) so counted.

        One waiting for its first request is open or unacked: past that, the rest never began (their client
        closed first, or the worker cut them at the header deadline), and stop counting. One that stays open and
        silent counts until PENDING_EXPIRY after the last hand-off (Dispatcher._look).
        """
        open_conns = self.open_conns + len(self.unacked)
        if pending > open_conns:
            self.unbegun += pending - open_conns
            return open_conns
        if pending < 0:  # taken back after it began (refused, then served): never below nothing
            self.unbegun += pending
            return 0
        return pending


class Dispatcher:
    """Chooses a free ready worker under its cap, else the least-loaded (round-robin among equals), or holds the
    connection until one is free (balancer/holding.py), and hands fds to it."""

    def __init__(self, cap: int, max_unacked: int = 256, on_blocked: Callable[[Link], None] | None = None,
                 hold: bool = True) -> None:
        self.cap = cap
        # A worker that stops acking (SIGSTOP, a hung loop) gets at most this many fds in limbo.
        self.max_unacked = max_unacked
        self.links: list[Link] = []  # every live worker's link, in slot order: a view of the supervisor's table
        self.homeless: deque[tuple[int, int]] = deque()  # accepted fds no worker could take yet
        # fd -> its PROXY client's address, for connections given back by a worker (family has wire.RESUMED)
        self.peers: dict[int, bytes] = {}
        self.redispatched = 0
        self._next = 0
        self._next_id = 0
        self._on_blocked = on_blocked or (lambda link: None)
        self._surveyed: tuple[list[int], list[int]] | None = None  # survey()'s snapshot, for one dispatch
        self.min_open_ready: int | None = None  # fewest open connections of a READY worker, at the last survey
        # New connections kept while every worker is busy (balancer/holding.py); None: never held
        self.holding = Holding(fill) if hold else None
        self.free = 0  # at the last look: workers with room and nothing in hand
        self.min_queue = 0  # ... and the fewest requests in hand of a worker with room

    def set_links(self, links: list[Link]) -> None:
        """Replace the view of live workers (the supervisor calls this whenever its table changes)."""
        self.links = links
        self._surveyed = None
        if self._next >= len(links):
            self._next = 0

    def pick(self) -> Link | None:
        """A free eligible link, else the least-loaded, ties going round-robin from the last one picked; None when
        all are full.

        Least-loaded, not plain round-robin: workers drift apart in speed (one shares its core with the load
        generator or a noisy neighbour), and a new connection given to the one with a queue waits while the
        other worker sits idle. A free one first: a worker with fewer connections may be in a long handler.
        """
        keys, rooms = self.snapshot()
        counts, self._next, placed = fill(keys, rooms, self._next, 1, BUSY_COST)
        return self.links[counts.index(1)] if placed else None

    def snapshot(self) -> tuple[list[int], list[int]]:
        """Each link's pick key (pick_key: its load, and whether it has requests in hand), and how many more
        connections it may take now (0 when it may take none)."""
        keys, rooms, _, _ = self._look(None)
        return keys, rooms

    def survey(self) -> int:
        """Collect every board (closing what was acked in one call) and snapshot the links; the room in all.

        The accept path's one pass over the workers per wake-up: dispatch() right after uses this snapshot,
        and min_open_ready says whether every ready worker is busy. With 64 workers, four passes per wake-up
        and a scan of every worker per connection cost the master more than the connection's syscalls.
        """
        closing: list[int] = []
        loads, rooms, total, self.min_open_ready = self._look(closing)
        if closing:
            handoff.close_fds(closing)
        self._surveyed = (loads, rooms)
        return total

    def _look(self, closing: list[int] | None) -> tuple[list[int], list[int], int, int | None]:
        """One pass over the links: pick keys, rooms, the room in all, the fewest open connections of a READY one.

        With closing given, each link's board is read first (what it acked is added to closing, and what it is
        doing: requests begun and finished).
        """
        cap, max_unacked, cost = self.cap, self.max_unacked, BUSY_COST
        collect = self.collect
        keys, rooms = [], []
        total = free = 0
        min_open = None
        min_queue = 1 << 62
        now = 0.0
        for link in self.links:
            if closing is not None:
                board = link.board
                if board[HANDLED] != link.seen_word:
                    collect(link, closing)
                else:  # no ack or refusal since the last look: only closes can have changed (as collect does)
                    open_conns = link.acked_total - board[CLOSED]
                    link.open_conns = open_conns if open_conns > 0 else 0
                # What it is doing, as note() takes it in (inline: this pass runs per wake-up, for every worker)
                finished = board[FINISHED]  # first: STARTED read after it is never behind it
                running = board[STARTED] - finished
                pending = link.handed - board[FIRSTS] - link.unbegun
                unacked = len(link.unacked)
                if pending:
                    now = now or time.monotonic()
                    if now - link.handed_at > PENDING_EXPIRY:  # open and silent: idle connections, not queued
                        link.unbegun += pending
                        pending = 0
                    elif pending < 0 or pending > link.open_conns + unacked:
                        pending = link.settle(pending)
                link.pending = pending
                link.queue = queue = (running if running > 0 else 0) + pending
            else:
                queue = link.queue
                unacked = len(link.unacked)
            load = link.open_conns + unacked
            # A free worker (nothing in hand) goes before a busy one unless it has BUSY_COST more connections: a
            # busy one may be in a long handler, and kept-alive connections must not collect on whichever worker
            # happens to be free when a burst of them reconnects (they bring requests later).
            keys.append(2 * (load + cost) + 1 if queue else 2 * load)
            if link.ready:
                if min_open is None or link.open_conns < min_open:
                    min_open = link.open_conns
                if not (link.send_blocked or link.ack_overdue or link.resting or link.channel_lost):
                    room = min(cap - load, max_unacked - unacked)
                    if room > 0:
                        rooms.append(room)
                        total += room
                        if queue < min_queue:
                            min_queue = queue
                        if not queue:
                            free += 1
                        continue
            rooms.append(0)
        self.free, self.min_queue = free, min_queue  # workers with room and nothing in hand; the fewest in hand
        return keys, rooms, total, min_open

    def any_ready(self) -> bool:
        """True when some worker is READY (full or not)."""
        return any(link.ready for link in self.links)

    def free_capacity(self) -> int:
        """How many more connections the ready workers can take right now."""
        return sum(self.snapshot()[1])

    def dispatch(self, items: list[tuple[int, int]], surveyed: bool = False) -> None:
        """Hand each (fd, family) to a worker; what no worker can take waits in homeless.

        A free worker (nothing running, nothing handed over not begun) first, one connection each; then the
        least-loaded. While none is free, the holding may keep new connections until one is
        (balancer/holding.py). The picks of the whole batch are counted at once (fill(), in C when built), and
        each worker's share goes as consecutive items: which accepted fd goes to which worker does not
        matter, and consecutive fds close later in one close_range(). surveyed=True uses the snapshot survey()
        just took.
        """
        holding = self.holding
        if not items and (holding is None or not holding.items):
            return
        if surveyed and self._surveyed is not None:
            keys, rooms = self._surveyed
        else:
            keys, rooms = self.snapshot()
        self._surveyed = None  # the loads change now: a snapshot is good for one dispatch
        if holding is not None and (holding.items or (self.free < len(items) and self.min_queue <= HOLD_DEPTH)):
            pinned, items = holding.admit(self.links, keys, rooms, self._next, items)
            if pinned:  # held and new connections for the free workers, one each
                self._hand([(self.links[i], [item]) for i, item in pinned])
                for i, _ in pinned:
                    keys[i] += 2 * BUSY_COST + 3  # busy, one connection more (as fill counts a pick)
                    rooms[i] -= 1
        if items:
            self._place(items, keys, rooms)
        if holding is not None and (holding.items or holding.asking) and holding.ask_busy(self.links, rooms):
            self.dispatch([])  # a worker went free just as it was asked: it will not say so

    def _place(self, items: list[tuple[int, int]], keys: list[int], rooms: list[int]) -> None:
        """Send items to the workers fill() picks, each worker's share as consecutive items."""
        counts, self._next, placed = fill(keys, rooms, self._next, len(items), BUSY_COST)
        shares = []
        start = 0
        for link, count in zip(self.links, counts):
            if count:
                shares.append((link, items[start:start + count]))
                start += count
        if placed < len(items):
            self.homeless.extend(items[placed:])
        self._hand(shares)

    def _hand(self, shares: list[tuple[Link, list[tuple[int, int]]]]) -> None:
        """Send each worker its share (as few messages as fit); what a full or gone channel refuses goes again."""
        messages = []
        conn_id = self._next_id
        per_msg = wire.MAX_FDS_PER_MSG
        now = time.monotonic()
        for link, share in shares:
            count = len(share)
            if conn_id + count <= 0xFFFFFFFF:
                ids = list(range(conn_id + 1, conn_id + count + 1))
            else:  # the 32-bit ids wrap around
                ids = [(conn_id + j) & 0xFFFFFFFF for j in range(1, count + 1)]
            conn_id = ids[-1]
            unacked = link.unacked
            if not unacked:
                link.ack_progress = now
            unacked.update(zip(ids, share))
            link.handed += count  # busy until the board shows their requests begun
            link.pending += count
            link.queue += count
            link.handed_at = now
            if count <= per_msg:
                messages.append((link, ids, [fd for fd, _ in share], [family for _, family in share]))
                continue
            for at in range(0, count, per_msg):
                part = share[at:at + per_msg]
                messages.append((link, ids[at:at + per_msg], [fd for fd, _ in part], [family for _, family in part]))
        self._next_id = conn_id
        reclaimed = None
        for link, ids, fds, families in messages:
            if (reclaimed is not None and link in reclaimed) or not self._send(link, ids, fds, families):
                # its later messages are not tried either: the channel is full or gone
                reclaimed = reclaimed or {}
                reclaimed.setdefault(link, []).extend(link.unacked.pop(i) for i in ids)
        if reclaimed:
            for link, share in reclaimed.items():
                link.handed -= len(share)
                link.pending = max(0, link.pending - len(share))
                link.queue = max(0, link.queue - len(share))
            taken_back = [item for share in reclaimed.values() for item in share]
            self.redispatched += len(taken_back)
            self.dispatch(taken_back)

    def release_held(self) -> None:
        """Place every held connection now, as least-connections would (accepting pauses or stops)."""
        if self.holding is not None and self.holding.items:
            items = self.holding.release_all()
            keys, rooms = self.snapshot()
            self._place(items, keys, rooms)
            self.holding.ask_busy(self.links, rooms)  # nothing held: the asks are taken back

    def _send(self, link: Link, ids: list[int], fds: list[int], families: list[int]) -> bool:
        """Send one handoff message; False when the channel is full or broken (the caller takes the fds back)."""
        resumed = 0
        try:
            if self.peers and any(family & wire.RESUMED for family in families):
                peers = [self.peers.get(fd, b"") for fd, family in zip(fds, families) if family & wire.RESUMED]
                resumed = len(peers)
                wire.send_fds(link.channel, wire.encode_handoff(ids, families, peers), fds)
            else:
                handoff.send_handoff(link.channel, ids, families, fds)
        except BlockingIOError:
            link.send_blocked = True
            self._on_blocked(link)
            return False
        except OSError as exc:
            if exc.errno in PEER_GONE_ERRNOS:
                link.channel_lost = True  # the supervisor reaps it; its fds must not wait for that
            else:
                link.resting = True  # ENOBUFS, ENOMEM: the kernel is short for a moment, the worker is fine
            return False
        link.dispatched += len(ids)
        link.resumed += resumed
        link.sent_msgs = seq = (link.sent_msgs + 1) & HANDLED_MASK
        link.sent.append((seq, ids))
        return True

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
        board = link.board
        word = board[HANDLED]
        if word != link.seen_word:
            handled, refused = unpack(word)
            if refused != link.refused_seen:
                # Its REFUSE message went out before this store but is not read yet: until it is, acked and
                # refused ids cannot be told apart. on_refuse() collects again once it has read it.
                return
            link.seen_word = word
            sent, unacked = link.sent, link.unacked
            done: list[int] = []
            while sent and handled_by(sent[0][0], handled):
                for conn_id in sent.popleft()[1]:
                    item = unacked.pop(conn_id, None)  # None: refused, already re-dispatched
                    if item is not None:
                        done.append(item[0])
            link.ack_progress = time.monotonic()
            if done:
                if self.peers:
                    for fd in done:
                        self.peers.pop(fd, None)
                if closing is None:
                    handoff.close_fds(done)  # the worker holds its own copies
                else:
                    closing += done
                link.acked_total += len(done)
                link.ack_overdue = False  # not after refusals alone: a refusing worker rests until the tick
        link.open_conns = max(0, link.acked_total - board[CLOSED])

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

    def on_idle(self, link: Link) -> None:
        """The worker answered an ask (IDLE): it is not asked any more; the caller places held connections."""
        link.asked = False

    def on_refuse(self, link: Link, ids: list[int]) -> None:
        """The worker did not take these: give them to another worker."""
        link.refused_seen = (link.refused_seen + 1) & REFUSED_MASK
        reclaimed = [item for item in (link.unacked.pop(i, None) for i in ids) if item is not None]
        link.handed -= len(reclaimed)
        link.pending = max(0, link.pending - len(reclaimed))
        link.queue = max(0, link.queue - len(reclaimed))
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
        link.pending = link.queue = 0
        link.asked = False
        if reclaimed:
            self.redispatched += len(reclaimed)
            self.dispatch(reclaimed)
        return len(reclaimed)

    def close_homeless(self) -> None:
        """At shutdown, close the fds no worker will ever take."""
        wire.close_all([fd for fd, _ in self.homeless])
        self.homeless.clear()
        self.peers.clear()
        if self.holding is not None:
            wire.close_all([fd for fd, _ in self.holding.release_all()])
