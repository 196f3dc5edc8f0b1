"""Scripted in-process fake workers on real socketpairs and ack boards, and an event loop on a fake clock.

The supervisor's model test (tests/test_supervisor_model.py) drives these instead of worker processes. A fake
speaks the real protocol exactly as workers/channel.py does: it acks a handoff with one board store, sends a
REFUSE before the store that counts it, serves what it acked, reports closes on the board, and dies the way a
process does: the kernel closes its channel end (unread handoffs make the master's next recvmsg fail with
ECONNRESET first) and its held fds, then the pidfd (here a pipe) becomes readable. Like a worker that rebalances
keep-alive connections (workers/rebalance.py), a fake may give an idle connection back to the master: a RETURN
with a copy of its fd, sent only when no report waits, then its own copy closed and counted closed on the board.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections import deque
from typing import Callable

from balancer import board, wire
from balancer.errnos import PEER_GONE_ERRNOS
from balancer.dispatch import Link
from balancer.process import WorkerProcess



class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeTimeLoop(asyncio.SelectorEventLoop):
    """A selector loop whose timers run on the fake clock; stepped with select timeouts of 0, it never blocks."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self._fake_clock = clock

    def time(self) -> float:
        return self._fake_clock()


def step(loop: asyncio.AbstractEventLoop) -> None:
    """Run one round of ready callbacks, due timers and readable/writable fds, without waiting."""
    loop.run_until_complete(asyncio.sleep(0))


class FakeProc:
    """The Popen-like face of a fake worker: pid, poll(), returncode, send_signal() (recorded, acted on later)."""

    def __init__(self, pid: int, worker: "FakeWorker") -> None:
        self.pid = pid
        self.worker = worker

    @property
    def returncode(self) -> int | None:
        return self.worker.returncode

    def poll(self) -> int | None:
        return self.worker.returncode

    def send_signal(self, signum: int) -> None:
        if self.worker.returncode is None:  # Popen: a reaped child is not signalled
            self.worker.signals.append(signum)


