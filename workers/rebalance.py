"""Keep-alive rebalancing, the worker's half: give an idle keep-alive connection back to the master.

A keep-alive connection stays on the worker it was handed to, so its next request waits there behind whatever
that worker is running, even while another worker is idle. When the move pays, the worker gives the
connection back between requests (wire.RETURN, its fd attached) and the master hands its next request to a
free worker (balancer/parking.py). The move pays when this worker's requests cost real CPU (0.25 ms or more
each on average, as for the master's hold, balancer/holding.py), so a request queued here waits for whole
handlers, and another worker is free right now. Cheap handlers (a hello world) keep their connections.

Exactly once: a connection moves only when no byte of a next request has left the kernel. The response's
last read (data_received) was its only one since the previous response and ended with the blank line that
ends a request's headers, the request had no body, no request is queued behind it, nothing is left to write,
and aiohttp's start() waits for the next request. Reading is paused as the response ends (before the loop can
read again), the fd is sent with a dup, and only once the master has it is the transport dropped, without a
shutdown: the client sees nothing, and bytes it sends meanwhile wait in the socket for the next worker. TLS
connections never move (their state is in this worker's SSL object); a PROXY client's address travels with
the fd.
"""

from __future__ import annotations

import logging
import mmap
import os

from balancer import board, wire
from balancer.holding import HOLD_MIN_SERVICE
from balancer_workers.aiohttp_compat import idle_between_requests, queued

log = logging.getLogger("balancer.worker")

# A response's detach waits for aiohttp's start() to reach its wait for the next request: it gets there within
# a loop turn or two after the handler's task ends.
DETACH_TURNS = 3
# The gate, tested per response in workers/observe.py against the board's CPU_NS: the worker's recent requests
# cost at least this CPU each (its last window of board.WINDOW requests), as for the master's hold. Not the
# hold's share of time on a CPU too: that is per summed request duration, which requests queued in the worker
# inflate, so it shuts exactly when connections queue here. Handlers that mostly await I/O self-limit instead:
# their workers are seldom free, so the peer test below seldom passes.
MOVE_MIN_CPU_NS = int(HOLD_MIN_SERVICE * 1e9)


class Mover:
    """Gives idle keep-alive connections back to the master when the move pays; counts them."""

    def __init__(self, loop, channel, connections, started: dict, arrived: set) -> None:
        self.loop = loop
        self.peers: list[memoryview] = []  # the other ready workers' boards (wire.PEERS), read-only
        self.channel = channel  # workers/channel.py: the master's end
        self.connections = connections  # workers/connections.py: our socket object of each connection
        self.started = started  # protocol -> its running request (workers/observe.py): the requests in hand
        self.arrived = arrived  # connections whose next request arrived and has not begun (workers/observe.py)

    def after_response(self, protocol, response) -> None:
        """A response on a clean connection ended (log_access): pause its reading now if it should move."""
        if not response.keep_alive or queued(protocol) or self.channel.refusing or self.channel.gone:
            return
        # Only while other requests are in hand or arrived here (its next request would wait for them) and
        # another worker is free now (it would not wait there). Moving whenever this worker is busy puts moved
        # requests behind the ones that stayed (the master gives them to a free worker only); moving every
        # connection costs each request a move (bench/keepalive_model.py shows both).
        if not (self.started or self.arrived) or not self.peer_free():
            return
        transport = protocol.transport
        if transport is None or transport.is_closing():
            return
        transport.pause_reading()  # before the loop reads again: the next request's bytes stay in the kernel
        self.loop.call_soon(self._detach, protocol, DETACH_TURNS)

    def peer_free(self) -> bool:
        """True when another ready worker has no request running (its board: FINISHED read first, then STARTED)."""
        for words in self.peers:
            if words[board.FINISHED] == words[board.STARTED]:
                return True
        return False

    def set_peers(self, fds: list[int], first: bool) -> None:
        """The master's PEERS: map the other workers' boards (the first message of a set replaces the last)."""
        if first:
            self.peers = []
        for fd in fds:
            try:
                self.peers.append(memoryview(mmap.mmap(fd, board.SIZE, prot=mmap.PROT_READ)).cast("Q"))
            except (OSError, ValueError) as exc:
                log.warning("cannot map a peer's board: %s", exc)
            finally:
                os.close(fd)

    def _detach(self, protocol, turns: int) -> None:
        """Give the connection back once start() waits for its next request; else resume it."""
        transport = protocol.transport
        if transport is None:
            return  # closed meanwhile
        if not idle_between_requests(protocol):
            if turns and not transport.is_closing() and not queued(protocol):
                self.loop.call_soon(self._detach, protocol, turns - 1)  # start() has not got there yet
                return
            self._keep(transport)
            return
        sock = self.connections.socks.get(protocol)
        # protocol.fed: a read since the response ended (workers/observe.py resets it there) is bytes of a
        # next request the parser may hold; reading was paused at once, so that is only a loop whose pause
        # lags a read already under way.
        if sock is None or protocol.fed or transport.get_write_buffer_size() or self.channel.refusing or \
                not self.send(protocol, sock):
            self._keep(transport)
            return
        # The master has its copy: ours go without a FIN (no shutdown(), and the master's fd keeps it open).
        del self.connections.socks[protocol]
        transport.abort()  # aiohttp's connection_lost: counted closed on the board, its start() ends

    def send(self, protocol, sock) -> bool:
        """Send the master a copy of the connection's fd (wire.RETURN); False if it did not go."""
        if self.channel.gone or not self.channel.idle():
            return False  # reports wait in order; a RETURN must not overtake them
        peer = wire.pack_peer(protocol.peername) if protocol.from_proxy else b""
        try:
            fd = os.dup(sock.fileno())
        except OSError:
            return False
        try:
            wire.send_fds(self.channel.sock, wire.encode_return(sock.family, peer), [fd])
        except OSError:
            return False  # full, or the master is gone: the connection stays here
        finally:
            os.close(fd)
        return True

    def _keep(self, transport) -> None:
        """The connection stays: read on."""
        if not transport.is_closing():
            transport.resume_reading()
