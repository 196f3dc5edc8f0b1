"""One worker process as the master sees it: spawn it, signal it, describe how it ended."""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import json
import os
import signal
import site
import subprocess
import sys
import time

from balancer import wire
from balancer.board import create as create_board
from balancer.board import read_counts
from balancer.dispatch import Link


class BootError(RuntimeError):
    """A worker could not load the backend; its message is the one-line reason."""


class Phase(enum.Enum):
    """Where a worker process is in its life: the supervisor's one state per record."""

    BOOTING = "booting"
    READY = "ready"
    DRAINING = "draining"
    EXITED = "exited"


class WorkerProcess:
    """One record of the supervisor's table: a worker process, its phase, its link, what it last reported."""

    def __init__(self, slot: int, generation: int, proc, channel, link: Link, exit_fd: int,
                 now: float | None = None) -> None:
        self.slot = slot
        self.generation = generation  # the code generation it was started for (a reload raises the desired one)
        self.proc = proc  # subprocess.Popen, or anything with pid, poll() and returncode; a PendingFork at first
        self.pid = proc.pid  # below 0 while a zygote has not yet said which process it forked for this record
        self.channel = channel
        self.link = link
        self.exit_fd = exit_fd  # readable once the process has exited: a pidfd (-1 until a fork's pid is known)
        self.board_fd = -1  # the ack board's memfd, kept for a master upgrade to carry (closed when reaped)
        self.rebalances = False  # its READY said it gives back idle keep-alive connections: it gets PEERS
        self.started = time.monotonic() if now is None else now
        self.started_wall = time.time()
        self.last_beat = self.started
        self.beat: dict = {}  # the worker's last heartbeat
        self.reason = ""  # why it is leaving: reload, recycle, timeout, scale, shutdown, crash
        self.recycle = False  # asked to be replaced (--max-requests, --max-memory)
        self.kill_at = 0.0  # monotonic deadline for SIGKILL once it has been told to go
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.exited = False
        self._phase = Phase.BOOTING

    @property
    def stats(self) -> dict:
        """Its figures: the request counts from its board as of now, the rest from its last heartbeat.

        The board is read even after the worker is gone: a worker killed outright sent no final heartbeat,
        but every request it finished is counted there.
        """
        return {**self.beat, **read_counts(self.link.board)}

    @property
    def phase(self) -> Phase:
        """booting, ready, draining or exited."""
        return self._phase

    @phase.setter
    def phase(self, phase: Phase) -> None:
        self._phase = phase
        self.link.ready = phase is Phase.READY  # what the dispatcher reads per connection

    @property
    def pending(self) -> bool:
        """True while its process is a fork the zygote has not answered yet (no pid, nothing to watch)."""
        return isinstance(self.proc, PendingFork)

    def born(self, proc, exit_fd: int) -> None:
        """The zygote said which process it forked: from now on it is watched and signalled as a spawned one is."""
        pending, self.proc, self.pid, self.exit_fd = self.proc, proc, proc.pid, exit_fd
        if pending.owed is not None:  # what it was sent while pending: a dismissal, a boot deadline
            self.signal(pending.owed)

    def signal(self, signum: int) -> None:
        """Send a signal unless the process is already reaped (its pid may be reused)."""
        if not self.exited:
            try:
                self.proc.send_signal(signum)  # Popen checks its own returncode first
            except ProcessLookupError:
                pass


class PendingFork:
    """A forked worker's process until the zygote says its pid: signals sent meanwhile wait for it."""

    def __init__(self, number: int) -> None:
        self.pid = -number  # a key for the supervisor's table that no process has; never signalled
        self.returncode: int | None = None
        self.owed: int | None = None

    def poll(self) -> int | None:
        return None

    def send_signal(self, signum: int) -> None:
        """Keep it for the process; SIGKILL, once asked, is what it gets."""
        if self.owed != signal.SIGKILL:
            self.owed = signum


def new_ends(slot: int):
    """A new worker's channel (master's end, worker's end), its ack board's memfd and the master's mapping of it."""
    master_end, worker_end = wire.channel_pair()
    try:
        board_fd, board = create_board(f"balancer-board-slot-{slot}")
    except BaseException:
        master_end.close()
        worker_end.close()
        raise
    return master_end, worker_end, board_fd, board


def spawn_process(slot: int, generation: int, settings: dict, env: dict) -> WorkerProcess:
    """Start a fresh interpreter for slot with its ends of a new channel and ack board inherited."""
    master_end, worker_end, board_fd, board = new_ends(slot)
    # -P: the master's current directory does not go first on the worker's import path, so a user's own
    # modules cannot shadow the runtime's; the backend's directory is added by --app-dir when it is imported.
    cmd = [sys.executable, "-P", "-m", "balancer_workers", "--channel-fd", str(worker_end.fileno()),
           "--board-fd", str(board_fd), "--master-pid", str(os.getpid()), "--settings", json.dumps(dict(settings, slot=slot))]
    try:
        proc = subprocess.Popen(cmd, pass_fds=(worker_end.fileno(), board_fd), env=env)
    except BaseException:
        master_end.close()
        os.close(board_fd)
        raise
    finally:
        worker_end.close()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except BaseException:  # pidfd_open failed (out of fds): a worker we cannot watch must not live on
        proc.kill()
        proc.wait()
        master_end.close()
        os.close(board_fd)
        raise
    w = WorkerProcess(slot, generation, proc, master_end, Link(slot, master_end, board), pidfd)
    w.board_fd = board_fd  # the mapping would outlive it; a master upgrade needs it to map the board again
    return w


def worker_env() -> dict:
    """The environment for a worker: ours, plus the directory this process took the worker runtime from when
    a fresh interpreter would not search it.

    Workers run `python -P -m balancer_workers`: neither the current directory nor what a wrapper script
    added to sys.path is on their import path. A runtime found there (a checkout's copy, a vendored tree) is
    put on PYTHONPATH; an installed one is not (a site directory first on the path would come before the
    standard library), nor an editable install's, which its .pth file finds. A user's own package named
    `workers` has nothing to do with it.
    """
    env = dict(os.environ)
    searched = {os.path.realpath(p) for p in (*site.getsitepackages(), site.getusersitepackages(),
                                              *env.get("PYTHONPATH", "").split(os.pathsep)) if p}
    ours = {os.path.realpath(p or os.getcwd()) for p in sys.path}
    roots = []
    for name in ("balancer_workers", "balancer"):  # the worker imports both
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or ()) if spec else ():
            root = os.path.dirname(os.path.realpath(location))
            # By its name from a directory on our path, which a fresh interpreter's path lacks.
            if os.path.basename(location) == name and root in ours - searched and root not in roots:
                roots.append(root)
    if roots:
        env["PYTHONPATH"] = os.pathsep.join([*roots, *filter(None, [env.get("PYTHONPATH")])])
    return env


def rss_bytes(pid: int) -> int:
    """Resident set size of pid from /proc, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def describe_exit(code: int | None) -> str:
    """'exit code 3' or 'signal SIGKILL'."""
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
