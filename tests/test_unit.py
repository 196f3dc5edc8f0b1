"""Pure-logic tests: dispatcher selection, backoff, config validation, CLI generation, wire codecs."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer import board, wire
from balancer.backoff import Backoff
from balancer.cli import build_parser, parse_config
from balancer.config import Config, ConfigError, parse_bind
from balancer.dispatch import Dispatcher, Link, fill_py, pick_key
from balancer.holding import BUSY_COST

try:
    from balancer import _speedups
except ImportError:
    _speedups = None


def ready_routes(d: Dispatcher, n: int) -> list[Link]:
    """n READY links whose channels are real socketpairs (drained by the caller if needed)."""
    routes = []
    for slot in range(n):
        master_end, worker_end = wire.channel_pair()
        r = Link(slot, master_end)
        r.peer = worker_end
        r.ready = True  # as its record's phase READY makes it
        routes.append(r)
    d.set_links(list(routes))
    return routes


def loads(d: Dispatcher) -> list[int]:
    """Connections each link holds or is about to, as the dispatcher counts them."""
    d.snapshot()
    return [link.open_conns + len(link.unacked) for link in d.links]


def may_take(d: Dispatcher, link: Link) -> bool:
    """True when the dispatcher may give link one more connection now."""
    return d.snapshot()[1][d.links.index(link)] > 0


def close_routes(routes):
    for r in routes:
        r.channel.close()
        r.peer.close()


def release_all(d: Dispatcher, routes) -> None:
    """Take every fd the dispatcher holds back, close them, and close the routes' channels."""
    for r in routes:
        d.evict(r)
    d.set_links([])
    d.close_homeless()
    close_routes(routes)


def test_round_robin_order():
    d = Dispatcher(cap=10)
    routes = ready_routes(d, 3)
    assert [d.pick().slot for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    close_routes(routes)


def open_on(d: Dispatcher, *loads: int) -> list[Link]:
    """READY routes with these many connections open."""
    routes = ready_routes(d, len(loads))
    for r, load in zip(routes, loads):
        r.open_conns = r.acked_total = load  # acked and not closed: what a survey of the board counts open
    return routes


def test_least_loaded_first_and_round_robin_among_equals():
    d = Dispatcher(cap=10)
    routes = open_on(d, 3, 1, 1)
    assert [d.pick().slot for _ in range(4)] == [1, 2, 1, 2]
    close_routes(routes)


def test_a_batch_gives_each_free_worker_one_then_fills_the_least_loaded_up_to_the_others():
    d = Dispatcher(cap=20, hold=False)
    routes = open_on(d, 4, 0, 1, 2)
    running(routes[3], 1)  # a request in its handler: busy, though it has fewer connections than routes[0]
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(9)]
    d.survey()
    d.dispatch([(fd, socket.AF_INET) for fd in fds])
    # The free ones first (routes[0] too: its 4 connections are idle), then the fewest connections, requests in
    # hand weighing BUSY_COST connections (routes[0]'s 5 come after the others' 4 and 2 + 2).
    assert [len(r.unacked) for r in routes] == [1, 4, 3, 1]
    assert loads(d) == [5, 4, 4, 3]
    assert all(r.queue for r in routes)  # handed over and not begun: busy until the board says otherwise
    release_all(d, routes)


def running(link: Link, n: int) -> None:
    """Make link's board say n requests are in their handlers."""
    link.board[board.STARTED] += n


@pytest.mark.parametrize("skip", ["busy", "draining", "lost", "booting", "blocked", "overdue", "resting", "gone"])
def test_pick_skips_unavailable(skip):
    d = Dispatcher(cap=2)
    routes = ready_routes(d, 3)
    r = routes[1]
    if skip == "busy":
        r.open_conns = 2
    elif skip in ("draining", "booting"):
        r.ready = False
    elif skip == "lost":
        r.channel_lost = True
    elif skip == "resting":
        r.resting = True
    elif skip == "blocked":
        r.send_blocked = True
    elif skip == "overdue":
        r.unacked = {1: (-1, socket.AF_INET)}
        r.ack_progress = 100.0
        d.mark_overdue(now=100.4, after=0.5)
        assert may_take(d, r)
        d.mark_overdue(now=100.6, after=0.5)
    else:
        d.set_links([routes[0], routes[2]])
    assert [d.pick().slot for _ in range(4)] == [0, 2, 0, 2]
    close_routes(routes)


