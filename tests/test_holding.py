"""Dispatch that knows what a worker is doing: the board's busy words, the ask/answer protocol, the hold policy.

Pure logic on real boards (shared memory) and real socketpairs: the workers are played by writing their board
words as a worker's begin() and tally() do (tally() sends the IDLE answer on the worker's end itself).
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from balancer import board, holding, wire
from balancer.dispatch import Dispatcher, Link
from balancer_workers import stats

try:
    from balancer import _speedups
except ImportError:
    _speedups = None

pytestmark = pytest.mark.timeout(30)
IMPLS = ["python", "c"]


def impl(name: str):
    """(begin, tally, ask) in C or in Python."""
    if name == "c":
        if _speedups is None:
            pytest.skip("balancer._speedups is not built")
        return _speedups.begin, _speedups.tally, _speedups.ask
    return stats.begin_py, stats.tally_py, holding.ask_py


class Workers:
    """READY links on real socketpairs, each with a board, and a dispatcher over them."""

    def __init__(self, n: int, hold: bool = True, cap: int = 100) -> None:
        self.d = Dispatcher(cap=cap, hold=hold)
        self.links = []
        for slot in range(n):
            master_end, worker_end = wire.channel_pair()
            words = board.private()
            words[board.CHANNEL_FD] = worker_end.fileno()  # as the worker notes it (board.attach)
            link = Link(slot, master_end, words)
            link.peer = worker_end
            link.ready = True
            self.links.append(link)
        self.d.set_links(list(self.links))
        self.fds: list[int] = []

    def busy(self, link: Link, service: float = 0.002, running: int = 1, cpu: float = 1.0) -> None:
        """The worker has `running` requests in their handlers; its last ones took `service` seconds each, on
        a CPU for `cpu` of that time (what its last window of requests put on its board)."""
        words = link.board
        words[board.STARTED] += running
        words[board.SERVICE_NS] = int(service * 1e9)
        words[board.CPU_NS] = int(service * cpu * 1e9)
        words[board.RUNNABLE_PER_MILLE] = int(cpu * 1000)

    def all_busy(self) -> list[Link]:
        """Every worker with one CPU-bound request of 2 ms running (the links)."""
        for link in self.links:
            self.busy(link)
        return self.links

    def finish(self, link: Link, n: int = 1, still_running: int = 0) -> None:
        """n of its requests end (tally() with what still runs): it answers an ask as a worker does."""
        for _ in range(n):
            stats.tally(link.board, board.PAIR0 + 1, board.BUCKET0, 0.002, still_running)

    def new(self, n: int) -> list[tuple[int, int]]:
        """n accepted connections (each a pipe of its own, so where each went can be told)."""
        items = []
        for _ in range(n):
            read, write = os.pipe()
            self.fds += [read, write]
            items.append((read, socket.AF_INET))
        return items

    def dispatch(self, items=()) -> None:
        self.d.survey()
        self.d.dispatch(list(items), surveyed=True)

    def sent(self, link: Link) -> list[int]:
        """The inodes of the fds link's worker received since the last call (closing its copies)."""
        got = []
        while (msg := wire.receive(link.peer)) is not None:
            got += [os.fstat(fd).st_ino for fd in msg[1]]
            wire.close_all(msg[1])
        return got

    def woke(self, link: Link) -> bool:
        """True when the worker sent IDLE on its channel (read, as the supervisor does: not asked any more)."""
        got = wire.receive(link.channel)
        if got is None:
            return False
        assert got[0] == bytes((wire.IDLE,)) and not got[1]
        self.d.on_idle(link)
        return True

    def asked(self) -> list[int]:
        """The slots of the workers asked to say when they are free."""
        return [link.slot for link in self.links if link.board[board.ASK] != link.board[board.ANSWERED]]

    def close(self) -> None:
        self.d.set_links([])
        for link in self.links:
            self.d.evict(link)  # with no worker left, what it held waits homeless, and is closed next
        self.d.close_homeless()
        for link in self.links:
            link.channel.close()
            link.peer.close()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def two():
    w = Workers(2)
    yield w
    w.close()


def ino(item: tuple[int, int]) -> int:
    return os.fstat(item[0]).st_ino


# ---- the worker's side: begin, tally, answer ----------------------------------------------------------


