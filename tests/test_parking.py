"""Keep-alive rebalancing, protocol tier: the wire codecs, the master's Parking on real TCP loopback connections,
the supervisor's reading of RETURN messages, and the dispatcher carrying a resumed connection's client address.

Real sockets and a real asyncio loop; no processes. The pool-level promises (a returned connection is owned by one
place at a time, served by one worker at a time) are the supervisor model's (tests/test_supervisor_model.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
import types

import pytest

from balancer import board, parking, wire
from balancer.config import Config
from balancer.dispatch import Dispatcher, Link
from balancer.parking import Parking
from balancer.process import Phase
from balancer.supervisor import Supervisor
from tests.fakeworker import make_worker

IDLE_TIMEOUT = 5.0
PEER = b"192.0.2.7 4242"
REQUEST = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


# ---- wire ---------------------------------------------------------------------------------------------------


def test_handoff_without_peers_round_trips():
    ids, fams = [1, 2, 4_000_000_000], [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX]
    assert wire.decode_handoff(wire.encode_handoff(ids, fams)) == (ids, fams, [])
    assert wire.decode_handoff(wire.encode_handoff(ids, fams, [])) == (ids, fams, [])
    assert wire.decode_handoff(wire.encode_handoff([], [])) == ([], [], [])


def test_handoff_with_peers_round_trips_one_per_resumed_family_in_order():
    resumed = socket.AF_INET | wire.RESUMED
    ids = [7, 8, 9, 10]
    fams = [resumed, socket.AF_INET, socket.AF_INET6 | wire.RESUMED, socket.AF_UNIX | wire.RESUMED]
    peers = [PEER, b"2001:db8::1 65535", b""]  # b"": a resumed connection that had no PROXY client
    msg = wire.encode_handoff(ids, fams, peers)
    assert wire.decode_handoff(msg) == (ids, fams, peers)
    longest = b"x" * 255  # a length byte's worth
    assert wire.decode_handoff(wire.encode_handoff([1], [resumed], [longest])) == ([1], [resumed], [longest])
    # all resumed, all with empty addresses
    assert wire.decode_handoff(wire.encode_handoff([1, 2], [resumed, resumed], [b"", b""])) == \
        ([1, 2], [resumed, resumed], [b"", b""])


def test_resumed_flag_is_outside_every_address_family():
    for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        assert not family & wire.RESUMED and (family | wire.RESUMED) & ~wire.RESUMED == family
    assert wire.RESUMED < 0x100  # it rides in the family byte


def test_a_handoff_of_resumed_connections_without_any_address_gives_each_none():
    """The C hand-off sends no address bytes: resumed connections without a PROXY client decode as b""."""
    resumed = socket.AF_INET | wire.RESUMED
    assert wire.decode_handoff(wire.encode_handoff([1, 2, 3], [resumed, socket.AF_INET, resumed])) == \
        ([1, 2, 3], [resumed, socket.AF_INET, resumed], [b"", b""])


@pytest.mark.parametrize("bad", [
    "cut in a length byte", "cut in an address", "a byte too many", "trailing with no resumed", "an address too many",
])
def test_handoff_with_peers_rejects_garbage(bad):
    resumed = socket.AF_INET | wire.RESUMED
    good = wire.encode_handoff([1, 2], [resumed, resumed], [PEER, b"10.0.0.1 80"])
    msg = {
        "cut in a length byte": wire.encode_handoff([1, 2], [resumed, resumed], [PEER, b""])[:-1],
        "cut in an address": good[:-3],
        "a byte too many": good + b"\x00",
        "trailing with no resumed": wire.encode_handoff([1], [socket.AF_INET]) + b"\x00",
        "an address too many": wire.encode_handoff([1], [resumed], [PEER, PEER]),
    }[bad]
    with pytest.raises(wire.ProtocolError):
        wire.decode_handoff(msg)


def test_return_round_trips_and_rejects_garbage():
    assert wire.decode_return(wire.encode_return(socket.AF_INET, PEER)) == (socket.AF_INET, PEER)
    assert wire.decode_return(wire.encode_return(socket.AF_INET6)) == (socket.AF_INET6, b"")
    assert wire.decode_return(wire.encode_return(socket.AF_UNIX, b"y" * 255)) == (socket.AF_UNIX, b"y" * 255)
    assert wire.encode_return(socket.AF_INET)[0] == wire.RETURN
    for bad in (b"", bytes((wire.RETURN,)),  # no family
                bytes((wire.RETURN, socket.AF_INET | wire.RESUMED)),  # a RESUMED family: never in a RETURN
                wire.encode_return(socket.AF_INET, b"z" * 256)):  # an address longer than a handoff can carry
        with pytest.raises(wire.ProtocolError):
            wire.decode_return(bad)


def test_peer_text_round_trips():
    assert wire.unpack_peer(wire.pack_peer(("192.0.2.7", 4242))) == ("192.0.2.7", 4242)
    assert wire.unpack_peer(wire.pack_peer(("2001:db8::1", 80))) == ("2001:db8::1", 80)
    assert wire.pack_peer(None) == b"" and wire.unpack_peer(b"") is None
    assert len(wire.pack_peer(("h" * 400, 1))) == 255


# ---- Parking on real loopback TCP connections ----------------------------------------------------------------


def turn(loop: asyncio.AbstractEventLoop, seconds: float = 0.0) -> None:
    """One pass of the loop (waiting up to seconds for an fd)."""
    loop.run_until_complete(asyncio.sleep(seconds))


def turn_until(loop, cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        turn(loop, 0.005)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lot():
    """(loop, parking, dispatched items, connect()) with a fake clock for Parked.since; everything closed after."""
    loop = asyncio.new_event_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    clock = Clock()
    real_time = parking.time
    parking.time = types.SimpleNamespace(monotonic=clock)
    dispatched: list[tuple[int, int]] = []
    peers: dict[int, bytes] = {}
    lot = Parking(loop, dispatched.extend, peers, IDLE_TIMEOUT)
    lot.clock = clock
    clients: list[socket.socket] = []
    taken: list[int] = []

    def connect(peer: bytes = PEER) -> tuple[socket.socket, int]:
        """A client connection whose server end is parked (as a worker's RETURN brings it); (client, fd)."""
        client = socket.create_connection(listener.getsockname())
        client.setblocking(False)
        clients.append(client)
        server, _ = listener.accept()
        fd = server.detach()
        taken.append(fd)
        lot.park(fd, socket.AF_INET, peer)
        return client, fd

    try:
        yield loop, lot, dispatched, connect
    finally:
        parking.time = real_time
        lot.close_all()
        wire.close_all([fd for fd, _ in dispatched])
        for client in clients:
            client.close()
        listener.close()
        loop.close()


def eof(client: socket.socket) -> bool:
    """True once the server end is closed (EOF or reset); False while it is open and silent."""
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def watched(loop, fd: int) -> bool:
    try:
        loop._selector.get_key(fd)
        return True
    except KeyError:
        return False


def test_a_parked_connection_is_dispatched_once_resumed_when_its_client_sends(lot):
    loop, lot, dispatched, connect = lot
    client, fd = connect()
    assert watched(loop, fd) and fd in lot.parked and lot.returned == 1
    turn(loop, 0.05)
    assert not dispatched, "dispatched before its client sent anything"
    client.send(REQUEST[:10])
    turn_until(loop, lambda: dispatched)
    assert dispatched == [(fd, socket.AF_INET | wire.RESUMED)]
    assert lot.peers == {fd: PEER} and not lot.parked and not watched(loop, fd)
    assert (lot.returned, lot.resumed, lot.expired, lot.ended) == (1, 1, 0, 0)
    client.send(REQUEST[10:])  # more of the request: the master no longer looks at it
    turn(loop, 0.05)
    turn(loop, 0.05)
    assert len(dispatched) == 1
    # Every byte the client sent is still in the kernel, for the worker the fd goes to: exactly those.
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, os.dup(fd))
    server.setblocking(False)
    got = b""
    deadline = time.monotonic() + 5
    while got != REQUEST and time.monotonic() < deadline:
        try:
            got += server.recv(4096)
        except BlockingIOError:
            time.sleep(0.005)
    assert got == REQUEST
    with pytest.raises(BlockingIOError):
        server.recv(1)
    server.sendall(b"HTTP/1.1 200 OK\r\n\r\n")  # the connection works both ways
    server.close()
    client.setblocking(True)
    client.settimeout(5)
    assert client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"


