"""Least-loaded pick (round-robin among equals), fds held until acknowledged, re-dispatch of refused ones."""

from __future__ import annotations

import enum
import socket
import time
from collections import deque
from typing import Callable

from balancer import board, handoff, wire


class State(enum.Enum):
    """Where a worker is in its life, as the dispatcher sees it."""

    BOOTING = "booting"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


class Route:
    """The dispatcher's view of one worker: its channel, its load, and the fds it has not acked."""

    def __init__(self, slot: int, channel: socket.socket | None, ack_board: memoryview | None = None) -> None:
        self.slot = slot
        self.channel = channel
        self.board = ack_board if ack_board is not None else board.private()  # the worker's acks and closes
        self.state = State.BOOTING
        self.open_conns = 0  # acked and not yet reported closed
        self.unacked: dict[int, tuple[int, int]] = {}  # conn id -> (master's fd copy, family)
        self.sent: deque[tuple[int, list[int]]] = deque()  # (message number, its conn ids), not yet handled
        self.sent_msgs = 0  # handoff messages sent, masked like the board's handled count
        self.seen_word = 0  # board word 0 as last collected
        self.refused_seen = 0  # REFUSE messages processed, masked like the board's refused count
        self.taken = 0  # connections acked since the worker started
        self.send_blocked = False  # channel full: the worker is not reading (stalled or stopped)
        self.stalled = False  # fds have waited too long for an ack: its loop is blocked or stopped
        self.ack_progress = 0.0  # monotonic time of the last ack, or of the first fd sent since
        self.dispatched = 0  # connections handed to this worker, for metrics

    @property
    def load(self) -> int:
        """Connections this worker holds or is about to."""
        return self.open_conns + len(self.unacked)