@pytest.mark.parametrize("name", IMPLS)
def test_begin_counts_a_request_and_returns_perf_counters_time(name):
    begin, _, _ = impl(name)
    words = board.private()
    before = time.perf_counter()
    at = begin(words)
    assert before <= at <= time.perf_counter()
    assert words[board.STARTED] == 1 and abs(words[board.STARTED_AT] / 1e9 - at) < 1e-6


def idle_said(end: socket.socket) -> bool:
    """True when an IDLE message waits on end (and reads it)."""
    got = wire.receive(end)
    return got is not None and got[0] == bytes((wire.IDLE,))


@pytest.mark.parametrize("name", IMPLS)
def test_a_worker_says_it_is_idle_only_when_asked_and_free(name):
    begin, tally, ask = impl(name)
    words = board.private()
    master_end, worker_end = wire.channel_pair()
    words[board.CHANNEL_FD] = worker_end.fileno()
    try:
        begin(words)
        begin(words)
        tally(words, board.PAIR0 + 1, board.BUCKET0, 0.001, 1)  # one ends, one still runs
        tally(words, board.PAIR0 + 1, board.BUCKET0, 0.001, 0)  # free, but nobody asked
        assert words[board.FINISHED] == 2
        assert not idle_said(master_end)
        begin(words)
        begin(words)
        assert ask(words, 0) == (4, 2)  # asked to say when free; the answer reads where it is
        assert ask(words, 0) == (4, 2) and words[board.ASK] == words[board.ANSWERED] + 1  # one ask, not two
        tally(words, board.PAIR0 + 1, board.BUCKET0, 0.001, 1)
        assert not idle_said(master_end)  # one still runs
        tally(words, board.PAIR0 + 1, board.BUCKET0, 0.001, 0)
        assert idle_said(master_end) and words[board.ANSWERED] == words[board.ASK]
        begin(words)
        begin(words)
        ask(words, 6)  # asked to say when FINISHED reaches 6, even while busy
        tally(words, board.PAIR0 + 1, board.BUCKET0, 0.001, 1)
        assert not idle_said(master_end)  # 5 finished
        begin(words)
        tally(words, board.PAIR0 + 1, board.BUCKET0, 0.001, 1)  # 6 finished, one runs: answered all the same
        assert idle_said(master_end)
        tally(words, board.PAIR0 + 1, board.BUCKET0, 0.001, 0)  # answered already: no second message
        assert not idle_said(master_end)
    finally:
        master_end.close()
        worker_end.close()


def test_a_cancelled_ask_is_not_answered(two):
    link = two.links[0]
    two.busy(link)
    holding.ask(link.board, 0)
    holding.cancel(link)
    two.finish(link)
    assert not two.woke(link)


@pytest.mark.parametrize("name", IMPLS)
def test_each_window_of_requests_says_how_long_they_took_and_how_much_on_or_waiting_for_a_cpu(name):
    begin, tally, _ = impl(name)
    words = board.private()

    def request(seconds: float, spin: bool) -> None:
        begin(words)
        started = time.perf_counter()
        if spin:  # CPU-bound: a neighbour may take the CPU meanwhile (this machine is shared), so not all of it
            end = time.thread_time() + seconds
            while time.thread_time() < end:
                pass
        else:
            time.sleep(seconds)  # awaiting I/O, as far as the CPU clock can tell
        tally(words, board.PAIR0 + 1, board.BUCKET0, time.perf_counter() - started, 0)

    for _ in range(board.WINDOW):
        request(0.0005, spin=True)
    assert words[board.SERVICE_NS] >= 500_000 and words[board.RUNNABLE_PER_MILLE] > 600
    for _ in range(board.WINDOW):
        request(0.01, spin=False)  # long enough that waiting for a CPU after each wake-up is a small share
    assert words[board.SERVICE_NS] >= 10_000_000 and words[board.RUNNABLE_PER_MILLE] < holding.HOLD_MIN_RUNNABLE * 1000


def test_a_worker_maps_its_board_noting_its_channel_for_the_master_to_see():
    fd, words = board.create()
    try:
        board.attach(fd, 17)
        assert words[board.CHANNEL_FD] == 17  # the master's mapping shows what the worker's noted
        board.attach(fd)  # a re-executed master's mapping of it (balancer/upgrade.py) changes nothing
        assert words[board.CHANNEL_FD] == 17
    finally:
        os.close(fd)


