"""Request counters, latency histogram and in-flight gauge kept by a worker: on its board, and in heartbeats."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from bisect import bisect_left
from time import perf_counter

from balancer import board, speedups, wire
from balancer.board import BUCKETS, METHODS

log = logging.getLogger("balancer.worker")


def tally_py(words: memoryview, pair: int, bucket: int, seconds: float, running: int = -1) -> None:
    """Count one finished request on a board: its (method, status) word, its bucket, the sum and the count.

    running >= 0: the requests still running; FINISHED follows, and an ask the master made is answered.
    """
    words[pair] += 1
    words[bucket] += 1
    if seconds > 0:
        words[board.SUM_NS] += int(seconds * 1e9)
    words[board.COUNT] += 1
    if running >= 0:
        if not words[board.COUNT] % board.WINDOW or not words[board.WINDOW_CPU]:
            close_window_py(words)
        words[board.FINISHED] = words[board.STARTED] - running
        answer_py(words, running)


_schedstat: list[int] = []  # this thread's /proc/thread-self/schedstat, opened at the first window (or -1)


def runnable_ns() -> tuple[int, int]:
    """Nanoseconds this thread has been on a CPU, and waiting for one (schedstat); the CPU time alone without it."""
    if not _schedstat:
        try:
            _schedstat.append(os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            _schedstat.append(-1)
    if _schedstat[0] >= 0:
        try:
            on_cpu, waiting = os.pread(_schedstat[0], 96, 0).split()[:2]
            return int(on_cpu), int(waiting)
        except (OSError, ValueError):
            pass
    return time.thread_time_ns(), 0


def close_window_py(words: memoryview) -> None:
    """Every board.WINDOW requests: their mean duration and CPU time, and the time runnable per 1000 of it."""
    on_cpu, waiting = runnable_ns()
    count, total = words[board.COUNT], words[board.SUM_NS]
    n, duration = count - words[board.WINDOW_COUNT], total - words[board.WINDOW_SUM]
    if words[board.WINDOW_CPU] and n and duration:
        cpu = on_cpu - words[board.WINDOW_CPU]
        words[board.SERVICE_NS] = duration // n
        words[board.CPU_NS] = cpu // n
        words[board.RUNNABLE_PER_MILLE] = (cpu + waiting - words[board.WINDOW_WAITING]) * 1000 // duration
    words[board.WINDOW_CPU], words[board.WINDOW_WAITING] = on_cpu, waiting
    words[board.WINDOW_COUNT], words[board.WINDOW_SUM] = count, total


def answer_py(words: memoryview, running: int) -> None:
    """Tell the master (IDLE) if it asked and nothing runs (or FINISHED reached its count); as _speedups.c does.

    Without C's memory fence a worker going idle just as the master asks may be missed; the master's hold
    bounds then end the wait.
    """
    asked = words[board.ASK]
    if asked == words[board.ANSWERED]:
        return
    at = words[board.ASK_FINISHED]
    if running and not (at and words[board.FINISHED] >= at):
        return
    words[board.ANSWERED] = asked
    channel = words[board.CHANNEL_FD]
    if channel:
        try:
            os.write(channel, IDLE)
        except OSError:  # full: lost, and the master's hold bounds end its wait; gone: nobody to tell
            pass


def begin_py(words: memoryview, first=None) -> float:
    """A request's handler begins: count it on the board (a first one on its connection too: first is not None)
    and return perf_counter()."""
    now = perf_counter()
    words[board.STARTED] += 1
    words[board.STARTED_AT] = int(now * 1e9)
    if first is not None:
        words[board.FIRSTS] += 1
    return now


# C when built
tally = speedups.MODULE.tally if speedups.MODULE is not None else tally_py
begin = speedups.MODULE.begin if speedups.MODULE is not None else begin_py

IDLE = bytes((wire.IDLE,))
FIRST_BUCKET = BUCKETS[0]
BUCKET0 = board.BUCKET0


def later_bucket(seconds: float) -> int:
    """The board word of the latency bucket for seconds past the first bucket's bound."""
    return BUCKET0 + bisect_left(BUCKETS, seconds)

# A heartbeat is one datagram, and it must stay far below the channel's send buffer (~208 KiB by default):
# a datagram past the buffer fails outright (EMSGSIZE), and a big one holds the room acks and refusals need.
# The worker's own figures always go; the backend's metrics get what is left of this.
HEARTBEAT_BYTES = 32 * 1024
BEAT_EXTRAS = 128  # bytes kept for the fields the heartbeat adds to a snapshot ("open", "final", "recycle")
_COMPACT = (",", ":")  # as wire.encode_json writes it


def _event(name: str) -> property:
    """An event counter kept in its board word (rare events: a property is cheap enough)."""
    at = board.EVENT0 + board.EVENTS.index(name)

    def get(self) -> int:
        return self.words[at]

    def set(self, value: int) -> None:
        self.words[at] = value

    return property(get, set, doc=f"{name}, in board word {at}")


