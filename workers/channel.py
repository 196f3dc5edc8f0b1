"""The worker's end of the control channel: receive handoffs, ack or refuse them, queue reports to the master."""

from __future__ import annotations

import errno
import logging
import select
import socket
import time
from collections import deque

from balancer import board, wire
from balancer.errnos import PEER_GONE_ERRNOS

log = logging.getLogger("balancer.worker")

# Send errors other than PEER_GONE_ERRNOS are retried later, in order: a dropped ack or REFUSE would lose
# connections.
RETRY_FIRST = 0.01  # seconds before the first retry after a transient send error, doubling up to RETRY_MAX
RETRY_MAX = 1.0
FLUSH_TIMEOUT = 5.0  # seconds the last reports may wait for room before the worker exits anyway


def classify(exc: OSError) -> str:
    """What a failed send means: 'full' (wait until writable), 'gone', 'too_big' or 'retry' (transient)."""
    if isinstance(exc, BlockingIOError):
        return "full"
    if exc.errno in PEER_GONE_ERRNOS:
        return "gone"
    if exc.errno == errno.EMSGSIZE:
        return "too_big"
    return "retry"


def without_user_metrics(beat: bytes) -> bytes:
    """The same heartbeat with only the worker's own figures, which always fit."""
    body = wire.decode_json(beat)
    body.pop("metrics", None)
    return wire.encode_json(wire.BEAT, body)