# ---- picks: a free worker first ------------------------------------------------------------------------


def test_a_free_worker_goes_first_and_a_handed_over_connection_is_busy_until_it_begins(two):
    a, b = two.links
    # a has idle kept-alive connections: free all the same, and b's request in hand weighs BUSY_COST connections
    a.open_conns = a.acked_total = holding.BUSY_COST
    two.busy(b, running=1)
    two.dispatch(two.new(1))
    assert len(two.sent(a)) == 1 and not two.sent(b)
    two.d.survey()
    assert a.queue == 1 and b.queue == 1  # a has a connection whose request has not begun: busy, as b is
    stats.begin(a.board, "first")  # its (first) request began ...
    two.finish(a)  # ... and ended: free again
    two.d.survey()
    assert a.queue == 0 and b.queue == 1


def test_a_handed_over_connection_that_sends_nothing_stops_counting_after_a_while(two):
    a, _ = two.links
    two.dispatch(two.new(1))
    two.d.survey()
    assert a.queue == 1 or two.links[1].queue == 1
    for link in two.links:
        link.handed_at -= holding.PENDING_EXPIRY + 1
    two.d.survey()
    assert [link.queue for link in two.links] == [0, 0]


def test_connections_queued_at_a_worker_keep_it_busy_while_its_other_requests_run(two):
    a, b = two.links
    two.dispatch(two.new(3))  # free first: a and b one each, then one more
    two.d.survey()
    assert [link.pending for link in two.links] in ([2, 1], [1, 2])
    many = a if a.pending == 2 else b
    stats.begin(many.board, "first")
    two.finish(many)
    stats.begin(many.board)  # a second request on the same connection: the other connection still waits
    two.finish(many)
    two.d.survey()
    assert many.pending == 1 and many.queue == 1


def test_connections_closed_before_a_request_stop_counting_when_nothing_is_open(two):
    a, _ = two.links
    a.board[board.HANDLED] = 0
    two.d.set_links([a])
    two.dispatch(two.new(2))
    two.d.collect(a)
    assert a.pending == 2
    a.board[board.HANDLED] = board.pack(len(a.sent), 0)  # acked, then both clients left before sending anything
    a.board[board.CLOSED] = 2
    two.d.survey()
    assert a.pending == 0 and a.queue == 0


# ---- the hold ------------------------------------------------------------------------------------------


def test_every_worker_busy_new_connections_are_held_and_the_workers_asked(two):
    a, b = two.all_busy()
    items = two.new(2)
    two.dispatch(items)
    assert not two.sent(a) and not two.sent(b)
    held = list(two.d.holding.items)
    assert [h.fd for h in held] == [fd for fd, _ in items]
    assert {h.link for h in held} == {a, b}  # where least-connections would have put each
    assert all(h.target == h.link.board[board.FINISHED] + 1 for h in held)  # its turn: after the one running there
    assert two.asked() == [0, 1]


def test_a_worker_going_free_gets_the_oldest_connection_held_for_it_then_the_oldest_of_all(two):
    a, b = two.all_busy()
    items = two.new(3)
    two.dispatch(items)
    for_b = [h.fd for h in two.d.holding.items if h.link is b]
    for_a = [h.fd for h in two.d.holding.items if h.link is a]
    assert len(for_b) == 1 and len(for_a) == 2  # as least-connections would have queued them: 1 and 2
    two.finish(b)  # b's request ends: it answers the ask
    assert two.woke(b) and not two.woke(a)
    two.dispatch()
    assert two.sent(b) == [os.fstat(for_b[0]).st_ino] and not two.sent(a)  # its turn, as least-connections
    assert b.asked  # busy again: asked again, since connections are still held
    stats.begin(b.board, "first")  # the first request on the connection it got
    two.finish(b)  # free again, and nothing held for it: it takes the oldest held for a
    assert two.woke(b)
    two.dispatch()
    assert two.sent(b) == [os.fstat(for_a[0]).st_ino] and not two.sent(a)
    assert [h.fd for h in two.d.holding.items] == for_a[1:]


