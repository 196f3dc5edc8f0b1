"""The master's accept/send/close syscalls, C and Python, on real listeners, socketpairs and fds."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import types

import pytest

from balancer import handoff, wire

pytestmark = pytest.mark.timeout(30)

try:
    from balancer import _speedups  # tested even where BALANCER_NO_EXTENSIONS keeps the master off it
except ImportError:
    _speedups = None

IMPLS = {
    "python": types.SimpleNamespace(accept_many=handoff.accept_many_py, send_handoff=handoff.send_handoff_py,
                                    close_fds=handoff.close_fds_py),
    "c": _speedups,
}


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    if IMPLS[request.param] is None:
        # test_c_accelerator_is_built fails in this case, unless BALANCER_NO_EXTENSIONS asked for it
        pytest.skip("balancer._speedups is not built")
    return IMPLS[request.param]


def test_c_accelerator_is_built():
    if os.environ.get("BALANCER_NO_EXTENSIONS"):
        assert handoff.IMPLEMENTATION == "python"
    else:
        assert handoff.IMPLEMENTATION == "c", "balancer/_speedups.c did not build: install gcc and the Python headers"
        assert handoff.accept_many is _speedups.accept_many


@pytest.fixture
def listener():
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    sock.setblocking(False)
    yield sock
    sock.close()


def connect(listener: socket.socket, n: int) -> list[socket.socket]:
    """n clients; a blocking connect on loopback returns once the connection is in the accept queue."""
    return [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(n)]


def test_accept_many_takes_the_queue_up_to_the_limit_then_reports_eagain(impl, listener):
    clients = connect(listener, 5)
    first, err = impl.accept_many(listener, 3)
    assert len(first) == 3 and err == 0
    rest, err = impl.accept_many(listener, 10)
    assert len(rest) == 2 and err == errno.EAGAIN
    assert impl.accept_many(listener, 10) == ([], errno.EAGAIN)
    try:
        peers = set()
        for fd in first + rest:
            assert not os.get_inheritable(fd)  # close-on-exec: no worker inherits another's clients
            with socket.socket(fileno=os.dup(fd)) as s:
                peers.add(s.getpeername())
        assert peers == {c.getsockname() for c in clients}
    finally:
        wire.close_all(first + rest)
        for c in clients:
            c.close()


def test_accept_many_reports_a_failing_accept(impl):
    with socket.socket() as not_listening:
        not_listening.setblocking(False)
        assert impl.accept_many(not_listening, 4) == ([], errno.EINVAL)


def test_send_handoff_writes_the_wire_format_with_the_fds(impl):
    master_end, worker_end = wire.channel_pair()
    files = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    try:
        ids, families = [1, 7, 0xFFFFFFFF], [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX]
        impl.send_handoff(master_end, ids, families, files)
        msg, fds, truncated = wire.recv_message(worker_end)
        assert not truncated and msg[0] == wire.HANDOFF
        assert wire.decode_handoff(msg) == (ids, families, [])
        assert [os.fstat(fd).st_ino for fd in fds] == [os.fstat(fd).st_ino for fd in files]
        assert fds != files  # the receiver got its own copies
        wire.close_all(fds)
    finally:
        wire.close_all(files)
        master_end.close()
        worker_end.close()


def test_send_handoff_on_a_full_channel_raises_blocking_io_error(impl):
    master_end, worker_end = wire.channel_pair()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            for _ in range(100_000):
                impl.send_handoff(master_end, [1], [socket.AF_INET], [fd])
        worker_end.close()  # discards the queued copies
        with pytest.raises(OSError) as broken:
            impl.send_handoff(master_end, [2], [socket.AF_INET], [fd])
        assert not isinstance(broken.value, BlockingIOError)
    finally:
        os.close(fd)
        master_end.close()


@pytest.mark.parametrize("ids,families,nfds", [
    ([], [], 0),  # nothing to send
    (list(range(wire.MAX_FDS_PER_MSG + 1)), [2] * (wire.MAX_FDS_PER_MSG + 1), wire.MAX_FDS_PER_MSG + 1),
    ([1, 2], [2], 2),  # lengths differ
    ([1 << 32], [2], 1),  # id wider than the wire's 32 bits
    ([1], [256], 1),  # family wider than a byte
])
def test_send_handoff_rejects_a_batch_the_wire_cannot_carry(impl, ids, families, nfds):
    master_end, worker_end = wire.channel_pair()
    files = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    try:
        with pytest.raises((ValueError, OverflowError)):
            impl.send_handoff(master_end, ids, families, files)
        with pytest.raises(BlockingIOError):
            worker_end.recv(16, socket.MSG_DONTWAIT)  # nothing half-sent
    finally:
        wire.close_all(files)
        master_end.close()
        worker_end.close()


def test_close_fds_closes_runs_and_gaps_and_nothing_else(impl):
    files = [os.open("/dev/null", os.O_RDONLY) for _ in range(12)]
    keep = {files[3], files[8], files[11]}  # inside the runs' span: a close_range over a gap would take them
    gone = sorted(set(files) - keep)
    os.close(gone[0])  # already closed: ignored
    try:
        impl.close_fds([gone[2], gone[0], *gone[1:], gone[1]])  # unsorted, with a duplicate
        for fd in gone:
            with pytest.raises(OSError):
                os.fstat(fd)
        for fd in keep:
            os.fstat(fd)
        impl.close_fds([])
    finally:
        wire.close_all(sorted(keep))


# Run in a child interpreter: a crash there fails the test instead of killing pytest.
MUTATING_INDEX = r'''
import os, socket, sys, types
from balancer import handoff, wire

if sys.argv[1] == "c":
    from balancer import _speedups as impl
else:
    impl = types.SimpleNamespace(send_handoff=handoff.send_handoff_py, close_fds=handoff.close_fds_py)


class Clears:
    """An int-like whose conversion empties a list: the list's items vanish while C code may hold them."""

    def __init__(self, value, victim):
        self.value, self.victim = value, victim

    def __index__(self):
        self.victim.clear()
        return self.value