def test_survey_collects_and_names_the_least_busy_ready_worker():
    d = Dispatcher(cap=100)
    assert d.survey() == 0 and d.min_open_ready is None  # no ready worker: nothing to coalesce for
    routes = ready_routes(d, 3)
    try:
        for r, acked in zip(routes, (5, 2, 9)):
            r.acked_total = acked  # acked and never closed: open
        assert d.survey() == 95 + 98 + 91 and d.min_open_ready == 2
        assert [r.open_conns for r in routes] == [5, 2, 9]
        routes[1].board[board.CLOSED] = 2  # the worker closed both
        routes[0].board[board.CLOSED] = 1
        d.survey()
        assert [r.open_conns for r in routes] == [4, 0, 9] and d.min_open_ready == 0
        routes[1].ready = False  # draining: only ready workers count, for room and for busy
        assert d.survey() == 96 + 91 and d.min_open_ready == 4
    finally:
        close_routes(routes)


fill_cases = st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 40), min_size=n, max_size=n), st.lists(st.integers(0, 6), min_size=n, max_size=n),
    st.integers(0, n), st.integers(0, 80), st.lists(st.booleans(), min_size=n, max_size=n)))


@settings(max_examples=300, deadline=None)
@given(fill_cases)
def test_fill_in_c_gives_what_python_gives(case):
    if _speedups is None:
        pytest.skip("balancer._speedups is not built")  # test_handoff's test_c_accelerator_is_built fails then
    loads, rooms, start, count, busy = case
    assert _speedups.fill(loads, rooms, start, count) == fill_py(loads, rooms, start, count)
    keys = [pick_key(load, b) for load, b in zip(loads, busy)]
    assert _speedups.fill(keys, rooms, start, count, BUSY_COST) == fill_py(keys, rooms, start, count, BUSY_COST)


@settings(max_examples=60, deadline=None)
@given(fill_cases)
def test_a_batch_is_shared_as_one_pick_at_a_time_would(case):
    loads, rooms, start, count, busy = case
    cap = 50

    def dispatcher():
        d = Dispatcher(cap=cap, max_unacked=8, hold=False)
        routes = ready_routes(d, len(loads))
        for r, load, room, b in zip(routes, loads, rooms, busy):
            r.open_conns = load
            r.queue = int(b)  # a request running, or none
            if room == 0:
                r.resting = True  # this one takes nothing
            else:  # room left under max_unacked
                r.unacked = {-i: (-1, socket.AF_INET) for i in range(1, 9 - room)}
        d._next = start
        return d, routes

    one, one_routes = dispatcher()
    picked = []
    for _ in range(count):
        link = one.pick()
        if link is None:
            break
        link.unacked[len(picked) + 1] = (-1, socket.AF_INET)  # what dispatch would record
        link.queue += 1
        picked.append(link.slot)
    batch, batch_routes = dispatcher()
    before = [len(r.unacked) for r in batch_routes]
    pipes = [os.pipe() for _ in range(count)]  # every fd a distinct file, so each can be told where it went
    fds = [read for read, _ in pipes]
    files = {os.fstat(fd).st_ino: fd for fd in fds}
    received = []
    try:
        batch.dispatch([(fd, socket.AF_INET) for fd in fds])
        shares = [len(r.unacked) - b for r, b in zip(batch_routes, before)]
        assert shares == [picked.count(r.slot) for r in one_routes]
        assert len(batch.homeless) == count - len(picked)
        assert batch._next == one._next
        for r in batch_routes:  # what each worker receives is what the master holds for it, fd for fd
            got_ids, got_files = [], []
            while (msg := wire.receive(r.peer)) is not None:
                ids, _, _ = wire.decode_handoff(msg[0])
                got_ids += ids
                got_files += [os.fstat(fd).st_ino for fd in msg[1]]
                received += msg[1]
            held = {i: item for i, item in r.unacked.items() if i > 0}
            assert got_ids == list(held) and [files[ino] for ino in got_files] == [fd for fd, _ in held.values()]
        held = [item[0] for r in batch_routes for i, item in r.unacked.items() if i > 0]
        assert sorted(held + [fd for fd, _ in batch.homeless]) == sorted(fds)  # each fd to one place only
    finally:
        for r in batch_routes:
            r.unacked = {i: item for i, item in r.unacked.items() if i > 0}
        release_all(batch, batch_routes)
        close_routes(one_routes)
        wire.close_all(received + [write for _, write in pipes])


