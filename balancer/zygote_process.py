"""One zygote process as the master sees it (--preload), and the handle of a worker it forked."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time

from balancer import wire

FORK_TIMEOUT = 1.0  # seconds a zygote gets to answer a fork (it takes milliseconds); past that it is hung
STOP_GRACE = 2.0  # seconds a zygote told to exit gets before SIGKILL
PR_GET_CHILD_SUBREAPER = 37  # <linux/prctl.h>


class ZygoteTrouble(Exception):
    """A fork through the zygote did not happen; str() says why, in one line; hung: the zygote must be killed."""

    def __init__(self, reason: str, hung: bool = False) -> None:
        super().__init__(reason)
        self.hung = hung


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
    """One zygote process: its channel, its exit, how far its import got."""

    def __init__(self, generation: int, proc: subprocess.Popen, channel, pidfd: int) -> None:
        self.generation = generation  # the code generation its workers run (set for good once it is promoted)
        self.proc = proc
        self.pid = proc.pid
        self.channel = channel
        self.pidfd = pidfd
        self.state = "importing"  # importing, ready, refusing, stopping, exited
        self.started = time.monotonic()
        self.import_seconds: float | None = None
        self.error = ""  # its import error, as the backend's one line
        self.kill_at = 0.0
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()

    def stop(self) -> None:
        """Close its channel (it exits on EOF) and SIGTERM it; SIGKILL follows from tick() if it lingers."""
        if self.state == "exited":
            return
        self.state = "stopping"
        self.kill_at = time.monotonic() + STOP_GRACE
        self.close_channel()
        self.signal(signal.SIGTERM)

    def signal(self, signum: int) -> None:
        """Signal it unless it is reaped (it is our child: its pid cannot be reused before that)."""
        try:
            self.proc.send_signal(signum)  # Popen checks its own returncode first
        except ProcessLookupError:
            pass

    def close_channel(self) -> None:
        if self.channel.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
            self.channel.close()

    def await_reply(self, token: int, timeout: float) -> dict:
        """The zygote's answer to fork request token: {'pid': N}; ZygoteTrouble (refusal, death, hang) otherwise."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.channel, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ZygoteTrouble(f"no answer to a fork within {timeout:g}s", hung=True)
            poller.poll(left * 1000)
            got = wire.receive(self.channel)
            if got is None:
                continue
            msg, fds, _ = got
            wire.close_all(fds)
            if not msg:
                raise ZygoteTrouble("its channel closed", hung=True)
            body = wire.decode_json(msg)
            if not isinstance(body, dict) or body.get("token") != token:
                continue
            if msg[0] == wire.FORK_REFUSED:
                self.state = "refusing"
                raise ZygoteTrouble(f"refuses to fork: {body.get('reason')}")
            if msg[0] != wire.FORKED or not isinstance(body.get("pid"), int):
                raise ZygoteTrouble(f"fork failed: {body.get('error', 'bad answer')}")
            return body


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
