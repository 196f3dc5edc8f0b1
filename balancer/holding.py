"""Holding new connections while every worker is busy: the master as a central queue, bounded.

Least-connections pushes a new connection to the worker with the fewest, and that one may be in the middle of a
long handler: with one connection each, the tie goes round robin, and a short request waits behind a long one
while the other worker finishes and idles. A central queue (gunicorn's shared accept queue comes close) gives
each connection to the first worker that is free. The master can be that queue: its board shows what each
worker is doing (balancer/board.py: requests begun and finished), picks prefer a worker with nothing running
(dispatch.pick_key: requests in hand weigh BUSY_COST connections), and when none is free it may keep the
connection until one is, woken by that worker's IDLE message, which it sends only when asked (no syscall per
request otherwise).

A connection is held only where holding pays:
- no worker with room is free: nothing running, nothing handed over that has not begun;
- the worker least-connections would pick has at most HOLD_DEPTH requests in hand: a deeper queue means the
  workers are saturated with short requests (hello with Connection: close), where each hand-off per wake-up
  would cost throughput and gain nothing;
- its recent requests cost it HOLD_MIN_SERVICE or more of CPU each (the board's CPU_NS, over the worker's
  last window of board.WINDOW requests; CPU time, as a preempted request takes longer without keeping the
  worker longer): shorter ones end before a hold could help;
- its handlers spend their time on a CPU, not awaiting: over the same window the worker's thread was on a CPU
  or waiting for one (preempted) for at least HOLD_MIN_RUNNABLE of their duration (RUNNABLE_PER_MILLE). A
  worker whose handlers await I/O can start another request at once, and its requests end in no order, so
  holding would only delay the connection.
Past HOLD_PER_WORKER held connections per worker the oldest go out as least-connections places them: a
longer central queue means connections arrive faster than the workers finish them, and then each one handed
over only as a worker goes free leaves that worker idle for the round trip (its IDLE message, the master's
wake-up, the hand-off), which costs throughput when it counts most; least-connections keeps a queue at each
worker instead, and the deeper queues turn holding off until they drain (HOLD_DEPTH).

And never longer than it would have waited at that worker: each held connection notes the worker and the
FINISHED count at which its turn would have come there (the requests that worker had in hand, and those held
before it that would have queued there too). Among workers with as many connections, that worker is the one
whose running request began last (one that has run longer than the worker's mean is likely a long one). A
held connection leaves when a worker goes free (the one held for that worker, else the oldest), when that
count is reached (then to the least-loaded worker, as least-connections would have placed it then), when its
worker is gone, or after HOLD_CAP, a bound of last resort: the board and the IDLE messages end holds long before.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, NamedTuple

from balancer import board, speedups

if TYPE_CHECKING:
    from balancer.dispatch import Link

log = logging.getLogger("balancer")

BUSY_COST = 2  # connections a worker's requests in hand weigh in the picks (dispatch.pick_key)
HOLD_DEPTH = 1  # hold only while the worker least-connections would pick has at most this many requests in hand
HOLD_MIN_SERVICE = 0.00025  # seconds: ... and its recent requests cost at least this much CPU on average
# ... on a CPU or waiting for one for at least this share of that time: CPU-bound handlers all of it, handlers that
# await I/O a few percent (up to 10% measured on a 2-core machine with a load average of 10: the wake-ups wait).
HOLD_MIN_RUNNABLE = 0.3
HOLD_CAP = 2.0  # seconds: no connection is held longer, whatever the board says (a bound of last resort)
HOLD_PER_WORKER = 2  # connections held at once at most, per worker; past that the oldest are dispatched as before
PENDING_EXPIRY = 1.0  # seconds after a hand-off with no request begun: the connection is idle, not queued


class Held(NamedTuple):
    """An accepted connection the master keeps until a worker is free, and how long it may."""

    fd: int
    family: int
    deadline: float  # monotonic: HOLD_CAP after it was held
    link: "Link"  # the worker least-connections would have given it to
    target: int  # that worker's FINISHED count at which its turn would have come there


def worth_holding_for(words: memoryview) -> bool:
    """True when the worker's recent requests each kept it long enough (CPU time), and spent enough of their
    time on a CPU or waiting for one, to hold for."""
    return words[board.CPU_NS] >= HOLD_MIN_SERVICE * 1e9 and words[board.RUNNABLE_PER_MILLE] >= HOLD_MIN_RUNNABLE * 1000


def ask_py(words: memoryview, finished_at: int) -> tuple[int, int]:
    """_speedups.ask in Python: ask for a wake-up, then read (started, finished) (without C's memory fence)."""
    words[board.ASK_FINISHED] = finished_at
    if words[board.ASK] == words[board.ANSWERED]:
        words[board.ASK] = words[board.ANSWERED] + 1
    return words[board.STARTED], words[board.FINISHED]


ask = speedups.MODULE.ask if speedups.MODULE is not None else ask_py


def long_running(link: "Link", now: float) -> bool:
    """True when the worker's running request has run longer than its recent mean: probably a long one."""
    words = link.board
    service = words[board.SERVICE_NS]
    return link.queue > 0 and service > 0 and now * 1e9 - words[board.STARTED_AT] > service


def least(links: list["Link"], keys: list[int], rooms: list[int], start: int, now: float) -> "Link | None":
    """The worker least-connections picks (round robin among equals from start), preferring among equals one
    whose running request has not run past its mean; None when none has room."""
    best, best_rank = None, None
    n = len(links)
    for k in range(n):
        i = (start + k) % n
        if rooms[i] > 0:
            rank = (keys[i], long_running(links[i], now))
            if best_rank is None or rank < best_rank:
                best, best_rank = links[i], rank
    return best


class Holding:
    """The held connections, oldest first, and the asks that wake the master when a worker is free."""

    def __init__(self, fill: Callable) -> None:
        self.items: deque[Held] = deque()
        self._fill = fill
        self.asking = False  # some worker may be asked still
        self.held = 0  # connections held since start
        self.expired = 0  # of those, released by HOLD_CAP rather than by a free worker or their turn

    def admit(self, links: list["Link"], keys: list[int], rooms: list[int], start: int,
              items: list[tuple[int, int]]) -> tuple[list[tuple[int, tuple[int, int]]], list[tuple[int, int]]]:
        """(pinned, out): connections for the free workers, one each, as (link index, item); then the ones to
        place as least-connections would (held ones whose time came, new ones not worth holding).

        A free worker gets the oldest connection held for it (where least-connections would have put it), else
        the oldest held, else a new one. keys and rooms are the pick's (dispatch.pick_key: odd when busy).
        """
        now = time.monotonic()
        held = self.items
        free = [i for i, (key, room) in enumerate(zip(keys, rooms)) if room > 0 and not key & 1]
        pinned: list[tuple[int, tuple[int, int]]] = []
        fresh = iter(items)
        taken = 0
        for i in free:
            if held:
                link = links[i]
                item = next((h for h in held if h.link is link), held[0])
                held.remove(item)
                pinned.append((i, (item.fd, item.family)))
            elif taken < len(items):
                pinned.append((i, next(fresh)))
                taken += 1
            else:
                break
        out: list[tuple[int, int]] = []
        if held:
            due = [item for item in held if item.deadline <= now or item.link not in links
                   or item.link.board[board.FINISHED] >= item.target]
            for item in due:
                held.remove(item)
                if item.deadline <= now:
                    self.expired += 1
                    log.debug("a connection held for %gs (the most) goes to the least-loaded worker", HOLD_CAP)
                out.append((item.fd, item.family))
        rest = items[taken:]
        if rest:
            # Where least-connections would put the rest, once the pinned ones and those due are placed.
            keys, rooms = list(keys), list(rooms)
            added = [0] * len(links)  # connections going to each worker now
            for i, _ in pinned:
                keys[i] += 2 * BUSY_COST + 3
                rooms[i] -= 1
                added[i] += 1
            counts, start, _ = self._fill(keys, rooms, start, len(out), BUSY_COST)
            for i, n in enumerate(counts):
                if n:
                    keys[i] += 2 * n + (0 if keys[i] & 1 else 2 * BUSY_COST + 1)
                    rooms[i] -= n
                    added[i] += n
            link = least(links, keys, rooms, start, now)
            if link is not None and link.queue + added[links.index(link)] <= HOLD_DEPTH \
                    and worth_holding_for(link.board):
                self._hold(links, keys, rooms, start, rest, now, added)
                while len(held) > HOLD_PER_WORKER * len(links):  # overflow from the front: the oldest go as before
                    item = held.popleft()
                    out.append((item.fd, item.family))
            else:  # holding does not pay (any more): what was held goes first, as least-connections places it
                out += self.release_all() + rest
        return pinned, out

    def _hold(self, links, keys, rooms, start, rest, now, added) -> None:
        """Keep rest, each noting where least-connections would have put it and when its turn would have come."""
        ahead: dict = {}  # link -> connections that would have queued there before the next: sent now, or held
        for i, link in enumerate(links):
            if added[i]:
                ahead[link] = added[i]
        for item in self.items:
            ahead[item.link] = ahead.get(item.link, 0) + 1
        keys, rooms = list(keys), list(rooms)
        for item in self.items:
            if item.link in links:
                keys[links.index(item.link)] += 2
        deadline = now + HOLD_CAP
        for fd, family in rest:
            link = least(links, keys, rooms, start, now)
            if link is None:  # no room anywhere: it waits all the same, for its cap
                link = links[0]
            i = links.index(link)
            keys[i] += 2
            rooms[i] -= 1
            queued = link.queue + ahead.get(link, 0)
            ahead[link] = ahead.get(link, 0) + 1
            self.items.append(Held(fd, family, deadline, link, link.board[board.FINISHED] + queued))
        self.held += len(rest)

    def ask_busy(self, links: list["Link"], rooms: list[int]) -> bool:
        """While connections are held, ask every busy worker with room to say when it is free; else take asks back.

        Returns True when a worker turned out to be free already (it went idle just before the ask, so it will
        not say so) or past a held connection's turn: the caller places held connections again.
        """
        if not self.items:
            for link in links:
                if link.asked:
                    cancel(link)
            self.asking = False
            return False
        targets: dict = {}
        for item in self.items:
            targets[item.link] = min(targets.get(item.link, item.target), item.target)
        freed = False
        for link, room in zip(links, rooms):
            if room <= 0 or not link.board[board.CHANNEL_FD]:  # not a worker that can say it is idle
                continue
            target = targets.get(link, 0)
            if link.asked and link.asked_at == target:
                continue
            started, finished = ask(link.board, target)
            link.asked, link.asked_at = True, target
            self.asking = True
            if not link.note(started, finished, link.board[board.FIRSTS]) or (target and finished >= target):
                freed = True
        return freed


    def release_all(self) -> list[tuple[int, int]]:
        """Every held connection, oldest first (accepting pauses or stops: they go as least-connections says)."""
        out = [(item.fd, item.family) for item in self.items]
        self.items.clear()
        return out


def cancel(link: "Link") -> None:
    """Take back an ask: the worker sends no IDLE for it (one already on its way is a spurious wake-up)."""
    words = link.board
    words[board.ASK_FINISHED] = 0
    words[board.ASK] = words[board.ANSWERED]
    link.asked = False