def test_a_client_that_closes_while_parked_is_closed_and_counted_never_dispatched(lot):
    loop, lot, dispatched, connect = lot
    half, half_fd = connect()
    gone, _ = connect(b"")
    reset, _ = connect(b"")
    stays, stays_fd = connect()
    half.shutdown(socket.SHUT_WR)  # FIN: a peek reads nothing
    gone.close()
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()  # RST: the peek fails
    turn_until(loop, lambda: lot.ended == 3)
    assert not dispatched and list(lot.parked) == [stays_fd]
    assert (lot.returned, lot.resumed, lot.expired, lot.ended) == (4, 0, 0, 3)
    assert eof(half), "the master kept the half-closed connection open"
    assert not watched(loop, half_fd)
    assert not eof(stays)


def test_expire_closes_only_those_parked_longer_than_the_timeout_oldest_first(lot):
    loop, lot, dispatched, connect = lot
    clock = lot.clock
    first, first_fd = connect()
    clock.now += 1.0
    second, second_fd = connect()
    clock.now += 1.0
    third, third_fd = connect()
    start = clock.now - 2.0
    lot.expire(start + IDLE_TIMEOUT - 0.01)  # none has been idle that long
    assert len(lot.parked) == 3 and lot.expired == 0
    lot.expire(start + IDLE_TIMEOUT + 0.5)  # the first only
    assert list(lot.parked) == [second_fd, third_fd] and lot.expired == 1
    lot.expire(start + 1.0 + IDLE_TIMEOUT)  # the second, exactly at its timeout
    assert list(lot.parked) == [third_fd] and lot.expired == 2
    turn(loop, 0.02)
    assert eof(first) and eof(second) and not eof(third)
    assert not watched(loop, first_fd) and not watched(loop, second_fd) and watched(loop, third_fd)
    assert not dispatched and (lot.returned, lot.resumed, lot.expired, lot.ended) == (3, 0, 2, 0)
    assert lot.returned == lot.resumed + len(lot.parked) + lot.expired + lot.ended