class Dispatcher:
    """Chooses the least-loaded ready worker under its cap, round-robin among equals, and hands fds to it."""

    def __init__(self, cap: int, max_unacked: int = 256, on_blocked: Callable[[Route], None] | None = None) -> None:
        self.cap = cap
        # A worker that stops acking (SIGSTOP, a hung loop) gets at most this many fds in limbo.
        self.max_unacked = max_unacked
        self.routes: list[Route | None] = []  # index = slot; the worker currently serving that slot
        self.homeless: deque[tuple[int, int]] = deque()  # accepted fds no worker could take yet
        self.redispatched = 0
        self._next = 0
        self._next_id = 0
        self._on_blocked = on_blocked or (lambda route: None)

    def set_route(self, slot: int, route: Route | None) -> None:
        """Make route the one serving slot (None: the slot is empty)."""
        while len(self.routes) <= slot:
            self.routes.append(None)
        self.routes[slot] = route

    def truncate(self, size: int) -> None:
        """Forget slots at or beyond size (after scaling down)."""
        del self.routes[size:]
        if self._next >= max(size, 1):
            self._next = 0

    def eligible(self, route: Route | None) -> bool:
        """True when route may be given one more connection now."""
        return (
            route is not None
            and route.state is State.READY
            and not route.send_blocked
            and not route.stalled
            and route.load < self.cap
            and len(route.unacked) < self.max_unacked
        )

    def pick(self) -> Route | None:
        """The least-loaded eligible route, ties going round-robin from the last one picked; None when all are full.

        Least-loaded, not plain round-robin: workers drift apart in speed (one shares its core with the load
        generator or a noisy neighbour), and a new connection given to the one with a queue waits while the
        other worker sits idle.
        """
        # eligible() inlined: this runs once per connection.
        routes = self.routes
        n = len(routes)
        idx = self._next
        cap, max_unacked, ready = self.cap, self.max_unacked, State.READY
        best = None
        best_load = cap
        best_idx = 0
        for _ in range(n):
            if idx >= n:
                idx = 0
            route = routes[idx]
            idx += 1
            if (route is not None and route.state is ready and not route.send_blocked and not route.stalled
                    and len(route.unacked) < max_unacked):
                load = route.open_conns + len(route.unacked)
                if load < best_load:
                    best, best_load, best_idx = route, load, idx
                    if load == 0:
                        break
        if best is not None:
            self._next = best_idx
        return best

    def any_ready(self) -> bool:
        """True when some worker is READY (full or not)."""
        return any(r is not None and r.state is State.READY for r in self.routes)

    def all_busy(self, busy: int) -> bool:
        """True when every ready worker has at least `busy` connections open."""
        found = False
        for r in self.routes:
            if r is not None and r.state is State.READY:
                if r.open_conns < busy:
                    return False
                found = True
        return found

    def free_capacity(self) -> int:
        """How many more connections the ready workers can take right now."""
        room = 0
        for r in self.routes:
            if self.eligible(r):
                room += min(self.cap - r.open_conns - len(r.unacked), self.max_unacked - len(r.unacked))
        return room

    def dispatch(self, items: list[tuple[int, int]]) -> None:
        """Hand each (fd, family) to a worker; what no worker can take waits in homeless."""
        batches: dict[Route, tuple[list[int], list[int], list[int]]] = {}
        pick = self.pick
        conn_id = self._next_id
        for item in items:
            route = pick()
            if route is None:
                self.homeless.append(item)
                continue
            conn_id = (conn_id + 1) & 0xFFFFFFFF
            unacked = route.unacked
            if not unacked:
                route.ack_progress = time.monotonic()
            unacked[conn_id] = item
            batch = batches.get(route)
            if batch is None:
                batch = batches[route] = ([], [], [])
            batch[0].append(conn_id)
            batch[1].append(item[0])
            batch[2].append(item[1])
            if len(batch[0]) >= wire.MAX_FDS_PER_MSG:
                self._next_id = conn_id
                self._send(route, *batches.pop(route))
                conn_id = self._next_id
        self._next_id = conn_id
        for route, batch in batches.items():
            self._send(route, *batch)

    def _send(self, route: Route, ids: list[int], fds: list[int], families: list[int]) -> None:
        """Send one handoff message; on a full or broken channel take the fds back and re-route them."""
        try:
            handoff.send_handoff(route.channel, ids, families, fds)
            route.dispatched += len(ids)
            route.sent_msgs = seq = (route.sent_msgs + 1) & board.HANDLED_MASK
            route.sent.append((seq, ids))
            return
        except BlockingIOError:
            route.send_blocked = True
            self._on_blocked(route)
        except OSError:
            route.state = State.DEAD  # the supervisor reaps it; its fds must not wait for that
        taken = [route.unacked.pop(i) for i in ids]
        self.redispatched += len(taken)
        self.dispatch(taken)

    def mark_stalled(self, now: float, after: float) -> None:
        """Stop choosing workers whose oldest unacked fd has waited more than `after` seconds.

        A worker whose loop is blocked still looks READY until its heartbeat times out; without this,
        round robin would keep parking new connections on it for the whole --timeout.
        """
        for route in self.routes:
            if route is not None:
                if route.unacked:
                    if now - route.ack_progress > after:
                        route.stalled = True
                elif route.stalled:
                    route.stalled = False  # rested after a refusal; nothing of ours is waiting on it

    def retry_homeless(self) -> None:
        """Give waiting fds to workers that have room again."""
        if self.homeless:
            items = list(self.homeless)
            self.homeless.clear()
            self.dispatch(items)

    def collect(self, route: Route) -> None:
        """Read the worker's ack board: close the master's copies of what it took, update its open count."""
        words = route.board
        word = words[board.HANDLED]
        if word != route.seen_word:
            handled, refused = board.unpack(word)
            if refused != route.refused_seen:
                # Its REFUSE message went out before this store but is not read yet: until it is, taken and
                # refused ids cannot be told apart. on_refuse() collects again once it has read it.
                return
            route.seen_word = word
            sent, unacked, handled_by = route.sent, route.unacked, board.handled_by
            done: list[int] = []
            while sent and handled_by(sent[0][0], handled):
                for conn_id in sent.popleft()[1]:
                    item = unacked.pop(conn_id, None)  # None: refused, already re-dispatched
                    if item is not None:
                        done.append(item[0])
            taken = len(done)
            route.ack_progress = time.monotonic()
            if taken:
                handoff.close_fds(done)  # the worker holds its own copies
                route.taken += taken
                route.stalled = False  # not after refusals alone: a refusing worker rests until the tick
        route.open_conns = max(0, route.taken - words[board.CLOSED])

    def collect_all(self) -> None:
        """Collect every worker's board."""
        for route in self.routes:
            if route is not None:
                self.collect(route)

    def on_refuse(self, route: Route, ids: list[int]) -> None:
        """The worker did not take these: give them to another worker."""
        route.refused_seen = (route.refused_seen + 1) & board.REFUSED_MASK
        taken = [item for item in (route.unacked.pop(i, None) for i in ids) if item is not None]
        # A READY worker refuses when the fds did not fit (MSG_CTRUNC: it is out of fds). Rest it until the
        # next tick, or fds would bounce between workers that are all full, as fast as the loop turns.
        route.stalled = True
        self.redispatched += len(taken)
        self.dispatch(taken)
        self.collect(route)  # acks that waited for this refusal to be read

    def evict(self, route: Route) -> int:
        """The worker is gone or going: the fds it never took go to other workers; returns how many."""
        self.collect(route)  # what it took is its own: those clients go with it, never to a second worker
        taken = list(route.unacked.values())
        route.unacked.clear()
        route.sent.clear()
        route.open_conns = 0
        if taken:
            self.redispatched += len(taken)
            self.dispatch(taken)
        return len(taken)

    def close_homeless(self) -> None:
        """At shutdown, close the fds no worker will ever take."""
        wire.close_all([fd for fd, _ in self.homeless])
        self.homeless.clear()
