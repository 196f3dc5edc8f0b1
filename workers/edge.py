"""What a connection goes through before HTTP when --proxy-protocol or --certfile is on: PROXY header, TLS.

Both run here, in the worker that owns the connection (the master never reads a client's byte), and both
must be done --header-timeout after the worker took the connection: a peer that sends nothing, or trickles
its PROXY header, is cut then. Without either option the worker never builds an Edge and connections take
workers/connections.py's plain path.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl

from balancer import wire
from balancer.tls import TLSError, context_from_settings
from balancer.trusted import TrustedPeers
from balancer_workers.connections import shutdown_quietly
from balancer_workers.limits import LogBudget, one_line
from balancer_workers.proxyproto import MORE, ClientGone, HeaderReader, ProxyHeaderError

log = logging.getLogger("balancer.worker")

# Handshakes get what is left of the deadline, and asyncio wants a positive timeout even when nothing is left.
LEAST_HANDSHAKE = 0.001
# A handshake that failed with ConnectionAbortedError within this of its deadline was cut by it: asyncio and
# uvloop raise that for their handshake timeout, as for other aborts, so the time tells them apart.
DEADLINE_SLACK = 0.05


class EdgeError(Exception):
    """The TLS files could not be loaded: this worker cannot serve (a boot error)."""


class Edge:
    """One worker's PROXY-protocol and TLS settings, and the connections going through them."""

    def __init__(self, loop, connections, stats, settings: dict, tls: ssl.SSLContext | None) -> None:
        self.loop = loop
        self.connections = connections  # workers/connections.py: counting, and driving aiohttp's connect
        self.stats = stats
        self.tls = tls
        self.timeout = settings["header_timeout"]
        self.proxy = bool(settings.get("proxy_protocol"))
        self.trusted = TrustedPeers(settings.get("forwarded_allow_ips", "127.0.0.1")) if self.proxy else None
        self.bad_headers = LogBudget(lambda n: log.info(
            "%d more bad PROXY headers not logged (balancer_worker_proxy_protocol_errors_total counts them)", n))

    @classmethod
    def from_settings(cls, loop, connections, stats, settings: dict) -> Edge | None:
        """An Edge when TLS or the PROXY protocol is on, else None; EdgeError if the TLS files are bad."""
        try:
            tls = context_from_settings(settings)  # read at every boot: a reload serves rotated certificates
        except TLSError as exc:
            raise EdgeError(str(exc)) from None
        if tls is None and not settings.get("proxy_protocol"):
            return None
        return cls(loop, connections, stats, settings, tls)

    def serve(self, fds: list[int], families: list[int], peers=()) -> None:
        """Like Connections.serve, with a PROXY header read from trusted peers and TLS before aiohttp."""
        deadline = self.loop.time() + self.timeout
        if peers:
            self.resume(fds, families, peers, deadline)
            return
        for sock in self.connections.adopt(fds, families):
            if self.proxy and self._from_proxy(sock):
                ProxyHeader(self, sock, deadline).start()
            else:
                self.attach(sock, deadline)

    def resume(self, fds: list[int], families: list[int], peers: list[bytes], deadline: float) -> None:
        """A batch with kept-alive connections another worker gave back: those come with their PROXY client's
        address (no header again) and never get TLS (a TLS connection never moves: these were plain)."""
        resumed = iter(peers)
        for fd, family in zip(fds, families):
            peer = next(resumed, b"") if family & wire.RESUMED else None
            socks = self.connections.adopt([fd], [family])
            if not socks:
                continue  # closed and counted
            sock = socks[0]
            if peer is not None:
                self.attach(sock, deadline, wire.unpack_peer(peer), resume=True)
            elif self.proxy and self._from_proxy(sock):
                ProxyHeader(self, sock, deadline).start()
            else:
                self.attach(sock, deadline)

    def _from_proxy(self, sock: socket.socket) -> bool:
        """True when the peer may send a PROXY header (and must); others are served as the clients they are."""
        try:
            peer = sock.getpeername()
        except OSError:
            return False  # gone already: attaching fails and counts it closed
        return self.trusted.peer_trusted(peer)

    def attach(self, sock: socket.socket, deadline: float, address: tuple[str, int] | None = None,
               resume: bool = False) -> None:
        """Hand sock to aiohttp's protocol, through a TLS handshake bounded by what is left of the deadline."""
        server = self.connections.protocol_factory
        # With the PROXY header's client as the connection's peer: request.remote and the access log read it.
        # The transport still tells the real peer (the proxy): request.transport.get_extra_info("peername").
        factory = server if address is None and not resume else functools.partial(server, address, resume)
        connect = self.loop.connect_accepted_socket
        if self.tls is None or resume:  # a resumed connection was plain: TLS ones never move
            self.connections.drive(connect(factory, sock), sock)
            return
        self.connections.drive(self._handshake(factory, sock, deadline), sock)

    async def _handshake(self, factory, sock: socket.socket, deadline: float):
        """connect_accepted_socket with TLS, within what is left of the deadline; failures counted by kind."""
        left = max(deadline - self.loop.time(), LEAST_HANDSHAKE)
        try:
            transport, _ = await self.loop.connect_accepted_socket(factory, sock, ssl=self.tls,
                                                                   ssl_handshake_timeout=left)
        except ConnectionAbortedError:
            if self.loop.time() >= deadline - DEADLINE_SLACK:  # cut by the deadline, not by the peer
                self.stats.header_timeouts += 1
            raise
        except ssl.SSLError as exc:
            self.stats.tls_handshake_errors += 1
            log.debug("TLS handshake failed: %s", exc)
            raise
        # uvloop returns its SSLProtocol; Connections.drive wants aiohttp's, which the TLS transport feeds.
        return transport, transport.get_protocol()

    def malformed(self, sock: socket.socket, exc: ProxyHeaderError) -> None:
        """A trusted peer sent no valid PROXY header: count it, log it within a budget, close."""
        self.stats.proxy_protocol_errors += 1
        if self.bad_headers.take(self.loop.time()):
            try:
                peer = sock.getpeername()
            except OSError:
                peer = "?"
            peer = peer[0] if isinstance(peer, tuple) else peer or "a unix socket"
            log.info("bad PROXY header from %s: %s", peer, one_line(str(exc)))
        self.drop(sock)

    def timed_out(self, sock: socket.socket) -> None:
        """The PROXY header did not arrive within --header-timeout."""
        self.stats.header_timeouts += 1
        self.drop(sock)

    def drop(self, sock: socket.socket) -> None:
        """Close a connection that never reached aiohttp, and count it closed."""
        shutdown_quietly(sock)
        sock.close()
        self.connections.count_closed()