def test_unacked_count_toward_cap_and_stall_limit():
    d = Dispatcher(cap=100, max_unacked=3)
    routes = ready_routes(d, 1)
    r = routes[0]
    r.unacked = {i: (-1, socket.AF_INET) for i in range(3)}
    assert d.pick() is None
    assert d.free_capacity() == 0
    r.unacked.pop(0)
    assert d.free_capacity() == 1
    close_routes(routes)


def test_backpressure_all_full_goes_homeless_then_retried():
    d = Dispatcher(cap=1)
    routes = ready_routes(d, 2)
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    d.dispatch([(fd, socket.AF_INET) for fd in fds])
    assert loads(d) == [1, 1]
    assert len(d.homeless) == 1 and d.free_capacity() == 0
    # worker 0 acks and then reports its connection closed, on its board: room for the homeless fd
    routes[0].board[board.HANDLED] = board.pack(1, 0)
    d.collect(routes[0])
    assert loads(d)[0] == 1 and not routes[0].unacked
    routes[0].board[board.CLOSED] = 1
    d.collect(routes[0])
    assert loads(d)[0] == 0
    d.retry_homeless()
    assert not d.homeless and loads(d)[0] == 1
    release_all(d, routes)


def test_refuse_and_evict_redispatch_elsewhere():
    d = Dispatcher(cap=10)
    routes = ready_routes(d, 2)
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(4)]
    d.dispatch([(fd, socket.AF_INET) for fd in fds])
    assert [len(r.unacked) for r in routes] == [2, 2]
    routes[0].ready = False  # draining
    d.on_refuse(routes[0], list(routes[0].unacked))
    assert len(routes[1].unacked) == 4 and d.redispatched == 2
    routes[0].ready = True
    d.mark_overdue(time.monotonic(), 0.5)  # the tick ends the rest a refusal earns
    assert not routes[0].resting
    routes[1].channel_lost = True
    d.evict(routes[1])
    assert len(routes[0].unacked) == 4 and d.redispatched == 6
    routes[0].board[board.HANDLED] = board.pack(routes[0].sent_msgs, 1)  # the first message was the refused one
    d.collect(routes[0])  # closes the master's copies
    assert routes[0].open_conns == 4 and not routes[0].unacked
    close_routes(routes)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_board_acks_wait_for_the_refusal_they_cover():
    d = Dispatcher(cap=10)
    routes = ready_routes(d, 2)
    r = routes[0]
    first = [os.open("/dev/null", os.O_RDONLY) for _ in range(2)]
    d.dispatch([(first[0], socket.AF_INET)])  # message 1 -> r
    d.dispatch([(first[1], socket.AF_INET)])  # -> routes[1]
    second = os.open("/dev/null", os.O_RDONLY)
    d.dispatch([(second, socket.AF_INET)])  # message 2 -> r
    refused_ids = [i for i, (fd, _) in r.unacked.items() if fd == first[0]]
    # The worker refused message 1 and took message 2; the board says so before its REFUSE is read.
    r.board[board.HANDLED] = board.pack(2, 1)
    d.collect(r)
    assert len(r.unacked) == 2 and fd_is_open(second) and r.acked_total == 0  # cannot tell which was refused yet
    d.on_refuse(r, refused_ids)  # reading the REFUSE collects again
    assert r.acked_total == 1 and not fd_is_open(second) and list(r.unacked) == []
    assert first[0] in [fd for fd, _ in routes[1].unacked.values()]  # the refused fd went to the other worker
    r.board[board.CLOSED] = 1
    d.collect(r)
    assert r.open_conns == 0
    release_all(d, routes)


def test_evict_redispatches_only_what_the_board_does_not_ack():
    d = Dispatcher(cap=10)
    routes = ready_routes(d, 2)
    r, other = routes
    other.ready = False  # draining: everything goes to r first
    taken = os.open("/dev/null", os.O_RDONLY)
    waiting = os.open("/dev/null", os.O_RDONLY)
    d.dispatch([(taken, socket.AF_INET)])
    d.dispatch([(waiting, socket.AF_INET)])
    r.board[board.HANDLED] = board.pack(1, 0)  # it took message 1, then died before handling message 2
    r.channel_lost = True
    other.ready = True
    assert d.evict(r) == 1  # the count the master logs: read after the board, so only the untaken one
    assert not fd_is_open(taken)  # its client went with the dead worker; no second worker sees it
    assert [fd for fd, _ in other.unacked.values()] == [waiting] and d.redispatched == 1
    release_all(d, routes)


