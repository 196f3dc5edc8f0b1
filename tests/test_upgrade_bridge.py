"""The upgrade bridge on real sockets and a real fork: every connection it accepts comes back exactly once."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from balancer import board, upgrade_bridge, wire
from balancer.dispatch import Dispatcher, Link
from balancer.listeners import Listener

pytestmark = pytest.mark.timeout(60)


class Pool:
    """Two workers' channels and boards, the test playing the workers; a listener; a master-shaped object."""

    def __init__(self, cap: int = 1000, max_unacked: int = 256) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.listener = Listener(self.sock, "127.0.0.1")
        self.dispatcher = Dispatcher(cap, max_unacked)
        self.ends, self.boards, self.links, self.records = [], [], [], []
        for slot, pid in enumerate((1001, 1002)):
            master_end, worker_end = wire.channel_pair()
            _, words = board.create()
            link = Link(slot, master_end, words)
            link.ready = True
            self.ends.append(worker_end)
            self.boards.append(words)
            self.links.append(link)
            self.records.append(SimpleNamespace(pid=pid, link=link))
        self.dispatcher.set_links(self.links)
        self.master = SimpleNamespace(listeners=[self.listener], dispatcher=self.dispatcher,
                                      supervisor=SimpleNamespace(records=lambda: self.records))
        self.got: list[dict[int, int]] = [{}, {}]  # per worker: conn id -> its copy of the fd
        self.messages = [0, 0]

    def read(self, slot: int) -> None:
        """Take in what reached one worker (its hand-off messages), without acknowledging."""
        while (msg := wire.receive(self.ends[slot])) not in (None, wire.END):
            payload, fds, _ = msg
            ids, _, _ = wire.decode_handoff(payload)
            self.got[slot].update(zip(ids, fds))
            self.messages[slot] += 1

    def ack(self, slot: int) -> None:
        """The worker handled every message it read (its board's word 0)."""
        self.boards[slot][board.HANDLED] = board.pack(self.messages[slot], 0)

    def wait_handed(self, total: int, ack: tuple[int, ...] = ()) -> None:
        """Read both workers (acknowledging the slots in ack as they go) until total connections came."""
        deadline = time.monotonic() + 20
        while sum(map(len, self.got)) < total:
            assert time.monotonic() < deadline, [len(g) for g in self.got]
            select.select(self.ends, [], [], 0.05)
            for slot in (0, 1):
                self.read(slot)
                if slot in ack:
                    self.ack(slot)


def connect(pool: Pool, n: int) -> list[socket.socket]:
    clients = []
    for _ in range(n):
        c = socket.create_connection(pool.sock.getsockname(), timeout=10)
        clients.append(c)
    return clients


