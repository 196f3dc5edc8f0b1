"""Protocol tests: a real worker process driven over a real SEQPACKET socketpair by the test as master."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from balancer import board, wire
from balancer.config import Config
from tests.harness import HERE, fd_count

pytestmark = pytest.mark.timeout(60)


class FakeMaster:
    """The test plays the master: owns the channel and a listening socket whose fds it hands over."""

    def __init__(self, backend: str = "testapp:create_app", worker_sndbuf: int = 0, **overrides) -> None:
        self.channel, worker_end = wire.channel_pair()
        if worker_sndbuf:
            worker_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, worker_sndbuf)
        board_fd, self.board = board.create()
        settings = dict(Config(backend=backend, app_dir=str(HERE / "apps"), **overrides).worker_settings(), slot=0)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balancer_workers", "--channel-fd", str(worker_end.fileno()), "--board-fd", str(board_fd),
             "--master-pid", str(os.getpid()), "--settings", json.dumps(settings)],
            pass_fds=(worker_end.fileno(), board_fd), stderr=subprocess.PIPE, text=True,
        )
        worker_end.close()
        os.close(board_fd)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.next_id = 100
        self.sent = 0  # handoff messages sent, well-formed or not: the worker counts each one

    def wait_board(self, refused: int = 0, closed: int | None = None, timeout: float = 15.0) -> None:
        """Wait until the board acks every handoff sent (with `refused` of them refused) and `closed` closes."""
        deadline = time.monotonic() + timeout
        want = (self.sent, refused, closed)
        while True:
            handled, got_refused = board.unpack(self.board[board.HANDLED])
            got = (handled, got_refused, self.board[board.CLOSED] if closed is not None else None)
            if got == want:
                return
            assert handled <= self.sent and got_refused <= refused and (closed is None or got[2] <= closed), \
                f"board {got}, expected {want}"
            assert time.monotonic() < deadline, f"board {got}, expected {want} within {timeout}s"
            time.sleep(0.002)  # the board is memory: nothing to wait on but the worker's next store

    def recv(self, kinds=(wire.REFUSE, wire.READY, wire.BOOT_ERROR), timeout=15.0) -> bytes:
        """The next message of one of kinds (heartbeats and others are skipped); b'' on EOF."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no message of {kinds} within {timeout}s"
            if not select.select([self.channel], [], [], left)[0]:
                continue
            msg, fds, _ = wire.recv_message(self.channel)
            wire.close_all(fds)
            if not msg or msg[0] in kinds:
                return msg

    def wait_ready(self) -> dict:
        msg = self.recv((wire.READY, wire.BOOT_ERROR))
        assert msg[0] == wire.READY, wire.decode_json(msg)
        return wire.decode_json(msg)

    def connection(self) -> tuple[socket.socket, socket.socket]:
        """(client, accepted server side) of a fresh loopback TCP connection."""
        client = socket.create_connection(self.listener.getsockname(), timeout=10)
        server, _ = self.listener.accept()
        return client, server

    def handoff(self, socks: list[socket.socket]) -> list[int]:
        ids = list(range(self.next_id, self.next_id + len(socks)))
        self.next_id += len(socks)
        wire.send_fds(self.channel, wire.encode_handoff(ids, [s.family for s in socks]), [s.fileno() for s in socks])
        self.sent += 1
        return ids

    def close(self) -> None:
        self.channel.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.listener.close()


@pytest.fixture
def master():
    m = FakeMaster()
    m.wait_ready()
    yield m
    m.close()


def get(client: socket.socket, path: str = "/") -> bytes:
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_handoff_is_acked_then_served(master):
    client, server = master.connection()
    client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")  # bytes waiting before handoff
    master.handoff([server])
    master.wait_board()  # acked on the board
    server.close()  # the master closes its copy on ack; the worker's copy serves the client
    data = b"".join(iter(lambda: client.recv(65536), b""))
    assert data.startswith(b"HTTP/1.1 200") and f"X-Worker-Pid: {master.proc.pid}".encode() in data
    master.wait_board(closed=1)
    client.close()


def test_batch_of_fds_in_one_message(master):
    pairs = [master.connection() for _ in range(wire.MAX_FDS_PER_MSG)]
    master.handoff([s for _, s in pairs])
    master.wait_board()
    for client, server in pairs:
        server.close()
    for client, _ in pairs:
        assert get(client).startswith(b"HTTP/1.1 200")
        client.close()


def test_refuses_while_draining_and_master_keeps_the_fd(master):
    busy_client, busy_server = master.connection()
    master.handoff([busy_server])
    master.wait_board()
    busy_server.close()
    busy_client.sendall(b"GET /slow?s=1.5 HTTP/1.1\r\nHost: t\r\n\r\n")  # keep-alive request in flight
    master.recv((wire.BEAT,))  # the worker's loop has started the request by its next heartbeat
    master.channel.send(bytes((wire.DRAIN,)))
    client, server = master.connection()
    ids = master.handoff([server])
    msg = master.recv((wire.REFUSE,))
    assert wire.decode_refuse(msg) == ids
    master.wait_board(refused=1)
    client.sendall(b"ping")  # our copy is intact: another worker could serve it
    assert server.recv(4) == b"ping"
    client.close()
    server.close()
    data = b"".join(iter(lambda: busy_client.recv(65536), b""))  # in-flight request finishes, then close
    assert data.startswith(b"HTTP/1.1 200") and b"Connection: close" in data and data.endswith(b"slow done\n")
    busy_client.close()
    assert master.proc.wait(10) == 0


