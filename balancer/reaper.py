"""Orphan reaping: the master adopts what its workers' backends leave behind and reaps it when it exits."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from typing import Callable

from balancer.errnos import RESOURCE_ERRNOS

log = logging.getLogger("balancer")

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> bool:
    """Have orphaned descendants reparented to this process, as they are to PID 1 in a container; False if refused.

    A backend that backgrounds a process (a double fork, `cmd &` in a shell) leaves an orphan. As a container's
    PID 1 the master adopts it anyway; as a subreaper it does so everywhere else too (systemd, a terminal), so
    one reaping path serves both and is tested without being PID 1.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            return True
        reason = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as exc:  # no libc symbol: not glibc/musl, or not Linux
        reason = str(exc)
    log.warning("cannot become a child subreaper (%s); orphans of the workers go to init", reason)
    return False


class OrphanReaper:
    """Reaps exited children that are not workers, never touching a worker's exit status.

    The supervisor waits for each worker through its pidfd and Popen.poll(); a blanket waitpid(-1) would take a
    worker's status first and Popen would then report exit code 0 for a worker killed by a signal. So each
    child is looked at by pid, and pids in the supervisor's table are left to it.
    """

    def __init__(self, is_worker: Callable[[int], bool]) -> None:
        self.is_worker = is_worker
        self.reaped = 0  # balancer_orphans_reaped_total
        # Child lists need CONFIG_PROC_CHILDREN; without them, peek at exited children instead.
        self.listed = os.path.exists(f"/proc/self/task/{os.getpid()}/children")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pass: asyncio.Handle | None = None  # a reap scheduled by SIGCHLD, not run yet

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Become a subreaper and reap on every SIGCHLD; call before the first worker starts."""
        become_subreaper()
        self._loop = loop
        # uvloop keeps SIGCHLD from add_signal_handler (for subprocesses the master never starts through it);
        # a plain handler that only schedules a pass works on both loops. SA_RESTART, as add_signal_handler.
        signal.signal(signal.SIGCHLD, self._on_sigchld)
        signal.siginterrupt(signal.SIGCHLD, False)

    def stop(self) -> None:
        """Stop reaping on SIGCHLD."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if self._pass is not None:
            self._pass.cancel()
            self._pass = None

    def _on_sigchld(self, signum: int, frame) -> None:
        """A child exited or an orphan was adopted: reap on the next loop pass (one pass per burst)."""
        if self._pass is None:
            self._pass = self._loop.call_soon_threadsafe(self._scheduled_pass)

    def _scheduled_pass(self) -> None:
        """The pass a SIGCHLD asked for (the master's tick runs reap too: signals coalesce)."""
        self._pass = None
        self.reap()

    def reap(self) -> int:
        """Reap every exited child that is not a worker; the number reaped."""
        try:
            n = self._reap_listed() if self.listed else self._reap_peeked()
        except OSError as exc:
            if exc.errno not in RESOURCE_ERRNOS:
                raise
            # Out of fds (the accept path backs off and says so): /proc cannot be read now. An orphan waits
            # as a zombie until the next SIGCHLD or tick; a traceback every tick would only fill the log.
            return 0
        self.reaped += n
        return n

    def _reap_listed(self) -> int:
        """Try waitpid(WNOHANG) on each child that is not a worker (a live one is left running).

        Every thread has its own list: an orphan is adopted by whichever thread of the process the kernel picks.
        """
        n = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/children", "rb") as f:
                    pids = f.read().split()
            except OSError:  # that thread ended meanwhile
                continue
            for text in pids:
                pid = int(text)
                if not self.is_worker(pid) and self._wait(pid):
                    n += 1
        return n

    def _reap_peeked(self) -> int:
        """Without child lists: look at exited children without reaping (WNOWAIT), reap those not workers.

        Stops at the first worker found exited: the supervisor reaps it on its pidfd event, and the next call
        goes on past it.
        """
        n = 0
        while True:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return n
            if found is None or found.si_pid == 0 or self.is_worker(found.si_pid):
                return n
            if not self._wait(found.si_pid):
                return n
            n += 1

    @staticmethod
    def _wait(pid: int) -> bool:
        """Reap pid if it has exited."""
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return False
        if done:
            log.debug("reaped orphan pid %d (wait status %d)", pid, status)
        return bool(done)

    def collect(self):
        """balancer_orphans_reaped_total, for the master's Prometheus registry."""
        from prometheus_client.metrics_core import CounterMetricFamily

        yield CounterMetricFamily("balancer_orphans_reaped",
                                  "Orphaned processes (left by backends) the master adopted and reaped.",
                                  value=self.reaped)