def test_board_counters_are_shared_between_processes_and_wrap():
    fd, master_view = board.create()
    pid = os.fork()
    if pid == 0:  # the worker side: its own mapping of the same memfd
        view = board.attach(fd)
        view[board.HANDLED] = board.pack(board.HANDLED_MASK + 3, board.REFUSED_MASK + 2)
        view[board.CLOSED] = 7
        os._exit(0)
    os.close(fd)
    assert os.waitpid(pid, 0)[1] == 0
    handled, refused = board.unpack(master_view[board.HANDLED])
    assert (handled, refused, master_view[board.CLOSED]) == (2, 1, 7)
    assert board.handled_by(board.HANDLED_MASK, handled) and board.handled_by(2, handled)  # across the wrap
    assert not board.handled_by(3, handled)


def test_refusing_worker_rests_until_the_tick_so_fds_do_not_bounce():
    d = Dispatcher(cap=10)
    routes = ready_routes(d, 2)
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(2)]
    d.dispatch([(fd, socket.AF_INET) for fd in fds])
    # both READY workers refuse (out of fds): the fds wait in the master instead of ping-ponging
    d.on_refuse(routes[0], list(routes[0].unacked))
    assert len(routes[1].unacked) == 2
    d.on_refuse(routes[1], list(routes[1].unacked))
    assert len(d.homeless) == 2 and not routes[0].unacked and not routes[1].unacked
    assert d.redispatched == 3 and d.free_capacity() == 0
    d.mark_overdue(time.monotonic(), 0.5)
    assert d.free_capacity() == 20
    d.retry_homeless()
    assert not d.homeless and [len(r.unacked) for r in routes] == [1, 1]
    release_all(d, routes)


def test_full_channel_reroutes_without_blocking():
    blocked = []
    d = Dispatcher(cap=10_000, max_unacked=10_000, on_blocked=blocked.append)
    routes = ready_routes(d, 2)
    fd = os.open("/dev/null", os.O_RDONLY)
    sent = 0
    while not blocked:  # nobody reads routes[*].peer: the SEQPACKET buffer fills up
        d.dispatch([(os.dup(fd), socket.AF_INET)])
        sent += 1
        assert sent < 10_000
    assert blocked[0].send_blocked and not may_take(d, blocked[0])
    other = routes[1 - blocked[0].slot]
    other.peer.setblocking(False)
    while True:  # the other worker reads its messages: its channel has room again
        try:
            wire.close_all(wire.recv_message(other.peer)[1])
        except BlockingIOError:
            break
    other.send_blocked = False
    before = len(other.unacked)
    d.dispatch([(os.dup(fd), socket.AF_INET)])
    assert len(other.unacked) == before + 1
    for r in routes:
        wire.close_all([f for f, _ in r.unacked.values()])
    os.close(fd)
    close_routes(routes)


def test_backoff_grows_caps_and_forgives():
    b = Backoff(base=0.1, factor=2, cap=1.0, stable_after=10)
    assert [b.failure(0.5) for _ in range(2)] == [0.1, 0.2]
    assert not b.crash_looping(None)
    assert [b.failure(0.5) for _ in range(4)] == [0.4, 0.8, 1.0, 1.0]
    assert b.crash_looping(None) and b.crash_looping(9.9)  # none serves, or the one serving is young
    assert not b.crash_looping(10)  # one has stayed up: the header no longer says so
    assert b.failure(60) == 0.1  # stayed up long enough: start over
    assert not b.crash_looping(None)


@pytest.mark.parametrize("text,expect", [
    ("127.0.0.1:8000", ("tcp", "127.0.0.1", 8000)),
    ("[::1]:9000", ("tcp", "::1", 9000)),
    (":80", ("tcp", "0.0.0.0", 80)),
    ("localhost:0", ("tcp", "localhost", 0)),
    ("unix:/tmp/x.sock", ("unix", "", 0)),
])
def test_parse_bind_ok(text, expect):
    b = parse_bind(text)
    assert (b.family, b.host, b.port) == expect