class ProxyHeader:
    """One connection's PROXY header being read: then TLS/aiohttp, or a close on error or deadline."""

    __slots__ = ("edge", "sock", "deadline", "reader", "timer")

    def __init__(self, edge: Edge, sock: socket.socket, deadline: float) -> None:
        self.edge = edge
        self.sock = sock
        self.deadline = deadline
        self.reader = HeaderReader()
        self.timer = None  # armed, with the fd watched, only when the header was not there at once

    def start(self) -> None:
        """Read at once (a proxy sends its header as it connects); wait for the rest only if need be."""
        if not self.step():
            loop = self.edge.loop
            loop.add_reader(self.sock.fileno(), self.step)
            self.timer = loop.call_at(self.deadline, self._expired)

    def step(self) -> bool:
        """Read what arrived; True once the connection has moved on (attached, or closed)."""
        try:
            result = self.reader.read(self.sock)
        except ProxyHeaderError as exc:
            self._stop_waiting()
            self.edge.malformed(self.sock, exc)
            return True
        except (ClientGone, OSError):
            self._stop_waiting()
            self.edge.drop(self.sock)
            return True
        if result is MORE:
            return False
        self._stop_waiting()
        self.edge.attach(self.sock, self.deadline, result)
        return True

    def _stop_waiting(self) -> None:
        """No more reads or deadline for this header (it is done, one way or another)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.edge.loop.remove_reader(self.sock.fileno())

    def _expired(self) -> None:
        """--header-timeout passed before the header was all there."""
        self.timer = None
        self.edge.loop.remove_reader(self.sock.fileno())
        self.edge.timed_out(self.sock)
