"""The ack board: counters a worker publishes in shared memory and the master reads, no syscall on either side.

The master keeps its copy of each handed-over fd until the worker acknowledges it, and it needs each worker's
open-connection count. Sent as messages, those reports cost nearly one wake-up and recvmsg in the master and
one send in the worker per connection: 13 us and 11 us of CPU per new connection, measured with
Connection: close. As counters in a shared page they cost one store and one load.

Word 0: handoff messages the worker has handled, in the order the master sent them (low 40 bits), and how
many of those it refused (high 24 bits). Both share one aligned 8-byte word, so a single store publishes them
together: the master never sees a handled count without the refusals in it. A refusal's ids still travel as a
REFUSE message, sent before that store.
Word 1: connections the worker has closed.
Both only grow (modulo their widths). A memoryview item store or load of format "Q" is one aligned 8-byte move.

Words 2 and up: the worker's request counts (count, duration sum, latency buckets, event counters, and a
table of (method, status) -> requests), written by the worker as each request finishes. The master reads them
for /metrics and, when the worker is gone, for the last time: a worker killed outright (kill -9, OOM) sends
no final heartbeat, but what it counted is here, in the master's own mapping of the page.

The last 16 words: what the worker is doing, for the dispatcher (balancer/holding.py). STARTED counts the
requests whose handler began, FINISHED those of them that ended (one store each per request), so
STARTED - FINISHED requests are running; STARTED_AT is when the latest began; FIRSTS counts the requests that
were the first on their connection (so the master can tell a connection it handed over that has not begun);
every WINDOW requests, how long they took, the CPU they cost, and how much of their time the worker was on a
CPU or waiting for one (SERVICE_NS, CPU_NS, RUNNABLE_PER_MILLE). While the master holds
connections because every worker is busy, it asks a worker to tell it when it goes idle: it bumps ASK (and may
set ASK_FINISHED, a FINISHED count to tell it at too), and the worker, ending a request with nothing left
running (or reaching that count), stores ASK into ANSWERED and sends an IDLE message on its channel (its number
in CHANNEL_FD). A message only when asked: the master sleeps instead of polling, and the worker pays no syscall
per request. The master's words sit on a cache line of their own.
"""

from __future__ import annotations

import mmap
import os

WORDS = 512  # one page
SIZE = 8 * WORDS
HANDLED = 0
CLOSED = 1
HANDLED_BITS = 40
HANDLED_MASK = (1 << HANDLED_BITS) - 1
REFUSED_MASK = (1 << 24) - 1

# The request counts. Upper bounds of the latency buckets in seconds, shared with the master's histogram.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Methods counted under their own name; any other counts as "other" (unbounded label values would let a
# client blow up the series count). Their order is the table's key encoding: never reorder, only append.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE", "other")
EVENTS = ("header_timeouts", "body_timeouts", "bad_requests", "proxy_protocol_errors", "tls_handshake_errors")
COUNT = 2  # requests finished
SUM_NS = 3  # their durations added up, in nanoseconds
BUCKET0 = 4  # len(BUCKETS) + 1 words (the last is +Inf): requests per latency bucket, not cumulative
EVENT0 = BUCKET0 + len(BUCKETS) + 1  # one word per EVENTS name
PAIRS_USED = EVENT0 + len(EVENTS)  # how many (key, requests) pairs follow; a pair is written before it counts
PAIR0 = PAIRS_USED + 1
DISPATCH0 = WORDS - 16  # the dispatch words, after the pair table
MAX_PAIRS = (DISPATCH0 - PAIR0) // 2 - 1  # then one more pair, the overflow: (method, status)s past the table
OVERFLOW_KEY = 1 << 41  # the overflow pair's key: its requests are counted, their labels are not kept
# Written by the worker (balancer/_speedups.c begin() and tally(), or their Python twins in workers/stats.py):
STARTED = DISPATCH0  # requests whose handler began
FINISHED = DISPATCH0 + 1  # of those, the ones that ended (answered, failed or cut off)
STARTED_AT = DISPATCH0 + 2  # CLOCK_MONOTONIC nanoseconds when the latest began
ANSWERED = DISPATCH0 + 3  # the last ASK it answered with an IDLE message
FIRSTS = DISPATCH0 + 5  # of the requests begun, those that were the first on their connection
# Every WINDOW requests the worker reads how long its thread was on a CPU and waiting for one (schedstat):
# over those requests, their mean duration, their mean CPU time, and the time on or waiting for a CPU per 1000
# of their durations (about 1000 for CPU-bound handlers, also on a shared CPU; little for ones awaiting I/O).
SERVICE_NS = DISPATCH0 + 4
RUNNABLE_PER_MILLE = DISPATCH0 + 6
CPU_NS = DISPATCH0 + 7
WINDOW = 32
# Written by the master:
ASK = DISPATCH0 + 8  # a new cache line: asked while ASK != ANSWERED
ASK_FINISHED = DISPATCH0 + 9  # while asked, also answer once FINISHED reaches this (0: only when idle)
# The worker's own, written once a window: where the current one began (ns waiting, ns on a CPU, COUNT, SUM_NS).
WINDOW_WAITING = DISPATCH0 + 10
WINDOW_CPU = DISPATCH0 + 12
WINDOW_COUNT = DISPATCH0 + 13
WINDOW_SUM = DISPATCH0 + 14
CHANNEL_FD = DISPATCH0 + 15  # its channel's fd number, where it says it is free when asked (attach()); 0: none