def peer(fd: int) -> tuple:
    """The client address of an accepted fd (a duplicate's too)."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        return s.getpeername()
    finally:
        s.close()


def test_connections_go_out_while_bridged_and_the_unacknowledged_come_back_once():
    pool = Pool()
    pid, control = upgrade_bridge.start(pool.master)
    clients = connect(pool, 120)
    pool.wait_handed(120, ack=(0,))  # worker 0 acknowledges, worker 1 never does
    report, fds, why = upgrade_bridge.stop(pid, control)
    assert why == "" and report["accepted"] == 120 and report["accept_errors"] == {}
    assert len(pool.got[0]) > 0 and len(pool.got[1]) > 0  # both workers were given connections
    # The unacknowledged ones come back, with the bridge's copies of their fds: the same connections.
    (item1,) = [item for item in report["links"] if item["pid"] == 1002]
    assert sorted(conn_id for conn_id, _ in item1["unacked"]) == sorted(pool.got[1])
    assert len(fds) == len(pool.got[1]) == report["fds"]
    assert sorted(map(peer, fds)) == sorted(map(peer, pool.got[1].values()))
    (item0,) = [item for item in report["links"] if item["pid"] == 1001]
    assert item0["unacked"] == [] and item0["sent"] == [] and item0["acked_total"] == len(pool.got[0])
    # The next owner's links take them in: once worker 1 acknowledges, its copies close and count as acked.
    links = {1001: Link(0, pool.links[0].channel, pool.boards[0]), 1002: Link(1, pool.links[1].channel, pool.boards[1])}
    d = Dispatcher(1000)
    d.set_links(list(links.values()))
    assert upgrade_bridge.take_back(report, fds, d, links) == 120
    assert set(links[1002].unacked) == set(pool.got[1]) and links[1002].sent_msgs == pool.messages[1]
    assert links[1001].sent_msgs == pool.messages[0] and links[1001].acked_total == len(pool.got[0])
    assert d._next_id >= max(max(pool.got[0]), max(pool.got[1]))
    pool.ack(1)
    d.collect_all()
    assert links[1002].unacked == {} and links[1002].acked_total == len(pool.got[1])
    for fd in fds:  # closed by collect: the worker's copies are the only ones left
        with pytest.raises(OSError):
            os.fstat(fd)
    for c in clients:
        c.close()


def test_a_worker_whose_channel_is_gone_gets_nothing_and_its_share_goes_to_the_other():
    pool = Pool()
    pool.ends[1].close()  # worker 1 died: sends to it fail, and what they carried goes to worker 0
    pid, control = upgrade_bridge.start(pool.master)
    clients = connect(pool, 40)
    deadline = time.monotonic() + 20
    while len(pool.got[0]) < 40:
        assert time.monotonic() < deadline, len(pool.got[0])
        select.select([pool.ends[0]], [], [], 0.05)
        pool.read(0)
    report, fds, why = upgrade_bridge.stop(pid, control)
    assert why == "" and report["accepted"] == 40
    (item1,) = [item for item in report["links"] if item["pid"] == 1002]
    assert item1["channel_lost"] and item1["unacked"] == []
    assert len(fds) == 40 and sorted(map(peer, fds)) == sorted(map(peer, pool.got[0].values()))
    assert sorted(map(peer, fds)) == sorted(c.getsockname() for c in clients)  # each one exactly once
    wire.close_all(fds)
    for c in clients:
        c.close()


def test_a_report_longer_than_a_message_with_more_fds_than_one_message_carries():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(2 * upgrade_bridge.MAX_FDS + 7)]
    report = {"links": [], "homeless": [socket.AF_INET] * len(opened), "next_id": 9, "redispatched": 0,
              "accepted": len(opened), "accept_errors": {}, "started": 0.0, "stopped": 0.0,
              "fds": len(opened), "padding": "x" * (3 * upgrade_bridge.CHUNK)}
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # the pid stop() reaps

    def bridge() -> None:
        assert right.recv(16) == upgrade_bridge.STOP
        upgrade_bridge.send_report(right, report, opened)

    t = threading.Thread(target=bridge)
    t.start()
    got, fds, why = upgrade_bridge.stop(child.pid, left)
    t.join(10)
    assert why == "" and got == json.loads(json.dumps(report))
    assert len(fds) == len(opened) and all(os.path.samestat(os.fstat(a), os.fstat(b)) for a, b in zip(fds, opened))
    d = Dispatcher(10)
    assert upgrade_bridge.take_back(got, fds, d, {}) == len(opened)
    assert [fd for fd, _ in d.homeless] == fds and d._next_id == 9
    wire.close_all(fds + opened)
    right.close()


def test_a_bridge_that_ended_without_a_report_is_said_so_and_reaped():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    right.close()
    report, fds, why = upgrade_bridge.stop(child.pid, left)
    assert report is None and fds == [] and "report" in why and "wait status 0x300" in why, why
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)


def test_the_pause_counts_only_the_time_nobody_accepted():
    report = {"started": 10.004, "stopped": 10.150}
    assert upgrade_bridge.paused_seconds(report, 10.0, 10.155) == pytest.approx(0.009)
    assert upgrade_bridge.paused_seconds(None, 10.0, 10.155) == pytest.approx(0.155)
