"""A scripted in-process fake zygote (--preload) on a real channel, for the supervisor's model test.

It speaks the real protocol of balancer_workers/zygote.py: READY or BOOT_ERROR once its import is over, then
for each FORK (a worker's channel end and ack board attached) FORKED with a pid and a fake worker on those very
fds, or FORKED with an error, or FORK_REFUSED. Its faults: an import that fails, dies or hangs; death at any
time, also between answering a fork and handing the request to its worker (which then exits, as a spare does
on the zygote's EOF); SIGSTOP (it reads nothing until resumed, and only SIGKILL acts); refusing to fork; a fork
that fails. It exits on EOF of its channel as the real one does, and dies of SIGTERM and SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Callable

from balancer import board, wire
from balancer.zygote_process import Zygote
from tests.fakeworker import FakeProc, FakeWorker


class FakeZygoteProc:
    """The Popen-like face of a fake zygote."""

    def __init__(self, zygote: "FakeZygote") -> None:
        self.zygote = zygote
        self.pid = zygote.pid

    @property
    def returncode(self) -> int | None:
        return self.zygote.returncode

    def poll(self) -> int | None:
        return self.zygote.returncode

    def wait(self) -> int:
        """What Zygotes.close() calls after SIGKILL: the kernel acts on it at once."""
        self.zygote.react()
        assert self.zygote.returncode is not None, f"{self.zygote} still alive after SIGKILL"
        return self.zygote.returncode

    def send_signal(self, signum: int) -> None:
        if self.zygote.returncode is None:
            self.zygote.signals.append(signum)


class FakeZygoteHandle(Zygote):
    """The master's real Zygote record, adopting the fake workers its fake forks."""

    def adopt(self, pid: int):
        fake = self.fake.forks[pid]
        fake.adopted = True
        return FakeProc(pid, fake), fake.exit_r


