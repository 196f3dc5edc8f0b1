"""Attach handed-over fds to aiohttp's protocol and count the connections open and closed."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import _socket

from balancer import board, wire

log = logging.getLogger("balancer.worker")


class AcceptedSocket(socket.socket):
    """A socket whose family and type read as plain ints.

    uvloop's connect_accepted_socket reads them up to four times per connection, and socket.socket turns each
    read into an IntEnum: four reads cost 1.88 us, against 0.07 us here (timeit).
    """

    __slots__ = ()
    family = _socket.socket.family
    type = _socket.socket.type


def shutdown_quietly(sock: socket.socket) -> None:
    """End the TCP connection now, even while the master still holds a copy of its fd."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Connections:
    """The worker's connections: attached to aiohttp without a Task each, counted open and closed."""

    def __init__(self, loop, ack_board: memoryview) -> None:
        self.loop = loop
        self.board = ack_board  # the closed word; read by the master (balancer/board.py)
        self.protocol_factory = None  # makes each connection's protocol (workers/observe.py); set once the backend is loaded
        self.open = 0  # counted from the ack, so a drain never misses one still connecting
        self.closed = 0  # connections closed since start
        self.socks: dict = {}  # protocol -> our socket object for its fd, to shut it down on close
        self.draining = False
        self.idle = asyncio.Event()  # set while draining once no connection is open

    def adopt(self, fds: list[int], families: list[int]) -> list[socket.socket]:
        """Count the handed-over fds open and wrap each (family known, so no getsockopt probing).

        An fd that cannot be wrapped is closed and counted closed at once: the master is told through the board.
        A RESUMED family (a kept-alive connection another worker gave back) is wrapped as the family it flags.
        """
        self.open += len(fds)
        socks = []
        for fd, family in zip(fds, families):
            try:
                socks.append(AcceptedSocket(family & ~wire.RESUMED, socket.SOCK_STREAM, 0, fd))
            except OSError:
                os.close(fd)
                self.count_closed()
        return socks

    def serve(self, fds: list[int], families: list[int], peers=()) -> None:
        """Wrap each fd and attach it to aiohttp's protocol (peers: PROXY clients of resumed ones, unused here)."""
        connect, server = self.loop.connect_accepted_socket, self.protocol_factory
        if peers:  # some were given back by a worker: those resume as kept-alive connections
            for fd, family in zip(fds, families):
                factory = functools.partial(server, None, True) if family & wire.RESUMED else server
                for sock in self.adopt([fd], [family]):
                    self.drive(connect(factory, sock), sock)
            return
        for sock in self.adopt(fds, families):
            self.drive(connect(server, sock), sock)

    def drive(self, coro, sock: socket.socket, _done=None) -> None:
        """Run connect_accepted_socket to its end without a Task: resumed by each future it waits on.

        A Task per batch, awaiting each connect in turn, cost one Task and two loop turns per connection.
        """
        try:
            waiting = coro.send(None)
        except StopIteration as finished:
            protocol = finished.value[1]
            if protocol.transport is not None:  # still open: remember our socket for its shutdown
                self.socks[protocol] = sock
            return
        # CancelledError is a BaseException: a connect whose wait was cancelled must be closed and counted
        # like one that failed, or its fd leaks and the drain waits for it until the graceful timeout.
        except (Exception, asyncio.CancelledError) as exc:
            if not isinstance(exc, (OSError, asyncio.CancelledError)):  # OSError: the client left first
                log.error("attaching a connection failed: %r", exc)
            shutdown_quietly(sock)
            sock.close()
            self.count_closed()  # it died before aiohttp got it: still counted as closed
            return
        waiting._asyncio_future_blocking = False  # what a Task does with a future it was handed
        waiting.add_done_callback(functools.partial(self.drive, coro, sock))

    def count_closed(self) -> None:
        """One of our connections closed: tell the master through the board."""
        self.open -= 1
        self.closed += 1
        self.board[board.CLOSED] = self.closed
        if self.draining and self.open == 0:
            self.idle.set()

    async def wait_idle(self, timeout: float) -> None:
        """Wait until every connection has closed (they close after their next response), at most timeout."""
        self.draining = True
        if self.open:
            self.idle.clear()
            try:
                await asyncio.wait_for(self.idle.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("graceful timeout with %d connections open; closing them", self.open)
