"""How workers end: drains, the deadlines checked every tick (heartbeat, boot, kill), aborts, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

from balancer import wire
from balancer.errnos import PEER_GONE_ERRNOS
from balancer.process import Phase, WorkerProcess, rss_bytes

log = logging.getLogger("balancer")

KILL_GRACE = 2.0  # seconds between SIGABRT/graceful deadline and SIGKILL


class WorkerEnds:
    """The ending half of the Supervisor (its state lives in Supervisor.__init__); split out to keep each file
    readable."""

    def drain(self, w: WorkerProcess, reason: str) -> None:
        """Stop giving w connections and tell it to finish in-flight requests and exit."""
        w.reason = w.reason or reason
        w.phase = Phase.DRAINING
        w.kill_at = self.clock() + self.config.graceful_timeout + KILL_GRACE
        if w.channel.fileno() < 0:
            w.signal(signal.SIGTERM)
            return
        try:
            wire.send_fds(w.channel, bytes((wire.DRAIN,)), [])
        except OSError as exc:
            if exc.errno not in PEER_GONE_ERRNOS:
                w.signal(signal.SIGTERM)  # channel full or short of memory: the signal does the same

    def _dismiss(self, w: WorkerProcess, reason: str, signum: int) -> None:
        """End a worker that never served (scaled away or shutting down while it boots)."""
        w.reason = reason
        w.kill_at = self.clock() + KILL_GRACE
        w.signal(signum)

    # ---- periodic checks ----------------------------------------------------------------------

    def tick(self) -> None:
        """Heartbeat and boot deadlines, kill deadlines, memory recycling, then reconcile."""
        now = self.clock()
        for w in self.records():
            if w.kill_at and now >= w.kill_at:
                log.warning("worker slot=%d pid=%d did not exit in time; SIGKILL", w.slot, w.pid)
                w.signal(signal.SIGKILL)
                w.kill_at = now + 60  # don't repeat every tick while the kernel reaps it
            elif w.kill_at:
                continue
            elif w.phase is Phase.READY and now - w.last_beat > self.config.timeout:
                log.error("worker slot=%d pid=%d sent no heartbeat for %.1fs (--timeout %g); aborting it",
                          w.slot, w.pid, now - w.last_beat, self.config.timeout)
                self._abort(w, "timeout")
            elif w.phase is Phase.BOOTING and now - w.started > self.config.boot_timeout:
                log.error("worker slot=%d pid=%d not ready within --boot-timeout; killing it", w.slot, w.pid)
                w.reason = "timeout"
                w.kill_at = now + KILL_GRACE
                w.signal(signal.SIGKILL)
        if self.config.max_memory and not self.stopping:
            limit = self.config.max_memory * 1024 * 1024
            for w in self.records():
                if w.phase is Phase.READY and not w.recycle and rss_bytes(w.pid) > limit:
                    log.warning("worker slot=%d pid=%d passed --max-memory %d MiB; recycling",
                                w.slot, w.pid, self.config.max_memory)
                    w.recycle = True
        self.changed()

    def _abort(self, w: WorkerProcess, reason: str) -> None:
        """SIGABRT now (a traceback-worthy death), SIGKILL if that does not do it; its slot is refilled at once."""
        w.reason = reason
        w.phase = Phase.DRAINING  # its unacked fds are re-dispatched once its channel is read to the end
        self.restarts[(w.slot, reason)] += 1
        w.kill_at = self.clock() + KILL_GRACE
        w.signal(signal.SIGABRT)

    # ---- shutdown ---------------------------------------------------------------------------

    def kill_all(self) -> None:
        """SIGKILL every worker now (past the shutdown deadline, or a second stop signal)."""
        for w in self.records():
            w.signal(signal.SIGKILL)

    async def shutdown(self) -> None:
        """Drain every worker and wait for all to exit; SIGKILL the ones past the deadline."""
        self.stopping = True
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        self.changed()
        if not self.table:
            return
        deadline = self.config.graceful_timeout + 2 * KILL_GRACE + 1
        try:
            await asyncio.wait_for(self._all_gone.wait(), deadline)
        except asyncio.TimeoutError:
            self.kill_all()
            try:
                await asyncio.wait_for(self._all_gone.wait(), 5)
            except asyncio.TimeoutError:
                log.error("workers %s did not exit after SIGKILL", sorted(self.table))