class FakeWorker:
    """One worker process, in-process: its channel end, its board, the connections it serves, a script of faults."""

    def __init__(self, slot: int, generation: int, pid: int, sock: socket.socket, ack_board: memoryview,
                 exit_w: int, on_serve: Callable[["FakeWorker", list[int]], None]) -> None:
        self.slot = slot
        self.generation = generation
        self.pid = pid
        self.sock = sock
        self.board = ack_board
        self.exit_w = exit_w
        self.on_serve = on_serve  # the model checks every connection is served once
        self.state = "booting"  # booting, ready, draining, dead
        self.stalled = ""  # "" runs; "blocked": its loop is stuck; "stopped": SIGSTOP, only SIGKILL acts
        self.boot_hang = False  # never reports READY (an import that blocks)
        self.recycle = False  # its heartbeats ask to be replaced (--max-requests reached)
        self.channel_open = True
        self.signals: list[int] = []  # delivered, not yet acted on
        self.handled = 0  # handoff messages handled, acked or refused
        self.refused = 0
        self.closed = 0
        self.acked = 0  # connections acked
        self.conns: dict[int, int] = {}  # inode -> our fd of each connection we serve
        self.returned = 0  # connections given back to the master (RETURN sent)
        self.give_back_next = 0  # connections to give back at its next loop turn, before it reads its channel
        self.on_give_back: Callable[["FakeWorker", int, bytes], None] | None = None  # the model's record of each
        self.last_handoff: dict[int, tuple[int, bytes | None]] = {}  # inode -> (family, client address) as handed
        self.outbox: deque[bytes] = deque()
        self.returncode: int | None = None
        self.ever_ready = False
        self.events: list[str] = []  # what happened to it, for failure messages
        self._inbox = wire.inbox(wire.MASTER_MSG_BYTES)

    @property
    def alive(self) -> bool:
        return self.returncode is None

    @property
    def running(self) -> bool:
        """Alive and its event loop turns."""
        return self.alive and not self.stalled

    def __repr__(self) -> str:
        return (f"FakeWorker(slot={self.slot}, gen={self.generation}, pid={self.pid}, state={self.state}, "
                f"stalled={self.stalled!r}, conns={len(self.conns)}, rc={self.returncode})")

    # ---- to the master ------------------------------------------------------------------------

    def send(self, msg: bytes) -> None:
        """Queue a report; reports leave in order and the board is stored only once none waits."""
        if not self.channel_open:
            return
        self.outbox.append(msg)
        self.flush()

    def flush(self) -> None:
        while self.outbox and self.channel_open:
            try:
                self.sock.send(self.outbox[0])
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in PEER_GONE_ERRNOS:
                    self.outbox.clear()
                    self._master_gone()
                    return
                raise
            self.outbox.popleft()
        self.publish()

    def publish(self) -> None:
        """The ack: handled and refused counts in one store, never ahead of a REFUSE still queued."""
        if not self.outbox:
            self.board[board.HANDLED] = board.pack(self.handled, self.refused)

    def ready(self) -> None:
        self.state = "ready"
        self.ever_ready = True
        self.events.append("ready")
        self.send(wire.encode_json(wire.READY, {"pid": self.pid}))

    def beat(self) -> None:
        body = {"open": len(self.conns)}
        if self.recycle:
            body["recycle"] = True
        self.send(wire.encode_json(wire.BEAT, body))

    # ---- from the master ----------------------------------------------------------------------

    def read(self, verdicts: list[str] | None = None) -> int:
        """Handle waiting messages: one per verdict ('ack' or 'refuse'), or all (acking) when verdicts is None."""
        if not self.channel_open or not self.running or self.state == "booting":
            return 0
        todo = deque(verdicts) if verdicts is not None else None
        done = 0
        while todo is None or todo:
            got = wire.receive(self.sock, self._inbox)
            if got is None:
                break
            msg, fds, truncated = got
            if not msg:
                wire.close_all(fds)
                self._master_gone()
                break
            verdict = todo.popleft() if todo is not None else "ack"
            done += 1
            if msg[0] == wire.HANDOFF:
                self._on_handoff(msg, fds, truncated, verdict)
            elif msg[0] == wire.DRAIN:
                wire.close_all(fds)
                self.start_draining("DRAIN")
            else:
                wire.close_all(fds)
                raise AssertionError(f"master sent an unknown message {msg[:1]!r}")
        return done

    def _on_handoff(self, msg: bytes, fds: list[int], truncated: bool, verdict: str) -> None:
        self.handled += 1
        ids, families, peers = wire.decode_handoff(msg)
        assert len(fds) == len(ids) and not truncated, f"handoff of {len(ids)} ids carried {len(fds)} fds"
        resumed = iter(peers)
        handed = [(family, next(resumed) if family & wire.RESUMED else None) for family in families]
        if verdict == "refuse" or self.state == "draining":
            wire.close_all(fds)
            self.send(wire.encode_refuse(ids))  # the ids first, then the count that says so
            self.refused += 1
            self.publish()
            self.events.append(f"refused {len(ids)}")
            return
        self.publish()  # the ack, before a byte is read
        inodes = []
        self.last_handoff = {}
        for fd, info in zip(fds, handed):
            inode = os.fstat(fd).st_ino
            self.conns[inode] = fd
            self.last_handoff[inode] = info
            inodes.append(inode)
        self.acked += len(fds)
        self.events.append(f"acked {len(fds)}")
        self.on_serve(self, inodes)

    def _give_back_due(self) -> None:
        """The connections it decided to give back go at this loop turn (before it reads a DRAIN waiting for it)."""
        if self.give_back_next:
            count, self.give_back_next = self.give_back_next, 0
            self.give_back(count)

    def start_draining(self, why: str) -> None:
        if self.state in ("ready", "booting"):
            self.events.append(f"draining ({why})")
            self.state = "draining"

    def _master_gone(self) -> None:
        """The master closed our channel: finish what we serve and exit, as a worker does."""
        self.channel_open = False
        self.start_draining("master gone")

    # ---- connections --------------------------------------------------------------------------

    def give_back(self, count: int) -> int:
        """Give up to count idle connections back to the master, as workers/rebalance.py's Mover does; how many.

        Only from a worker that takes connections (not draining) whose channel has no report waiting (a RETURN must
        not overtake them); a copy of the fd goes in the RETURN, then ours is closed without a shutdown and counted
        closed. A full channel keeps the connection here.
        """
        if not self.running or self.state != "ready" or not self.channel_open or self.outbox:
            return 0
        given = 0
        for inode in list(self.conns)[:count]:
            fd = self.conns[inode]
            peer = peer_of(inode)
            try:
                wire.send_fds(self.sock, wire.encode_return(socket.AF_UNIX, peer), [fd])
            except OSError:
                break  # full, or the master's end is gone: it stays here
            del self.conns[inode]
            os.close(fd)
            self.closed += 1
            self.board[board.CLOSED] = self.closed
            self.returned += 1
            given += 1
            self.events.append(f"gave back {inode}")
            if self.on_give_back is not None:
                self.on_give_back(self, inode, peer)
        return given

    def close_conns(self, count: int) -> None:
        """Clients went away: close up to count connections and report them on the board."""
        for inode in list(self.conns)[:count]:
            os.close(self.conns.pop(inode))
            self.closed += 1
            self.board[board.CLOSED] = self.closed

    # ---- signals and death --------------------------------------------------------------------

    def react(self) -> None:
        """Act on delivered signals as a worker process would (handlers only once its loop turns)."""
        keep = []
        for signum in self.signals:
            if not self.alive:
                break
            if signum == signal.SIGKILL:
                self.die(-signal.SIGKILL)
            elif self.stalled == "stopped":
                keep.append(signum)  # pending until SIGCONT
            elif signum == signal.SIGABRT:
                self.die(-signal.SIGABRT)  # faulthandler dumps the stack from C, then the default action
            elif signum == signal.SIGTERM:
                if self.state == "booting":
                    self.die(-signal.SIGTERM)  # the handler is installed only after the backend loaded
                elif self.stalled:
                    keep.append(signum)  # recorded by the handler; acted on when the loop turns again
                else:
                    self.start_draining("SIGTERM")
            else:
                raise AssertionError(f"unexpected signal {signum}")
        self.signals = keep if self.alive else []

    def behave(self) -> None:
        """One turn of a healthy worker: boot if booting, read everything, beat, finish a drain when idle."""
        self.react()
        if not self.running:
            return
        if self.state == "booting":
            if self.boot_hang:
                return
            self.ready()
        self._give_back_due()
        self.read()
        self.flush()
        if self.state == "draining":
            self.finish()

    def run_loop(self) -> None:
        """Time passes for a worker whose loop runs: it reads its channel, beats, and leaves once drained and idle."""
        self.react()
        if not self.running or self.state == "booting":
            return
        self._give_back_due()
        self.read()
        if self.channel_open:
            self.beat()
        if self.state == "draining" and not self.conns:
            self.finish()

    def finish(self) -> None:
        """A drained worker exits 0: its connections closed, its last reports sent, its channel closed."""
        self.close_conns(len(self.conns))
        self.flush()
        self.die(0)

    def boot_error(self) -> None:
        """The backend cannot load: say why, exit 3."""
        self.send(wire.encode_json(wire.BOOT_ERROR, "ImportError: no module named 'app'"))
        self.die(3)

    def close_channel(self) -> None:
        """Its channel end closes while it lives on (a bug in it, or an fd closed by mistake)."""
        if self.channel_open:
            self.channel_open = False
            self.sock.close()

    def die(self, code: int) -> None:
        """Exit: the kernel closes every fd (unread handoffs with the channel), then the exit becomes visible."""
        if not self.alive:
            return
        self.events.append(f"died {code}")
        self.returncode = code
        self.state = "dead"
        self.channel_open = False
        self.sock.close()
        wire.close_all(list(self.conns.values()))  # the connections it served end with it
        self.conns.clear()
        self.outbox.clear()
        os.write(self.exit_w, b"x")
        os.close(self.exit_w)
        self.exit_w = -1

    def release(self) -> None:
        """Close whatever a test that ended early left open (no exit is signalled)."""
        if self.alive:
            self.returncode = -signal.SIGKILL
            self.state = "dead"
        self.sock.close()
        wire.close_all(list(self.conns.values()))
        self.conns.clear()
        if self.exit_w >= 0:
            os.close(self.exit_w)
            self.exit_w = -1