def test_truncated_fds_are_all_closed_and_refused(master):
    baseline = fd_count(master.proc.pid)
    pairs = [master.connection() for _ in range(wire.MAX_FDS_PER_MSG + 6)]
    ids = master.handoff([s for _, s in pairs])  # more fds than the worker has room for: MSG_CTRUNC
    msg = master.recv()
    assert msg[0] == wire.REFUSE and wire.decode_refuse(msg) == ids
    master.wait_board(refused=1)
    assert fd_count(master.proc.pid) == baseline
    for client, server in pairs:  # still ours: the worker never touched them
        client.sendall(b"x")
        assert server.recv(1) == b"x"
        client.close()
        server.close()


def test_garbage_message_does_not_kill_the_worker(master):
    master.channel.send(b"\x7fgarbage")
    wire.send_fds(master.channel, b"H\x05", [os.open("/dev/null", os.O_RDONLY)])  # short handoff with an fd
    master.sent += 1  # counted as handled, so the numbering of later handoffs stays in step
    client, server = master.connection()
    master.handoff([server])
    master.wait_board()
    server.close()
    assert get(client).startswith(b"HTTP/1.1 200")
    client.close()
    assert master.proc.poll() is None


def test_no_fd_leaks_after_many_connections(master):
    def batch():
        pairs = [master.connection() for _ in range(40)]
        master.handoff([s for _, s in pairs])
        master.wait_board()
        for client, server in pairs:
            server.close()
        for client, _ in pairs:
            assert get(client).startswith(b"HTTP/1.1 200")
            client.close()

    batch()  # warm-up: the loop opens one /dev/null fd lazily on first use, once
    master.wait_board(closed=40)
    test_before = fd_count(os.getpid())
    worker_before = fd_count(master.proc.pid)
    for _ in range(5):
        batch()
    master.wait_board(closed=240)
    assert fd_count(os.getpid()) == test_before
    deadline = time.monotonic() + 10
    while fd_count(master.proc.pid) != worker_before and time.monotonic() < deadline:
        master.recv((wire.BEAT,))  # wait a heartbeat, not a fixed sleep
    assert fd_count(master.proc.pid) == worker_before


def test_worker_exits_when_channel_closes(master):
    master.channel.close()
    assert master.proc.wait(10) == 0


def test_boot_error_message_and_exit_code():
    m = FakeMaster(backend="broken_import:app")
    msg = m.recv((wire.READY, wire.BOOT_ERROR))
    assert msg[0] == wire.BOOT_ERROR
    assert "RuntimeError: database URL not configured" in wire.decode_json(msg)
    assert m.proc.wait(10) == 3
    m.close()


def test_ready_reports_the_c_http_parser():
    m = FakeMaster()
    body = m.wait_ready()
    assert body["pid"] == m.proc.pid
    assert body["c_parser"] is True, "aiohttp's C parser must be in use (the Python one accepts 'chunked, chunked')"
    m.close()


def test_handoffs_queued_when_the_master_died_are_still_served(master):
    """The master dies with our reports unread: the worker's next recvmsg fails with ECONNRESET, then returns
    what the master had sent. Those fds are now the worker's only copies: it must read on and serve them."""
    assert select.select([master.channel], [], [], 5)[0], "no heartbeat queued"  # left unread on purpose
    os.kill(master.proc.pid, signal.SIGSTOP)  # so that the handoff is still queued when our end closes
    try:
        client, server = master.connection()
        client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        master.handoff([server])
        server.close()
        master.channel.close()
    finally:
        os.kill(master.proc.pid, signal.SIGCONT)
    client.settimeout(10)
    data = b"".join(iter(lambda: client.recv(65536), b""))
    assert data.startswith(b"HTTP/1.1 200") and f"X-Worker-Pid: {master.proc.pid}".encode() in data
    client.close()
    assert master.proc.wait(10) == 0


def beats_until_eof(m: FakeMaster, timeout: float = 15.0) -> list[dict]:
    """Every heartbeat body the worker sends until it closes its end."""
    out = []
    while msg := m.recv((wire.BEAT,), timeout):
        out.append(wire.decode_json(msg))
    return out


def test_drain_ends_with_a_final_heartbeat_counting_every_request(master):
    master.recv((wire.BEAT,))  # just after a beat: the requests below come after it
    for _ in range(5):
        client, server = master.connection()
        master.handoff([server])
        master.wait_board()
        server.close()
        assert get(client).startswith(b"HTTP/1.1 200")
        client.close()
    master.channel.send(bytes((wire.DRAIN,)))
    beats = beats_until_eof(master)
    assert beats and beats[-1]["final"] is True and beats[-1]["count"] == 5 and beats[-1]["inflight"] == 0
    assert not any(b.get("final") for b in beats[:-1])
    assert master.proc.wait(10) == 0


def test_a_small_send_buffer_keeps_heartbeats_flowing():
    """A backend's metrics past what the channel can carry in one datagram: the beats shrink, never stop."""
    m = FakeMaster(backend="runtimeapp:create_app", worker_sndbuf=8192, timeout=2)  # 16 KiB once doubled
    try:
        m.wait_ready()
        for _ in range(3):
            msg = m.recv((wire.BEAT,), timeout=5)
            assert msg, "the worker closed its channel"
            body = wire.decode_json(msg)
            assert body["count"] == 0 and 0 < len(body.get("metrics", [])) < 2000
        client, server = m.connection()
        m.handoff([server])
        m.wait_board()
        server.close()
        assert get(client).startswith(b"HTTP/1.1 200")
        client.close()
        assert m.proc.poll() is None
    finally:
        m.close()
