"""One zygote process as the master sees it (--preload), and the handle of a worker it forked."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

from balancer import wire

FORK_TIMEOUT = 1.0  # seconds a zygote gets to answer a fork (it takes milliseconds); past that it is hung
STOP_GRACE = 2.0  # seconds a zygote told to exit gets before SIGKILL
PR_GET_CHILD_SUBREAPER = 37  # <linux/prctl.h>


class ForkedChild:
    """What Popen is for a spawned worker, for a forked one: the master adopted it before its pid was reported."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Its exit code once it has exited (reaping it), else None."""
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: as Popen does, the status is lost
                self.returncode = 0
            else:
                if done:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        """Block until it exits."""
        while self.poll() is None:
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Signal it unless it is reaped (its pid may be reused then)."""
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """One zygote process: its channel, its exit, how far its import got, the forks it has not answered yet."""

    def __init__(self, generation: int, proc, channel, pidfd: int) -> None:
        self.generation = generation  # the code generation its workers run (set for good once it is promoted)
        self.proc = proc  # subprocess.Popen, or anything with pid, poll(), returncode and send_signal()
        self.pid = proc.pid
        self.channel = channel
        self.pidfd = pidfd
        self.state = "importing"  # importing, ready, refusing, hung, stopping, exited
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.import_seconds: float | None = None
        self.error = ""  # its import error, as the backend's one line
        self.ready: asyncio.Future = self.loop.create_future()
        self.pending: dict[int, tuple] = {}  # fork token -> (record, deadline timer): asked, not answered
        self.deadline: asyncio.TimerHandle | None = None  # the import's, then the one for exiting once stopped

    def adopt(self, pid: int):
        """The process of a worker it forked, now the master's child: (a Popen-like handle, its pidfd)."""
        return ForkedChild(pid), os.pidfd_open(pid)

    def stop(self) -> None:
        """Close its channel (it exits on EOF) and SIGTERM it; SIGKILL if it is still there STOP_GRACE later."""
        if self.state in ("stopping", "exited"):
            return
        self.state = "stopping"
        self.close_channel()
        self.signal(signal.SIGTERM)
        self.kill_after(STOP_GRACE)

    def kill_after(self, seconds: float) -> None:
        """SIGKILL it unless it has exited within seconds (a timer on the loop: nothing waits for it)."""
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = self.loop.call_later(seconds, self.signal, signal.SIGKILL)

    def signal(self, signum: int) -> None:
        """Signal it unless it is reaped (it is our child: its pid cannot be reused before that)."""
        try:
            self.proc.send_signal(signum)  # Popen checks its own returncode first
        except ProcessLookupError:
            pass

    def close_channel(self) -> None:
        if self.channel.fileno() >= 0:
            self.loop.remove_reader(self.channel.fileno())
            self.channel.close()

    def exited(self) -> None:
        """It has been reaped: no deadline is left to enforce."""
        self.state = "exited"
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None


def start_zygote(generation: int, settings: dict, env: dict) -> Zygote:
    """Start a zygote interpreter for generation with its end of a new channel inherited."""
    master_end, zygote_end = wire.channel_pair()
    cmd = [sys.executable, "-P", "-m", "balancer_workers.zygote", "--channel-fd", str(zygote_end.fileno()),
           "--master-pid", str(os.getpid()), "--settings", json.dumps(dict(settings, generation=generation))]
    try:
        proc = subprocess.Popen(cmd, pass_fds=(zygote_end.fileno(),), env=env)
    except BaseException:
        master_end.close()
        raise
    finally:
        zygote_end.close()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except BaseException:
        proc.kill()
        proc.wait()
        master_end.close()
        raise
    return Zygote(generation, proc, master_end, pidfd)


def is_subreaper() -> bool:
    """True when orphaned descendants of this process are reparented to it (the forked workers must be)."""
    value = ctypes.c_int(0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) == 0 and value.value == 1
    except (OSError, AttributeError):
        return False