class RequestStats:
    """Cumulative figures since the worker started, kept on its board (balancer/board.py) as they change.

    The master reads the board for /metrics and once more when the worker is gone, so a worker killed
    outright still has every request it finished counted; heartbeats carry the same figures as a snapshot.
    """

    header_timeouts = _event("header_timeouts")
    body_timeouts = _event("body_timeouts")  # requests answered 408: their body came slower than --body-min-rate
    bad_requests = _event("bad_requests")  # malformed requests answered 400 by aiohttp's parser
    proxy_protocol_errors = _event("proxy_protocol_errors")  # connections closed for a bad or missing PROXY header
    tls_handshake_errors = _event("tls_handshake_errors")  # handshakes refused (deadline cuts are header timeouts)

    def __init__(self, words: memoryview | None = None) -> None:
        # A request is added with begin(self.words) as its start, which counts it on the board (STARTED).
        self.words = words if words is not None else board.private()  # private: a worker without a master
        # method -> status -> the board word counting it; a method outside METHODS counts under "other".
        # Per method, so no key tuple per request.
        self.pairs: dict[str, dict[int, int]] = {m: {} for m in METHODS}
        self.other = self.pairs["other"]
        self.pairs_used = 0
        # protocol -> (start, method) of each request whose handler runs (workers/observe.py): the in-flight count.
        self.started: dict = {}
        self._default_names: frozenset[str] | None = None
        self._warned_cap = False
        self._warned_collect = False

    @property
    def count(self) -> int:
        """Requests finished."""
        return self.words[board.COUNT]

    def observe(self, method: str, status: int, seconds: float) -> None:
        """Record one finished request (workers/observe.py's log_access() does the same inline)."""
        statuses = self.pairs.get(method, self.other)
        at = statuses.get(status)
        if at is None:
            at = self.add_pair(method, status, statuses)
        # Most requests finish within the first bucket: one comparison instead of a search. A finish (or a cut-
        # off) comes after its request left self.started: what is left there still runs.
        tally(self.words, at, BUCKET0 if seconds <= FIRST_BUCKET else later_bucket(seconds), seconds,
              len(self.started))

    def add_pair(self, method: str, status: int, statuses: dict[int, int]) -> int:
        """The board word that will count (method, status): a new pair, or the overflow once the table is full."""
        method = method if method in self.pairs else "other"
        words = self.words
        if self.pairs_used < board.MAX_PAIRS:
            at = board.PAIR0 + 2 * self.pairs_used
            words[at] = board.pair_key(METHODS.index(method), status)
            self.pairs_used += 1
            words[board.PAIRS_USED] = self.pairs_used  # after the key: the master never reads a half pair
        else:
            at = board.PAIR0 + 2 * board.MAX_PAIRS
            if words[board.PAIRS_USED] <= board.MAX_PAIRS:
                words[at] = board.OVERFLOW_KEY
                words[board.PAIRS_USED] = board.MAX_PAIRS + 1
                log.warning("more than %d (method, status) pairs: the next ones are counted without their labels",
                            board.MAX_PAIRS)
        statuses[status] = at + 1
        return at + 1

    def snapshot(self, max_bytes: int = HEARTBEAT_BYTES) -> dict:
        """A JSON-able copy of the figures, with as many of the backend's prometheus_client metrics as fit."""
        body = board.read_counts(self.words)
        body["inflight"] = len(self.started)
        # A backend that never imported prometheus_client registered nothing: don't pay for the import.
        if "prometheus_client" in sys.modules:
            room = max_bytes - BEAT_EXTRAS - len(json.dumps(body, separators=_COMPACT))
            try:
                metrics = self.user_metrics(room)
            except Exception:  # a broken custom collector must not stop the heartbeat that carries it
                metrics = []
                if not self._warned_collect:
                    self._warned_collect = True
                    log.exception("collecting the backend's prometheus_client metrics failed")
            if metrics:
                body["metrics"] = metrics
        return body

    def user_metrics(self, room: int = HEARTBEAT_BYTES) -> list:
        """The default REGISTRY's families as [name, type, help, [[suffix, labels, value], ...]].

        The process/platform/gc collectors are left out: the master reads those figures from /proc itself.
        Suffixes (_total, _bucket, ...) are relative to the family name to keep the heartbeat small;
        _created samples are dropped because the master's per-slot totals outlive any one worker.
        """
        from prometheus_client import REGISTRY

        skip = self._defaults()
        out = []
        for family in REGISTRY.collect():
            name = family.name
            if name not in skip:
                cut = len(name)
                samples = [[s.name[cut:], s.labels, s.value] for s in family.samples if not s.name.endswith("_created")]
                out.append([name, family.type, family.documentation, samples])
        # Measuring with C json is cheaper than estimating sample by sample in Python; trimming is the rare case.
        if len(json.dumps(out, separators=_COMPACT)) + len(',"metrics":') > room:
            out = self._trim(out, room)
        return out

    def _trim(self, families: list, room: int) -> list:
        """The leading families that fit in room bytes of JSON; warn once."""
        total = room
        room -= len(',"metrics":[]')
        kept = []
        for family in families:
            room -= len(json.dumps(family, separators=_COMPACT)) + 1
            if room < 0:
                break
            kept.append(family)
        if not self._warned_cap:
            self._warned_cap = True
            log.warning("prometheus_client metrics past %d KiB; the master sees only the first %d of %d families",
                        max(total, 0) // 1024, len(kept), len(families))
        return kept

    def _defaults(self) -> frozenset[str]:
        """Family names of prometheus_client's default collectors, found once."""
        if self._default_names is None:
            import prometheus_client

            defaults = (prometheus_client.PROCESS_COLLECTOR, prometheus_client.PLATFORM_COLLECTOR,
                        prometheus_client.GC_COLLECTOR)
            self._default_names = frozenset(f.name for c in defaults for f in c.collect())
        return self._default_names