def test_release_all_dispatches_everything_parked_and_leaves_nothing_watched(lot):
    loop, lot, dispatched, connect = lot
    conns = [connect(peer) for peer in (PEER, b"", b"10.0.0.9 1")]
    lot.release_all()
    assert dispatched == [(fd, socket.AF_INET | wire.RESUMED) for _, fd in conns]
    assert lot.peers == {conns[0][1]: PEER, conns[1][1]: b"", conns[2][1]: b"10.0.0.9 1"}
    assert not lot.parked and not any(watched(loop, fd) for _, fd in conns)
    for client, _ in conns:
        client.send(b"x")
    turn(loop, 0.05)
    assert len(dispatched) == 3 and not any(eof(client) for client, _ in conns), "released fds must stay open"
    lot.release_all()  # nothing parked: nothing dispatched
    assert len(dispatched) == 3


def test_close_all_closes_every_parked_connection(lot):
    _, lot, dispatched, connect = lot
    conns = [connect() for _ in range(2)]
    lot.close_all()
    assert not lot.parked and not dispatched and all(eof(client) for client, _ in conns)


def test_parking_what_is_not_a_socket_closes_it(lot):
    _, lot, _, _ = lot
    r, w = os.pipe()
    try:
        lot.park(r, socket.AF_INET, PEER)
        assert not lot.parked and (lot.returned, lot.ended) == (1, 1)
        with pytest.raises(OSError):
            os.fstat(r)
    finally:
        os.close(w)


# ---- the supervisor reading RETURN messages -----------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def channel():
    """(supervisor, record, worker end, returns): a real Supervisor and one fake worker's channel to it."""
    loop = asyncio.new_event_loop()
    returns: list[tuple] = []

    async def make():
        sup = Supervisor(Config(workers=1), Dispatcher(8), lambda: None, spawn=None)
        return sup, *make_worker(0, 0, 1 << 30, 0.0, lambda fake, inodes: None)

    sup, record, fake = loop.run_until_complete(make())
    sup.on_return = lambda link, fd, family, peer: returns.append((link, fd, family, peer))
    try:
        yield sup, record, fake.sock, returns
    finally:
        wire.close_all([fd for _, fd, _, _ in returns])
        fake.release()
        record.channel.close()
        os.close(record.exit_fd)
        os.close(record.board_fd)
        loop.close()


def test_a_return_with_one_fd_goes_to_on_return(channel):
    sup, record, worker_end, returns = channel
    a, b = socket.socketpair()
    try:
        wire.send_fds(worker_end, wire.encode_return(socket.AF_UNIX, PEER), [a.fileno()])
        assert sup._read_channel(record) is True
        (link, fd, family, peer), = returns
        assert link is record.link and family == socket.AF_UNIX and peer == PEER
        assert fd != a.fileno() and os.fstat(fd).st_ino == os.fstat(a.fileno()).st_ino
        assert record.link.returned == 1 and not record.proc.worker.signals
    finally:
        a.close()
        b.close()