def peer_of(inode: int) -> bytes:
    """The PROXY client address a fake gives with a connection it returns (b"" for every third: no PROXY client)."""
    return b"" if inode % 3 == 0 else f"198.51.100.{inode % 251} {inode % 65536}".encode()


def make_worker(slot: int, generation: int, pid: int, now: float,
                on_serve: Callable[[FakeWorker, list[int]], None]) -> tuple[WorkerProcess, FakeWorker]:
    """A supervisor record and its fake process, joined by a real channel, a real ack board and an exit pipe."""
    master_end, worker_end = wire.channel_pair()
    worker_end.setblocking(False)
    # The smallest send buffer: a worker that stops reading fills its channel after about six hand-offs (in
    # production ~278), so full channels, reclaimed sends and a DRAIN that does not fit happen in short runs.
    master_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    board_fd, master_board = board.create(f"fake-board-slot-{slot}")
    try:
        worker_board = board.attach(board_fd)  # its own mapping of the same memfd, as a worker process has
    except BaseException:
        os.close(board_fd)
        raise
    exit_r, exit_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    fake = FakeWorker(slot, generation, pid, worker_end, worker_board, exit_w, on_serve)
    record = WorkerProcess(slot, generation, FakeProc(pid, fake), master_end, Link(slot, master_end, master_board),
                           exit_r, now=now)
    record.board_fd = board_fd  # kept as spawn_process keeps it: a master upgrade maps the board again from it
    return record, fake
