"""Idle keep-alive connections a worker gave back (keep-alive rebalancing): watched here until their next request.

A worker returns a keep-alive connection between requests when its next request would likely wait behind
other work there (workers/rebalance.py). The master keeps the fd, registered for readability only: it never
reads a client's byte. When the client sends its next request, the connection is dispatched again like a new
one, to a free worker first (balancer/dispatch.py), flagged RESUMED with its PROXY client's address; the bytes
wait in the kernel's buffer and travel with the fd. A client that closes while parked is seen with a peek
(MSG_PEEK reads nothing) and closed here; one idle past --keepalive-timeout is closed here, as its worker would
have. Parked connections are handed back to the workers before they drain (a stop) and before an in-place
upgrade's exec (those returned after it wait in the channels for the new image), so neither loses one.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Callable

from balancer import wire

log = logging.getLogger("balancer")

_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


class Parked:
    """One parked connection: our socket object for its fd (peeks, close), its family and client address."""

    __slots__ = ("sock", "family", "peer", "since")

    def __init__(self, sock: socket.socket, family: int, peer: bytes, since: float) -> None:
        self.sock = sock
        self.family = family
        self.peer = peer
        self.since = since


class Parking:
    """The master's parked connections, in the order they were parked (the oldest expire first)."""

    def __init__(self, loop, dispatch: Callable[[list[tuple[int, int]]], None], peers: dict[int, bytes],
                 idle_timeout: float) -> None:
        self.loop = loop
        self.dispatch = dispatch  # hands [(fd, family | RESUMED)] to the workers (the master's accept path)
        self.peers = peers  # the dispatcher's fd -> client address, for the hand-off to carry
        self.idle_timeout = idle_timeout  # --keepalive-timeout
        self.parked: dict[int, Parked] = {}  # fd -> Parked, oldest first
        self.returned = 0  # connections workers gave back
        self.resumed = 0  # of those, dispatched again on their next request
        self.expired = 0  # closed here idle: at --keepalive-timeout, or at a stop with no worker to take them
        self.ended = 0  # closed here because their client closed (or reset) them while parked

    def park(self, fd: int, family: int, peer: bytes) -> None:
        """Take a returned connection's fd and watch it for its next request."""
        self.returned += 1
        try:
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
        except OSError:
            wire.close_all([fd])
            self.ended += 1
            return
        self.parked[fd] = Parked(sock, family, peer, time.monotonic())
        try:
            self.loop.add_reader(fd, self._readable, fd)
        except (OSError, ValueError):
            self._close(fd)
            self.ended += 1

    def _readable(self, fd: int) -> None:
        """Its next request (or its end) arrived: dispatch it, or close it if the client has gone."""
        parked = self.parked.get(fd)
        if parked is None:
            return
        try:
            gone = not parked.sock.recv(1, _PEEK)
        except BlockingIOError:
            return  # woken for nothing
        except OSError:
            gone = True  # reset by the client
        if gone:
            self._close(fd)
            self.ended += 1
            return
        self._unwatch(fd)
        parked.sock.detach()
        self.resumed += 1
        self.peers[fd] = parked.peer
        self.dispatch([(fd, parked.family | wire.RESUMED)])

    def expire(self, now: float | None = None) -> None:
        """Close the connections idle past the keep-alive timeout, as their worker would have (the tick)."""
        now = time.monotonic() if now is None else now
        limit = now - self.idle_timeout
        for fd, parked in list(self.parked.items()):
            if parked.since > limit:
                break  # the rest were parked later
            self._close(fd)
            self.expired += 1

    def release_all(self) -> None:
        """Hand every parked connection to the workers now (before they drain, or an upgrade without one)."""
        if not self.parked:
            return
        items = []
        for fd in list(self.parked):
            parked = self._unwatch(fd)
            parked.sock.detach()
            self.peers[fd] = parked.peer
            items.append((fd, parked.family | wire.RESUMED))
        log.debug("handing %d parked keep-alive connections to the workers", len(items))
        self.resumed += len(items)
        self.dispatch(items)

    def close_all(self) -> None:
        """Close every parked connection (no worker is left to take them)."""
        for fd in list(self.parked):
            self._close(fd)
            self.expired += 1

    def refuse(self, fd: int) -> None:
        """A connection given back while the workers drain: no worker takes it, so it closes idle, counted."""
        self.returned += 1
        self.expired += 1
        wire.close_all([fd])

    def _unwatch(self, fd: int) -> Parked:
        parked = self.parked.pop(fd)
        try:
            self.loop.remove_reader(fd)
        except (OSError, ValueError):
            pass
        return parked

    def _close(self, fd: int) -> None:
        self._unwatch(fd).sock.close()