def test_a_return_without_on_return_is_closed(channel):
    sup, record, worker_end, _ = channel
    sup.on_return = None
    a, b = socket.socketpair()
    try:
        before = fd_count()
        wire.send_fds(worker_end, wire.encode_return(socket.AF_UNIX), [a.fileno()])
        assert sup._read_channel(record) is True
        assert fd_count() == before
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("case", ["return with two fds", "beat with an fd", "ready with an fd", "refuse with an fd",
                                  "return past the fd room", "return with a resumed family"])
def test_fds_other_than_one_with_a_return_are_closed(channel, case):
    sup, record, worker_end, returns = channel
    pairs = [socket.socketpair() for _ in range(70 if case == "return past the fd room" else 2)]
    fds = [a.fileno() for a, _ in pairs]
    try:
        before = fd_count()
        msg, fds = {
            "return with two fds": (wire.encode_return(socket.AF_UNIX), fds),
            "beat with an fd": (wire.encode_json(wire.BEAT, {"open": 0}), fds[:1]),
            "ready with an fd": (wire.encode_json(wire.READY, {"pid": 1}), fds[:1]),
            "refuse with an fd": (wire.encode_refuse([]), fds[:1]),
            "return past the fd room": (wire.encode_return(socket.AF_UNIX), fds),  # truncated: MSG_CTRUNC
            "return with a resumed family": (bytes((wire.RETURN, socket.AF_UNIX | wire.RESUMED)), fds[:1]),
        }[case]
        wire.send_fds(worker_end, msg, fds)
        alive = sup._read_channel(record)
        assert fd_count() == before, f"{fd_count() - before} fds leaked into the master"
        assert not returns and record.link.returned == 0
        if case == "return with a resumed family":  # a message that does not parse: the worker is killed
            assert alive is False and record.proc.worker.signals
        else:
            assert alive is True and not record.proc.worker.signals
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_return_whose_fd_did_not_make_it_is_ignored(channel):
    sup, record, worker_end, returns = channel
    worker_end.send(wire.encode_return(socket.AF_UNIX, PEER))
    assert sup._read_channel(record) is True
    assert not returns and record.link.returned == 0 and not record.proc.worker.signals


def told(fake) -> list[int] | None:
    """The number of boards in each PEERS message waiting for this fake worker (None: no message); fds closed."""
    got = []
    while True:
        try:
            msg, fds, _ = wire.recv_message(fake.sock)
        except BlockingIOError:
            return got or None
        wire.close_all(fds)
        assert msg[:1] == bytes((wire.PEERS,)), msg
        got.append(len(fds))


def test_peers_are_told_only_while_every_ready_worker_takes_a_resumed_handoff():
    """Each rebalancing worker gets the other ready workers' boards; while one ready worker cannot read a resumed
    hand-off (an older release's, kept by an in-place upgrade) every worker gets none, so none gives a connection
    back that could be handed to it; once that one drains, the boards go out."""
    loop = asyncio.new_event_loop()

    async def make():
        sup = Supervisor(Config(workers=3), Dispatcher(8), lambda: None, spawn=None)
        return sup, [make_worker(slot, 0, 1000 + slot, 0.0, lambda fake, inodes: None) for slot in range(3)]

    sup, made = loop.run_until_complete(make())
    try:
        for record, _ in made:
            record.phase, record.rebalances = Phase.READY, True
            sup.table[record.pid] = record
        (_, fake0), (_, fake1), (old, old_fake) = made
        old.rebalances = False
        sup.tell_peers()
        assert (told(fake0), told(fake1), told(old_fake)) == ([0], [0], None)
        sup.tell_peers()  # nothing changed: nothing sent again
        assert (told(fake0), told(fake1)) == (None, None)
        old.phase = Phase.DRAINING
        sup.tell_peers()
        assert (told(fake0), told(fake1), told(old_fake)) == ([1], [1], None)
        old.phase, old.rebalances = Phase.READY, True  # every ready one rebalances: each gets the two others'
        sup.tell_peers()
        assert (told(fake0), told(fake1), told(old_fake)) == ([2], [2], [2])
    finally:
        for record, fake in made:
            fake.release()
            record.channel.close()
            os.close(record.exit_fd)
            os.close(record.board_fd)
        loop.close()