class Channel:
    """One SEQPACKET socket to the master plus the ack board; reports leave in the order they were queued."""

    def __init__(self, sock: socket.socket, loop, ack_board: memoryview, serve, on_drain, on_gone) -> None:
        self.sock = sock
        self.loop = loop
        self.board = ack_board  # the handled/refused word; read by the master (balancer/board.py)
        self.serve = serve  # serve(fds, families, peers): attach acked fds to aiohttp
        self.on_drain = on_drain  # the master sent DRAIN
        self.on_gone = on_gone  # the master's end closed
        self.on_peers = None  # on_peers(fds, first): the other ready workers' boards (workers/rebalance.py)
        self.handled = 0  # handoff messages handled: acked or refused
        self.refused = 0
        self.refusing = False  # set when the worker starts draining: every later handoff is refused
        self.gone = False
        # Bytes a heartbeat may take: far below the send buffer, where a datagram past the buffer fails
        # (EMSGSIZE) however long we wait. Halved whenever one fails so all the same.
        self.beat_room = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 4
        self._outbox: deque[bytes] = deque()
        self._inbox = wire.inbox(wire.MASTER_MSG_BYTES)
        self._writer = False  # waiting for the socket to become writable
        self._retry = None  # timer handle while waiting out a transient error
        self._retry_delay = RETRY_FIRST
        self._warned_big = False
        self._told_gone = False

    def start(self) -> None:
        """Begin reading the master's messages."""
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self.read)

    # ---- from the master -----------------------------------------------------------------------

    def read(self) -> None:
        """Take every waiting message from the master."""
        while True:
            try:
                got = wire.receive(self.sock, self._inbox)  # past a reset to what the master had sent
            except OSError:
                got = wire.END
            if got is None:
                return
            msg, fds, truncated = got
            if not msg and not fds:
                self._eof()
                return
            try:
                self._on_message(msg, fds, truncated)
            except wire.ProtocolError as exc:
                wire.close_all(fds)
                log.error("bad message from master: %s", exc)

    def _on_message(self, msg: bytes, fds: list[int], truncated: bool) -> None:
        """Act on one message: a handoff is acknowledged before any byte of it is read."""
        kind = msg[0]
        if kind == wire.HANDOFF:
            self.handled += 1  # every handoff counts, so the master's numbering of them stays in step
            try:
                ids, families, peers = wire.decode_handoff(msg)
            except wire.ProtocolError:
                self.publish()  # acked and closed: the master must not give these half-seen fds to anyone else
                raise
            if truncated or len(fds) != len(ids) or self.refusing:
                # Some fds were lost in transit (MSG_CTRUNC) or we are leaving: the master still holds
                # its copies and gives every one of them to another worker.
                wire.close_all(fds)
                self.send(wire.encode_refuse(ids))  # the ids first, then the count that says so
                self.refused += 1
                self.publish()
                return
            self.publish()  # the ack
            if peers:  # connections given back by a worker: their PROXY clients' addresses
                self.serve(fds, families, peers)
            else:
                self.serve(fds, families)
        elif kind == wire.DRAIN:
            wire.close_all(fds)
            self.on_drain()
        elif kind == wire.PEERS:
            if self.on_peers is None or truncated or len(msg) != 2:
                wire.close_all(fds)
            else:
                self.on_peers(fds, bool(msg[1]))
        else:
            wire.close_all(fds)
            raise wire.ProtocolError(f"unknown message type {kind:#x}")

    def idle(self) -> bool:
        """True when no report waits to go: a message sent now goes in order."""
        return not self._outbox

    def publish(self) -> None:
        """Store the handled and refused counts on the board: the master's ack, one 8-byte store.

        Not while reports wait in the outbox: a REFUSE must reach the master before the count that covers it.
        """
        if not self._outbox:
            self.board[board.HANDLED] = board.pack(self.handled, self.refused)

    # ---- to the master -------------------------------------------------------------------------

    def send(self, msg: bytes) -> None:
        """Queue msg for the master, in order; never block the loop and never drop an ack."""
        if self.gone:
            return
        self._outbox.append(msg)
        if len(self._outbox) == 1:
            self._wait(self._send_queued())

    def send_beat(self, msg: bytes) -> None:
        """Queue a heartbeat; one still waiting is replaced, since each carries the whole figures so far."""
        if self._outbox and self._outbox[-1][0] == wire.BEAT:
            self._outbox[-1] = msg
        else:
            self.send(msg)

    def flush(self) -> None:
        """Woken (writable, or a retry is due): send what is queued; once all went, publish the counts it held."""
        self._retry = None
        why = self._send_queued()
        if why is None:
            self._unwatch_writes()
            self._retry_delay = RETRY_FIRST
            self.publish()
        else:
            self._wait(why)

    def _send_queued(self) -> str | None:
        """Send queued reports in order: None once all went, else why the first must wait (see classify())."""
        outbox = self._outbox
        while outbox:
            msg = outbox[0]
            try:
                self.sock.send(msg)
            except OSError as exc:
                how = classify(exc)
                if how == "too_big":
                    smaller = self._shrink(msg)
                    if smaller:
                        outbox[0] = smaller
                        continue
                    if smaller is not None:  # a heartbeat we cannot shrink: the next one has the same totals
                        outbox.popleft()
                        continue
                    how = "gone"
                if how == "gone":
                    self._peer_closed()
                elif how == "retry" and self._retry_delay == RETRY_FIRST:  # once per spell of failures
                    log.warning("sending to the master failed (%s); retrying, reports kept in order", exc)
                return how
            outbox.popleft()
        return None

    def _wait(self, why: str | None) -> None:
        """Arrange the wake-up that resumes sending: writability when the channel is full, a timer otherwise."""
        if why == "full":
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            if not self._writer:
                self._writer = True
                self.loop.add_writer(self.sock.fileno(), self.flush)
        elif why == "retry" and self._retry is None:
            self._unwatch_writes()  # a writable socket that fails with ENOBUFS would wake us in a spin
            self._retry = self.loop.call_later(self._retry_delay, self.flush)
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _shrink(self, msg: bytes) -> bytes | None:
        """A report too big for this socket: a heartbeat without the backend's metrics, b'' to drop it, or None."""
        if msg[0] != wire.BEAT:
            log.error("a %d-byte report of type %#x does not fit the channel", len(msg), msg[0])
            return None
        self.beat_room //= 2
        if not self._warned_big:
            self._warned_big = True
            log.warning("a %d-byte heartbeat does not fit the channel; the backend's metrics now get %d bytes",
                        len(msg), self.beat_room)
        smaller = without_user_metrics(msg)
        if len(smaller) < len(msg):
            return smaller
        log.error("a %d-byte heartbeat without the backend's metrics does not fit the channel", len(smaller))
        return b""

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Send every queued report, waiting up to timeout for room, and close: the master reads them before EOF."""
        self._unwatch_writes()
        self._unwatch_reads()
        deadline = time.monotonic() + timeout
        while True:
            why = self._send_queued()
            if why is None:
                self.publish()
                break
            if why == "gone":
                break
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("exiting with %d reports the master did not take in %.0fs", len(self._outbox), timeout)
                break
            # Until writable, or a short pause when the error was transient.
            select.select([], [self.sock] if why == "full" else [], [], min(left, RETRY_MAX / 10))
        self.gone = True
        self.sock.close()

    def _unwatch_writes(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._writer:
            self._writer = False
            self.loop.remove_writer(self.sock.fileno())

    def _unwatch_reads(self) -> None:
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass

    def _peer_closed(self) -> None:
        """A send says the master's end is closed: nothing more goes out.

        The messages it sent before closing are still queued for us (fds among them, now only ours): the
        reader takes them, then sees EOF and reports the master gone.
        """
        self.gone = True
        self._outbox.clear()
        self._unwatch_writes()
        self.loop.call_soon(self.read)

    def _eof(self) -> None:
        """The master's end closed and we read all it sent: tell the worker, once."""
        self.gone = True
        self._outbox.clear()
        self._unwatch_writes()
        self._unwatch_reads()
        if not self._told_gone:
            self._told_gone = True
            self.on_gone()
