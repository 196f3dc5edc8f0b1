"""What the workers say on their channels (READY, heartbeats, IDLE, REFUSE, RETURN, boot errors), read for the supervisor."""

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
            msg, fds, truncated = got
            if fds and not (msg and msg[0] == wire.RETURN and len(fds) == 1 and not truncated):
                wire.close_all(fds)  # only a RETURN brings an fd, one; never let another leak into the master
                fds = []
            if not msg:
                return False
            try:
                if msg[0] == wire.RETURN:
                    self._on_return(w, msg, fds)
                    continue
                self._on_message(w, msg)
            except wire.ProtocolError as exc:
                log.error("worker slot=%d pid=%d sent a bad message (%s); killing it", w.slot, w.pid, exc)
                w.reason = w.reason or "crash"
                w.signal(signal.SIGKILL)
                return False

    def _on_return(self, w: WorkerProcess, msg: bytes, fds: list[int]) -> None:
        """An idle keep-alive connection the worker gave back: the master's now (balancer/parking.py)."""
        try:
            family, peer = wire.decode_return(msg)
        except wire.ProtocolError:
            wire.close_all(fds)
            raise
        if not fds:  # its fd did not make it through: nothing to keep
            return
        w.link.returned += 1
        if self.on_return is None:
            wire.close_all(fds)
        else:
            self.on_return(w.link, fds[0], family, peer)

    def tell_peers(self) -> None:
        """Send each ready worker that rebalances the boards of the other ready ones, when that set changed.

        With them a busy worker sees whether another is free before it gives a connection back
        (workers/rebalance.py): a free worker's STARTED equals its FINISHED, no message needed. While a ready
        worker does not rebalance (one of an older release, kept by an in-place upgrade), every worker is told
        none: a connection given back could be handed to that one, which cannot read a resumed hand-off.
        """
        ready = [w for w in self.records() if w.phase is Phase.READY and w.board_fd >= 0]
        key = tuple(w.pid for w in ready)  # a worker's rebalances is set as it turns ready
        if key == self._peers_told:
            return
        self._peers_told = key
        everyone = all(w.rebalances for w in ready)
        for w in ready:
            if not w.rebalances or w.channel.fileno() < 0:
                continue
            fds = [other.board_fd for other in ready if other is not w] if everyone else []
            for at in range(0, max(len(fds), 1), wire.MAX_FDS_PER_MSG):
                try:
                    wire.send_fds(w.channel, bytes((wire.PEERS, at == 0)), fds[at:at + wire.MAX_FDS_PER_MSG])
                except OSError:  # full (it is not reading) or gone: the tick tries again
                    self._peers_told = None
                    break

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
                body = wire.decode_json(msg)
                w.rebalances = isinstance(body, dict) and body.get("peers") is True
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