@pytest.mark.parametrize("text", ["foo", "1.2.3.4", "::1:80", "host:99999", "unix:", "[::1]", "a:b"])
def test_parse_bind_bad(text):
    with pytest.raises(ConfigError, match="bad bind"):
        parse_bind(text)


@pytest.mark.parametrize("kwargs,msg", [
    ({"workers": 0}, "--workers must be at least 1"),
    ({"backend": "nocolon"}, "expected MODULE:ATTR"),
    ({"backend": "mod:"}, "expected MODULE:ATTR"),
    ({"graceful_timeout": 0}, "--graceful-timeout must be positive"),
    ({"max_requests": -1}, "--max-requests must be 0 or more"),
    ({"loop": "tokio"}, "--loop must be one of"),
    ({"bind": ()}, "at least one --bind"),
    ({"metrics_bind": "unix:/x"}, "--metrics-bind must be HOST:PORT"),
    ({"metrics_bind": "127.0.0.1:x"}, "--metrics-bind: bad bind"),
    ({"accept_coalesce": -0.001}, "--accept-coalesce must be between 0 and"),
    ({"accept_coalesce": 0.5}, "--accept-coalesce must be between 0 and"),
])
def test_config_rejects(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        Config(**kwargs)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().workers = 3


def test_cli_has_a_flag_for_every_field_and_defaults_match():
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    for f in dataclasses.fields(Config):
        assert f.name in dests, f.name
    assert parse_config([]) == Config()


def test_cli_parses_repeated_binds_and_bools():
    c = parse_config(["--bind", "127.0.0.1:1", "--bind", "[::1]:2", "--workers", "3", "--no-tcp-keepalive"])
    assert c.bind == ("127.0.0.1:1", "[::1]:2") and c.workers == 3 and c.tcp_keepalive is False


def test_cli_bad_value_raises_config_error():
    with pytest.raises(ConfigError):
        parse_config(["--workers", "0"])


def test_the_master_and_the_workers_import_nothing_of_each_others_world():
    # Shared pieces (wire, board, tls, the access-log syntax...) live in balancer/ and import neither side.
    master = ("import sys, balancer.cli, balancer.master, balancer.config as c; c.Config(access_log=True); "
              "print(sorted(m for m in sys.modules if m.startswith('balancer_workers')))")
    worker = ("import sys, balancer_workers.__main__, balancer_workers.worker; print(sorted(m for m in sys.modules if "
              "m in ('balancer.config', 'balancer.master', 'balancer.cli', 'balancer.supervisor', 'balancer.dispatch')))")
    for code in (master, worker):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "[]", (code, r.stdout, r.stderr)


def test_one_loop_chooser_for_master_and_workers(monkeypatch):
    import asyncio

    import balancer.master
    import balancer_workers.__main__
    from balancer import eventloop

    assert balancer.master.loop_factory is balancer_workers.__main__.loop_factory is eventloop.loop_factory
    assert eventloop.loop_factory("asyncio") is asyncio.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: import uvloop raises ImportError
    assert eventloop.loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(eventloop.LoopUnavailable):
        eventloop.loop_factory("uvloop")
    # The master refuses it at start-up (exit 2), as the workers would, instead of running asyncio itself.
    with pytest.raises(ConfigError, match="--loop uvloop, but uvloop is not installed"):
        Config(loop="uvloop")


def test_wire_codecs_roundtrip_and_reject_garbage():
    ids, fams = [1, 2, 4_000_000_000], [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX]
    assert wire.decode_handoff(wire.encode_handoff(ids, fams)) == (ids, fams, [])
    assert wire.decode_refuse(wire.encode_refuse(ids)) == ids
    assert wire.decode_json(wire.encode_json(wire.BEAT, {"a": 1})) == {"a": 1}
    for bad in (b"H", wire.encode_handoff(ids, fams)[:-1], b"H\x05\x00"):
        with pytest.raises(wire.ProtocolError):
            wire.decode_handoff(bad)
    with pytest.raises(wire.ProtocolError):
        wire.decode_refuse(b"R\x02\x00\x01")
    with pytest.raises(wire.ProtocolError):
        wire.decode_json(b"B{nope")