# ---- the dispatcher carrying a resumed connection's client address ---------------------------------------------


def links(d: Dispatcher, n: int) -> list[Link]:
    out = []
    for slot in range(n):
        master_end, worker_end = wire.channel_pair()
        link = Link(slot, master_end)
        link.peer = worker_end
        link.ready = True
        out.append(link)
    d.set_links(list(out))
    return out


def received(link: Link) -> list[tuple[list[int], list[int], list[bytes], list[int]]]:
    """Every handoff waiting at the worker's end: (ids, families, peers, inodes); its fds closed."""
    out = []
    while (got := wire.receive(link.peer)) not in (None, wire.END):
        msg, fds, truncated = got
        assert not truncated and msg[0] == wire.HANDOFF
        ids, families, peers = wire.decode_handoff(msg)
        out.append((ids, families, peers, [os.fstat(fd).st_ino for fd in fds]))
        wire.close_all(fds)
    return out


def ack_all(link: Link) -> None:
    link.board[board.HANDLED] = board.pack(link.sent_msgs, link.refused_seen)


def test_a_resumed_connection_reaches_the_worker_with_its_peer_and_the_entry_goes_at_the_ack():
    d = Dispatcher(cap=8, hold=False)
    link, = links(d, 1)
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        fds = [os.dup(a.fileno()) for a, _ in pairs]
        inodes = [os.fstat(fd).st_ino for fd in fds]
        d.peers[fds[1]] = PEER
        d.peers[fds[2]] = b""
        d.dispatch([(fds[0], socket.AF_UNIX), (fds[1], socket.AF_UNIX | wire.RESUMED),
                    (fds[2], socket.AF_UNIX | wire.RESUMED)])
        (ids, families, peers, got), = received(link)
        assert families == [socket.AF_UNIX, socket.AF_UNIX | wire.RESUMED, socket.AF_UNIX | wire.RESUMED]
        assert peers == [PEER, b""] and got == inodes and len(ids) == 3
        assert link.resumed == 2 and link.dispatched == 3
        assert set(d.peers) == {fds[1], fds[2]}, "dropped before the worker acked"
        ack_all(link)
        d.collect(link)
        assert d.peers == {} and not link.unacked and link.acked_total == 3
        for fd in fds:  # the master's copies are closed
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        link.channel.close()
        link.peer.close()


def test_a_refused_resumed_connection_goes_to_another_worker_with_its_peer():
    d = Dispatcher(cap=8, hold=False)
    first, second = links(d, 2)
    a, b = socket.socketpair()
    try:
        fd = os.dup(a.fileno())
        d.peers[fd] = PEER
        second.ready = False  # everything to the first
        d.dispatch([(fd, socket.AF_UNIX | wire.RESUMED)])
        (ids, _, peers, _), = received(first)
        assert peers == [PEER]
        second.ready = True
        first.ready = False  # it drains: it refuses
        d.on_refuse(first, ids)
        (_, families, peers, inodes), = received(second)
        assert families == [socket.AF_UNIX | wire.RESUMED] and peers == [PEER]
        assert inodes == [os.fstat(a.fileno()).st_ino] and d.peers == {fd: PEER}
        ack_all(second)
        d.collect(second)
        assert d.peers == {}
    finally:
        a.close()
        b.close()
        for link in (first, second):
            link.channel.close()
            link.peer.close()


def test_a_resumed_connection_without_a_recorded_peer_still_reaches_the_worker_decodable():
    """A RESUMED family always travels with an address (b"" when none is known): with no entry in peers at all
    (the dispatcher's peers empty, as in a new image after an upgrade that took such a connection from the bridge's
    report), the hand-off must still decode at the worker."""
    d = Dispatcher(cap=8, hold=False)
    link, = links(d, 1)
    a, b = socket.socketpair()
    try:
        d.dispatch([(os.dup(a.fileno()), socket.AF_UNIX | wire.RESUMED)])
        (_, families, peers, _), = received(link)  # ProtocolError: "handoff's client addresses are cut short"
        assert families == [socket.AF_UNIX | wire.RESUMED] and peers == [b""]
    finally:
        d.evict(link)
        d.set_links([])
        d.close_homeless()
        a.close()
        b.close()
        link.channel.close()
        link.peer.close()


# ---- the master's wiring: parked connections reach a worker before the drain / the exec ------------------------