def nothing_sent(end):
    try:
        end.recv(16, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False


master_end, worker_end = wire.channel_pair()
files = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
for target in ("ids", "families", "fds"):
    ids, families, fds = [7, 8, 9], [socket.AF_INET] * 3, list(files)
    lists = {"ids": ids, "families": families, "fds": fds}
    ids[0] = Clears(7, lists[target])  # the first conversion empties one of the three lists
    try:
        impl.send_handoff(master_end, ids, families, fds)
    except ValueError as exc:
        print(f"{target}: refused: {exc}")
    else:
        print(f"{target}: sent")
    assert nothing_sent(worker_end), target

victim = list(files)
victim[1] = Clears(files[1], victim)
impl.close_fds(victim)  # closes what it read before the list emptied, as a Python loop would
closed = []
for fd in files:
    try:
        os.fstat(fd)
    except OSError:
        closed.append(fd)
print("closed", closed == files[:2])
'''


@pytest.mark.parametrize("name", sorted(IMPLS))
def test_an_index_that_empties_a_list_mid_call_is_refused_not_a_crash(name):
    if IMPLS[name] is None:
        pytest.skip("balancer._speedups is not built")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", MUTATING_INDEX, name], cwd=root, capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)  # -11: the master would have segfaulted
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["ids", "families", "fds"]
    assert all(": refused:" in line for line in lines[:3]), lines
    assert lines[3] == "closed True", lines


# ---- tally: a worker's request counts on its board --------------------------------------------------------


@pytest.mark.parametrize("name", ["python", "c"])
def test_tally_counts_a_request_on_the_board(name):
    from balancer import board
    from balancer_workers import stats

    if name == "c" and _speedups is None:
        pytest.skip("balancer._speedups is not built")
    tally = stats.tally_py if name == "python" else _speedups.tally
    words = board.private()
    pair = board.PAIR0 + 1
    for seconds, bucket in ((0.0005, board.BUCKET0), (0.3, board.BUCKET0 + 8), (0.0, board.BUCKET0)):
        tally(words, pair, bucket, seconds)
    assert words[pair] == 3 and words[board.COUNT] == 3
    assert words[board.BUCKET0] == 2 and words[board.BUCKET0 + 8] == 1
    assert words[board.SUM_NS] == 500_000 + 300_000_000
    assert sum(words) == 3 + 3 + 2 + 1 + 300_500_000  # nothing else on the board was written


def test_the_c_tally_refuses_what_is_not_a_board():
    from balancer import board

    if _speedups is None:
        pytest.skip("balancer._speedups is not built")
    words = board.private()
    for bad in (bytearray(64), memoryview(bytes(4096)).cast("Q"), memoryview(bytearray(4096)).cast("I")):
        with pytest.raises((TypeError, ValueError)):
            _speedups.tally(bad, board.PAIR0, board.BUCKET0, 0.1)
    for pair, bucket in ((board.WORDS, board.BUCKET0), (board.PAIR0, -1), (board.COUNT, board.BUCKET0)):
        with pytest.raises(IndexError):
            _speedups.tally(words, pair, bucket, 0.1)
    assert sum(words) == 0


def test_workers_count_with_the_c_tally_when_it_is_built():
    from balancer_workers import stats

    if os.environ.get("BALANCER_NO_EXTENSIONS"):
        assert stats.tally is stats.tally_py
    else:
        assert stats.tally is getattr(_speedups, "tally", None), "balancer/_speedups.c did not build"