def create(name: str = "balancer-board") -> tuple[int, memoryview]:
    """A new board: (memfd for the worker to inherit, the master's mapping of it)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, SIZE)
        return fd, _map(fd)
    except BaseException:
        os.close(fd)
        raise


def attach(fd: int, channel_fd: int | None = None) -> memoryview:
    """A mapping of the board behind fd (valid after fd is closed); a worker notes its channel's fd number.

    A master that re-executes itself (balancer/upgrade.py) maps its workers' boards again, and leaves it be.
    """
    board = _map(fd)
    if channel_fd is not None:
        board[CHANNEL_FD] = channel_fd
    return board


def _map(fd: int) -> memoryview:
    """Map the board behind fd; the mapping stays valid after fd is closed."""
    return memoryview(mmap.mmap(fd, SIZE)).cast("Q")


def private() -> memoryview:
    """A board no other process can see (a route without a worker process, in tests)."""
    return memoryview(mmap.mmap(-1, SIZE)).cast("Q")


def pack(handled: int, refused: int) -> int:
    """Word 0 from the two counts."""
    return (handled & HANDLED_MASK) | ((refused & REFUSED_MASK) << HANDLED_BITS)


def unpack(word: int) -> tuple[int, int]:
    """(handled, refused) from word 0."""
    return word & HANDLED_MASK, word >> HANDLED_BITS


def handled_by(seq: int, handled: int) -> bool:
    """True when message number seq (1-based, masked) is within the first `handled` messages."""
    return ((handled - seq) & HANDLED_MASK) < (1 << (HANDLED_BITS - 1))


def pair_key(method: int, status: int) -> int:
    """The table key of (index in METHODS, HTTP status); never 0, so an unwritten pair reads as empty."""
    return (method << 16) | (status & 0xFFFF) | (1 << 40)


def read_counts(board: memoryview) -> dict:
    """The request counts on a board, in the shape of a heartbeat's: requests, buckets, sum, count, events.

    Read while the worker may be writing: each word is whole, a pair is complete before it is counted, and the
    figures may disagree by the requests finished during the read, as two scrapes a moment apart would.
    """
    used = min(board[PAIRS_USED], MAX_PAIRS + 1)
    requests = []
    for at in range(PAIR0, PAIR0 + 2 * used, 2):
        key, n = board[at], board[at + 1]
        if not n:
            continue
        if key == OVERFLOW_KEY:
            requests.append(["other", "other", n])
            continue
        method = (key >> 16) & 0xFFFFFF
        requests.append([METHODS[method] if method < len(METHODS) else "other", key & 0xFFFF, n])
    out = {"requests": requests, "buckets": list(board[BUCKET0:BUCKET0 + len(BUCKETS) + 1]),
           "sum": board[SUM_NS] / 1e9, "count": board[COUNT]}
    for i, name in enumerate(EVENTS):
        out[name] = board[EVENT0 + i]
    return out