def busy_cpu_bound(link: Link) -> None:
    """The board of a worker running one CPU-bound request (the case where workers give connections back, and
    where the dispatcher's hold keeps new ones in the master)."""
    link.board[board.STARTED] = 1
    link.board[board.CPU_NS] = 10_000_000
    link.board[board.RUNNABLE_PER_MILLE] = 1000


@pytest.fixture
def master():
    """A Master (not run) with one READY worker link that is busy with a CPU-bound request, and its Parking."""
    from balancer.master import Master

    loop = asyncio.new_event_loop()
    m = Master(Config(workers=1))
    link, = links(m.dispatcher, 1)
    busy_cpu_bound(link)
    m.parking = Parking(loop, m._dispatch_resumed, m.dispatcher.peers, IDLE_TIMEOUT)
    pairs = []

    def park(n: int) -> list[int]:
        inodes = []
        for _ in range(n):
            a, b = socket.socketpair()
            pairs.append((a, b))
            fd = os.dup(a.fileno())
            inodes.append(os.fstat(fd).st_ino)
            m.parking.park(fd, socket.AF_UNIX, b"")
        return inodes

    try:
        yield loop, m, link, park
    finally:
        m.parking.close_all()
        if m.dispatcher.holding is not None:
            wire.close_all([fd for fd, _ in m.dispatcher.holding.release_all()])
        m.dispatcher.evict(link)
        m.dispatcher.set_links([])
        m.dispatcher.close_homeless()
        received(link)
        link.channel.close()
        link.peer.close()
        for a, b in pairs:
            a.close()
            b.close()
        loop.close()


def handed_to(link: Link) -> list[int]:
    return [os.fstat(fd).st_ino for fd, _ in link.unacked.values()]


def test_an_upgrade_quiesces_only_once_every_parked_connection_is_with_a_worker(master):
    """Upgrader.quiesce releases the parked connections and reports quiet once nothing is unacked or homeless;
    a released one the dispatcher's hold kept in the master is neither, and crosses no exec (with the bridge it
    is handed out by the bridge, and a failed exec hands it out a second time from the old image's holding)."""
    loop, m, link, park = master
    inodes = park(2)

    async def scenario():
        quiesce = asyncio.ensure_future(m.upgrader.quiesce())
        for _ in range(2000):  # its first turn hands them out (or holds them)
            await asyncio.sleep(0.001)
            if link.sent or m.dispatcher.holding.items:
                break
        handed, held = handed_to(link), len(m.dispatcher.holding.items)
        link.board[board.HANDLED] = board.pack(link.sent_msgs, 0)  # the worker takes them
        return await asyncio.wait_for(quiesce, 30), handed, held

    quiet, handed, held = loop.run_until_complete(scenario())
    assert quiet and not m.parking.parked
    assert held == 0 and sorted(handed) == sorted(inodes), \
        f"quiesced with {held} released connections held in the master, {len(handed)} handed to a worker"


def test_a_stop_hands_every_parked_connection_to_a_worker_before_the_drain(master):
    """Master.shutdown releases the parked connections before the supervisor drains the workers, so that they are
    served (a draining worker answers what it was handed before its DRAIN). One the hold keeps in the master goes
    nowhere once the drain began: it waits there, unwatched, and is closed at the end, its next request unanswered."""
    loop, m, link, park = master
    inodes = park(2)
    at_drain = {}

    class Supervisor:
        def tick(self):
            pass

        async def shutdown(self):
            at_drain["handed"] = handed_to(link)
            at_drain["held"] = len(m.dispatcher.holding.items)

    m.supervisor = Supervisor()
    loop.run_until_complete(m.shutdown())
    assert at_drain["held"] == 0 and sorted(at_drain["handed"]) == sorted(inodes), \
        f"at the drain: {at_drain['held']} released connections held in the master, " \
        f"{len(at_drain['handed'])} handed to a worker"


def test_the_master_parks_a_returned_connection_and_closes_one_returned_during_a_stop(master):
    _, m, link, _ = master
    a, b = socket.socketpair()
    try:
        fd = os.dup(a.fileno())
        m._on_return(link, fd, socket.AF_UNIX, PEER)
        assert list(m.parking.parked) == [fd] and m.parking.parked[fd].peer == PEER
        m.draining = True  # the workers drain: none takes a connection any more
        late = os.dup(a.fileno())
        m._on_return(link, late, socket.AF_UNIX, PEER)
        assert list(m.parking.parked) == [fd] and m.parking.returned == 2 and m.parking.expired == 1
        with pytest.raises(OSError):
            os.fstat(late)
    finally:
        a.close()
        b.close()