def test_held_connections_leave_at_their_turn_at_the_worker_they_would_have_joined(two):
    a, b = two.all_busy()
    items = two.new(2)
    two.dispatch(items)
    turn = {h.link: h for h in two.d.holding.items}
    # a never goes free (a keep-alive request begins as each ends) but finishes the one it had: that is
    # when the connection held for it would have begun there.
    a.board[board.STARTED] += 1
    two.finish(a, still_running=1)
    assert a.board[board.FINISHED] >= turn[a].target
    assert two.woke(a)  # asked to say so at that count, not only when free
    two.dispatch()
    assert [h.fd for h in two.d.holding.items] == [turn[b].fd]
    assert two.sent(a) + two.sent(b) == [os.fstat(turn[a].fd).st_ino]


def test_no_connection_is_held_past_the_cap(two, monkeypatch):
    a, b = two.all_busy()
    monkeypatch.setattr(holding, "HOLD_CAP", 0.0)
    items = two.new(1)
    two.dispatch(items)
    assert len(two.d.holding.items) == 1
    two.dispatch()
    assert not two.d.holding.items and two.d.holding.expired == 1
    assert two.sent(a) + two.sent(b) == [ino(items[0])]


def test_past_the_most_held_the_oldest_go_as_least_connections_places_them(two, monkeypatch):
    a, b = two.all_busy()
    monkeypatch.setattr(holding, "HOLD_PER_WORKER", 1)  # 2 workers: 2 held at most
    items = two.new(3)
    two.dispatch(items)
    assert [h.fd for h in two.d.holding.items] == [items[1][0], items[2][0]]
    assert two.sent(a) + two.sent(b) == [ino(items[0])]


@pytest.mark.parametrize("why", ["short handlers", "a queue", "hold off", "awaiting I/O"])
def test_not_held_where_holding_does_not_pay(why):
    w = Workers(2, hold=why != "hold off")
    try:
        for link in w.links:
            # awaiting I/O: the handlers took 2 ms each, but the worker spent a tenth of that on a CPU
            w.busy(link, service=0.00005 if why == "short handlers" else 0.002,
                   running=holding.HOLD_DEPTH + 1 if why == "a queue" else 1, cpu=0.1 if why == "awaiting I/O" else 1)
        items = w.new(2)
        w.dispatch(items)
        assert (w.d.holding is None or not w.d.holding.items) and not w.asked()
        assert sorted(w.sent(w.links[0]) + w.sent(w.links[1])) == sorted(ino(item) for item in items)
    finally:
        w.close()


def test_ties_go_to_the_worker_whose_request_began_last(two):
    a, b = two.all_busy()
    now = time.monotonic()
    a.board[board.STARTED_AT] = int((now - 0.5) * 1e9)  # running for half a second: a long one
    b.board[board.STARTED_AT] = int(now * 1e9)
    for turn in (0, 1):  # whatever the round robin's turn
        two.d._next = turn
        two.dispatch(two.new(1))
        assert [h.link for h in two.d.holding.items] == [b]
        two.d.release_held()
        two.sent(a), two.sent(b)
        a.pending = b.pending = 0  # as if the released connection had begun and ended


def test_a_pause_or_a_stop_places_every_held_connection(two):
    a, b = two.all_busy()
    items = two.new(3)
    two.dispatch(items)
    two.d.release_held()
    assert not two.d.holding.items
    assert sorted(two.sent(a) + two.sent(b)) == sorted(ino(item) for item in items)
    assert not two.asked()  # asks taken back


def test_connections_held_for_a_worker_that_dies_go_to_the_others(two):
    a, b = two.all_busy()
    items = two.new(2)
    two.dispatch(items)
    for_a = [h for h in two.d.holding.items if h.link is a]
    two.d.evict(a)
    two.d.set_links([b])
    two.dispatch()
    assert two.sent(b) == [os.fstat(h.fd).st_ino for h in for_a]


def test_at_shutdown_held_connections_are_closed_not_leaked(two):
    for link in two.links:
        two.busy(link)
    items = two.new(2)
    two.dispatch(items)
    two.d.close_homeless()
    for fd, _ in items:
        with pytest.raises(OSError):
            os.fstat(fd)