class FakeZygote:
    """One zygote process, in-process: its channel end, its import, the workers it forks, a script of faults."""

    def __init__(self, generation: int, pid: int, new_pid: Callable[[], int],
                 on_fork: Callable[[FakeWorker], None], on_serve) -> None:
        self.generation = generation
        self.pid = pid
        self.new_pid = new_pid
        self.on_fork = on_fork  # the model learns of each worker it forks
        self.on_serve = on_serve
        master_end, self.sock = wire.channel_pair()
        self.sock.setblocking(False)
        self.exit_r, self.exit_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.state = "importing"  # importing, ready, dead
        self.import_hang = False
        self.stopped = False  # SIGSTOP: reads nothing, only SIGKILL acts
        self.refuse = False  # a thread started at import: every fork is refused
        self.fail_next = 0  # forks that fail (the spare was gone)
        self.die_before_handoff = False  # it answers the next fork, then dies before the worker has its fds
        self.signals: list[int] = []
        self.returncode: int | None = None
        self.forks: dict[int, FakeWorker] = {}  # pid -> the workers it forked
        self.events: list[str] = []
        self.handle = FakeZygoteHandle(generation, FakeZygoteProc(self), master_end, self.exit_r)
        self.handle.fake = self

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def __repr__(self) -> str:
        return (f"FakeZygote(gen={self.generation}, pid={self.pid}, state={self.state}, stopped={self.stopped}, "
                f"refuse={self.refuse}, rc={self.returncode}, events={self.events})")

    # ---- its life -----------------------------------------------------------------------------

    def imported(self, outcome: str = "ready") -> None:
        """Its import ends: ready, a boot error (exit 3), a crash, or it hangs (never says READY)."""
        if not self.alive or self.state != "importing" or self.stopped:
            return
        self.events.append(f"import {outcome}")
        if outcome == "ready":
            self.state = "ready"
            self._send(wire.encode_json(wire.READY, {"pid": self.pid, "import_seconds": 0.5}))
        elif outcome == "error":
            self._send(wire.encode_json(wire.BOOT_ERROR, "ImportError: half-deployed release"))
            self.die(3)
        elif outcome == "die":
            self.die(-signal.SIGSEGV)
        else:
            self.import_hang = True

    def react(self) -> None:
        """Act on delivered signals: SIGKILL always; SIGTERM (default action) unless stopped."""
        keep = []
        for signum in self.signals:
            if not self.alive:
                break
            if signum == signal.SIGKILL:
                self.die(-signal.SIGKILL)
            elif self.stopped:
                keep.append(signum)
            elif signum == signal.SIGTERM:
                self.die(-signal.SIGTERM)
            else:
                raise AssertionError(f"zygote got unexpected signal {signum}")
        self.signals = keep if self.alive else []

    def behave(self, import_ok: bool) -> None:
        """One turn: signals, the import (when told it may finish), and every fork request waiting."""
        self.react()
        if not self.alive or self.stopped:
            return
        if self.state == "importing" and import_ok and not self.import_hang:
            self.imported("ready")
        if self.state == "ready":
            self.serve()

    def serve(self) -> None:
        """Answer every FORK waiting on the channel; exit on its EOF."""
        while self.alive:
            got = wire.receive(self.sock)
            if got is None:
                return
            msg, fds, _ = got
            if not msg:
                self.events.append("channel closed")
                self.die(0)
                return
            body = wire.decode_json(msg)
            assert msg[0] == wire.FORK and len(fds) == 2, f"zygote got {msg[:1]!r} with {len(fds)} fds"
            token = body["token"]
            if self.refuse:
                wire.close_all(fds)
                self._send(wire.encode_json(wire.FORK_REFUSED, {"token": token, "reason": "2 threads are running"}))
            elif self.fail_next:
                self.fail_next -= 1
                wire.close_all(fds)
                self._send(wire.encode_json(wire.FORKED, {"token": token, "error": "the spare worker is gone"}))
            elif self.die_before_handoff:  # its answer is out, the request's fds die with it; so does the spare
                fake = self.fork(body["settings"]["slot"], list(socket.socketpair(socket.AF_UNIX,
                                                                             socket.SOCK_SEQPACKET)), token)
                self._send(wire.encode_json(wire.FORKED, {"token": token, "pid": fake.pid}))
                wire.close_all(fds)
                self.events.append(f"died before handing fork {token} to pid={fake.pid}")
                self.die(-signal.SIGKILL)
                fake.die(0)  # EOF from the zygote: a spare leaves
                return
            else:
                fake = self.fork(body["settings"]["slot"], fds, token)
                self._send(wire.encode_json(wire.FORKED, {"token": token, "pid": fake.pid}))

    def fork(self, slot: int, fds: list, token: int) -> FakeWorker:
        """A worker on the channel end and board the request brought (the master's child, as an adopted spare)."""
        if isinstance(fds[0], socket.socket):  # a spare that never gets its request: a channel to no one
            sock, worker_board = fds[0], board.private()
            fds[1].close()
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fds[0])
            try:
                worker_board = board.attach(fds[1])
            finally:
                os.close(fds[1])
        sock.setblocking(False)
        exit_r, exit_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        fake = FakeWorker(slot, self.generation, self.new_pid(), sock, worker_board, exit_w, self.on_serve)
        fake.exit_r, fake.token = exit_r, token
        self.forks[fake.pid] = fake
        self.events.append(f"forked pid={fake.pid} for fork {token}")
        self.on_fork(fake)
        return fake

    def _send(self, msg: bytes) -> None:
        try:
            self.sock.send(msg)
        except OSError:  # the master closed the channel: it hears nothing more
            pass

    def die(self, code: int) -> None:
        """Exit: the kernel closes its channel end (requests queued there close their fds), then the pidfd fires."""
        if not self.alive:
            return
        self.events.append(f"died {code}")
        self.returncode, self.state = code, "dead"
        self.sock.close()
        os.write(self.exit_w, b"x")
        self.release()

    def release(self) -> None:
        """Close whatever an example left open (at its end, its exit unseen)."""
        self.returncode = -signal.SIGKILL if self.returncode is None else self.returncode
        self.sock.close()
        if self.exit_w >= 0:
            os.close(self.exit_w)
            self.exit_w = -1
