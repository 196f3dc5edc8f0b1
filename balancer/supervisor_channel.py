"""What the workers say on their channels (READY, heartbeats, IDLE, REFUSE, boot errors), read for the supervisor."""

from __future__ import annotations

import logging
import signal

from balancer import wire
from balancer.process import BootError, Phase, WorkerProcess

log = logging.getLogger("balancer")


class WorkerChannels:
    """The channel half of the Supervisor (its state lives in Supervisor.__init__); split out to keep each file
    readable."""

    def _read_channel(self, w: WorkerProcess) -> bool:
        """Act on every message waiting on w's channel; False once the channel has ended.

        A worker that died with handoffs unread still left its REFUSEs here: wire.receive reads past the reset
        to them, or fds it refused and fds it served could not be told apart.
        """
        if w.channel.fileno() < 0:
            return False
        while True:
            try:
                got = wire.receive(w.channel, self._inbox)
            except OSError as exc:
                log.warning("worker slot=%d pid=%d channel: %s", w.slot, w.pid, exc)
                return False
            if got is None:
                return True
            msg, fds, _ = got
            if fds:  # workers never send fds; never let one leak into the master
                wire.close_all(fds)
            if not msg:
                return False
            try:
                self._on_message(w, msg)
            except wire.ProtocolError as exc:
                log.error("worker slot=%d pid=%d sent a bad message (%s); killing it", w.slot, w.pid, exc)
                w.reason = w.reason or "crash"
                w.signal(signal.SIGKILL)
                return False

    def _on_channel(self, w: WorkerProcess) -> None:
        """The channel is readable."""
        if not self._read_channel(w):
            self._close_channel(w)

    def _on_message(self, w: WorkerProcess, msg: bytes) -> None:
        """Update w's record from one message."""
        kind = msg[0]
        if kind == wire.BEAT:
            w.last_beat = self.clock()
            body = wire.decode_json(msg)
            if isinstance(body, dict):
                w.beat = body
                if body.get("recycle") and not w.recycle and w.phase is Phase.READY:
                    w.recycle = True
                    self.changed()
        elif kind == wire.READY:
            w.last_beat = self.clock()
            if w.phase is Phase.BOOTING:
                w.phase = Phase.READY
                if not w.ready.done():
                    w.ready.set_result(True)
                log.info("worker slot=%d pid=%d ready", w.slot, w.pid)
                self.changed()
        elif kind == wire.IDLE:  # asked while connections are held: it has nothing running now
            self.dispatcher.on_idle(w.link)
            self.on_capacity()
        elif kind == wire.REFUSE:
            self.dispatcher.on_refuse(w.link, wire.decode_refuse(msg))
            self.on_capacity()
        elif kind == wire.BOOT_ERROR:
            text = str(wire.decode_json(msg))
            if not w.ready.done():
                w.ready.set_exception(BootError(text))
                w.ready.exception()  # mark retrieved: a respawn may have nobody awaiting it
            # At the first boot the master's exit line says it once; after that, the log is the only report.
            log.log(logging.ERROR if self.started_up else logging.DEBUG, "worker slot=%d pid=%d failed to boot: %s",
                    w.slot, w.pid, text)
        else:
            raise wire.ProtocolError(f"unknown message type {kind:#x}")

    def _close_channel(self, w: WorkerProcess) -> None:
        """The worker's end is gone: hand the fds it never took to others now, before the reap."""
        if w.channel.fileno() < 0:
            return
        self.loop.remove_reader(w.channel.fileno())
        self.loop.remove_writer(w.channel.fileno())
        w.link.channel_lost = True
        pending = self.dispatcher.evict(w.link)  # counted after its last messages are read: acked fds stay its own
        if pending:
            log.info("re-dispatched %d unacknowledged connections of worker slot=%d pid=%d", pending, w.slot, w.pid)
        w.channel.close()
        if not w.exited and w.phase is not Phase.DRAINING and not self.stopping:
            # Supervised still: with no channel it sends no heartbeat, so --timeout aborts it if it lingers.
            # Info, not a warning: a stop signalled to the whole process group (systemd's control-group kill,
            # timeout(1), Ctrl-C) reaches the workers before the master's loop has acted on its own copy, and
            # an exit that is a failure is logged as one when it is reaped.
            log.info("worker slot=%d pid=%d closed its channel; waiting for it to exit", w.slot, w.pid)
        self.on_capacity()
