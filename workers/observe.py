"""Per-request observation: timing, counts, limits and the access log; a handler's BaseException made a 500."""

from __future__ import annotations

import asyncio
import functools
from time import perf_counter

from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_exceptions import HTTPException
from aiohttp.web_protocol import RequestHandler

from balancer.board import CPU_NS
from balancer_workers.aiohttp_compat import ServerProtocol, protocol_factory, queued
from balancer_workers.connections import shutdown_quietly
from balancer_workers.rebalance import MOVE_MIN_CPU_NS
from balancer_workers.stats import BUCKET0, FIRST_BUCKET, begin, later_bucket, tally

# Counted for a request whose handler never finished: its client went away, or the graceful deadline cut it.
GONE = 499


class Observer:
    """One worker's request bookkeeping, split between the start of a request and its access-log call.

    Each connection is a RequestHandler of the worker's own (protocol_factory()). A request starts in its
    request factory, which aiohttp hands the request's method and body stream (no property to call for them);
    its request handler is serve_request(), bound to the connection, which checks the body and awaits the
    app's handler. aiohttp calls the RequestHandler's log_access() after every response it writes, whatever
    the handler did (returned, raised an HTTP error, crashed into a 500), with the request and the response;
    that is where the request is counted and timed. Each costs one frame, serve_request() a coroutine with a
    bare try/except: aiohttp's own access-logger object (one per connection) would add two clock reads per
    request.
    A request whose handler is cancelled (client gone, graceful deadline) reaches no log_access(): it is
    counted when its connection is lost, or at the final report.
    """

    def __init__(self, stats, limits, on_limit, request_limit: int = 0, access=None) -> None:
        self.stats = stats
        self.limits = limits
        self.on_limit = on_limit  # called once the worker has served --max-requests
        self.request_limit = request_limit
        self.access = access  # an AccessLog, or None when access logging is off
        self.draining = False
        # protocol -> (perf_counter() at its current request's start, its method, its body stream or
        # EMPTY_PAYLOAD). aiohttp serves one request at a time per connection, so the protocol names the
        # request; its size is the in-flight gauge. perf_counter, not aiohttp's loop.time(): uvloop's clock
        # has millisecond resolution.
        self.started = stats.started
        # Connections whose next request's headers have arrived and not begun (watched ones only: movable()).
        # Python 3.12+ runs each handler eagerly as its request begins, so a CPU-bound one ends before the
        # requests read beside it begin: started alone would not show them waiting (workers/rebalance.py).
        self.arrived: set = set()

    def drain(self) -> None:
        """From now on each connection ends after the response to the last request it has sent in full.

        Requests a client pipelined are received whole before they are answered: each is answered before its
        connection closes, or it would be lost though the client did nothing wrong. So a response says
        Connection: close only when, as its handler returns, no parsed request waits behind it (end_after):
        decided then, not when the drain began, a request pipelined while the handler ran is answered too.
        """
        self.draining = True

    def protocol_factory(self, server, loop, handler=None, request_factory=None, connections=None, mover=None):
        """What makes each connection's protocol: aiohttp's RequestHandler, observed, serving handler.

        handler defaults to the Server's (the Application's); request_factory to the Server's too. connections
        (workers/connections.py), when given, is told of each connection that closes. mover
        (workers/rebalance.py), when given, may take an idle keep-alive connection back to the master.
        """
        inner = handler or server.request_handler
        make = request_factory or server.request_factory
        observer, started, arrived, stats, limits = self, self.started, self.arrived, self.stats, self.limits
        deadlines, header_timeout, time = limits.deadlines, limits.header_timeout, loop.time
        watch_body, release_body = limits.watch_body, limits.release_body
        request_lost, access, request_limit = self.lost, self.access, self.request_limit
        pairs, other, add_pair, words = stats.pairs, stats.other, stats.add_pair, stats.words
        socks = connections.socks if connections is not None else {}
        count_closed = connections.count_closed if connections is not None else lambda: None
        made, lost = ServerProtocol.connection_made, RequestHandler.connection_lost
        # Keep-alive rebalancing (workers/rebalance.py): offered each clean response while the gate is open.
        after_response = mover.after_response if mover is not None else None
        min_cpu = MOVE_MIN_CPU_NS

        unwatched = {}  # protocol -> the body stream of its request, until serve_request watches it

        def make_request(message, payload, protocol, writer, task):
            """aiohttp's request factory: the request starts here, its method and body (or none) at hand."""
            # Its headers are in: the header deadline is lifted (empty while no connection waits for its first
            # request); begin(): perf_counter(), the start counted on the board, as a first one if it was.
            first = deadlines.pop(protocol, None) if deadlines else None
            started[protocol] = (begin(words, first), message.method, payload)
            if arrived:
                arrived.discard(protocol)
            if payload is not EMPTY_PAYLOAD:
                unwatched[protocol] = payload
            return make(message, payload, protocol, writer, task)

        class ObservedRequestHandler(ServerProtocol):
            __slots__ = ("fed",)  # see movable()
            tracks_reads = False  # movable()'s classes say True

            def connection_made(protocol, transport) -> None:
                protocol.fed = 0
                made(protocol, transport)  # aiohttp's keep-alive timer held off until the first response
                deadlines[protocol] = time() + header_timeout  # its first request's headers: Limits.sweep

            def connection_lost(protocol, exc=None) -> None:
                sock = socks.pop(protocol, None)
                if sock is not None:
                    # The master may still hold its copy of this fd (its ack is not processed yet); the last
                    # close() does the TCP teardown, and on loopback that costs ~10 us. shutdown() here does it
                    # in this worker, where the connection lived, instead of in the master's hot loop.
                    shutdown_quietly(sock)
                lost(protocol, exc)
                deadlines.pop(protocol, None)
                arrived.discard(protocol)
                unwatched.pop(protocol, None)
                request_lost(protocol)
                count_closed()

            async def serve_request(protocol, request):
                """Watch the body, await the handler; a BaseException it raises becomes a 500.

                aiohttp answers an Exception with a 500 and serves on, but a SystemExit or KeyboardInterrupt (a
                sys.exit() in a handler) goes up through the event loop and ends the worker with every request
                it is serving, and another BaseException drops the connection unanswered. A cancellation stays
                one: it is how aiohttp stops a handler whose client left.
                """
                if unwatched:
                    stream = unwatched.pop(protocol, None)
                    if stream is not None:  # may raise 413: aiohttp answers it, and logs it through log()
                        watch_body(request, protocol, stream)
                try:
                    response = await inner(request)
                except HTTPException as exc:
                    if observer.draining:
                        end_after(exc, protocol)
                    raise
                except (Exception, asyncio.CancelledError):
                    raise
                except BaseException as exc:
                    raise HandlerExit(f"the handler raised {type(exc).__name__}: {exc}") from exc
                if observer.draining:
                    end_after(response, protocol)
                return response

            def log_access(protocol, request, response, start_time=None) -> None:
                """A response was written (or failed to be): count it with its duration; release its body; log it."""
                end = perf_counter()
                # None: already counted as cut off by lost(): its client left while the handler ran, and the
                # handler went on to fail (a body read raising ConnectionResetError, answered 500 to nobody) or
                # to answer.
                begun = started.pop(protocol, None)
                if begun is None:
                    if protocol.transport is None:
                        return
                    method, seconds = request.method, 0.0
                else:
                    method, seconds = begun[1], end - begun[0]
                    if begun[2] is not EMPTY_PAYLOAD:
                        release_body(begun[2])
                # RequestStats.observe, inlined: a call of its own would cost ~400 instructions per request.
                status = response.status
                statuses = pairs.get(method, other)
                at = statuses.get(status)
                if at is None:
                    at = add_pair(method, status, statuses)
                tally(words, at, BUCKET0 if seconds <= FIRST_BUCKET else later_bucket(seconds), seconds, len(started))
                if access is not None:
                    access.log(request, response, seconds)
                if request_limit and stats.count >= request_limit:
                    observer.on_limit()
                # Keep-alive rebalancing's gate first (rebalance.MOVE_MIN_CPU_NS): an app whose requests are cheap
                # stops here, and its connections never pay for watching their reads.
                if after_response is not None and words[CPU_NS] >= min_cpu:
                    if protocol.tracks_reads:
                        fed, protocol.fed = protocol.fed, 0
                        if fed == 1 and begun is not None and begun[2] is EMPTY_PAYLOAD:
                            after_response(protocol, response)
                    elif protocol.transport is not None:  # watched from its next read on (not movable yet)
                        protocol.__class__ = tracking(type(protocol))
                        protocol.fed = 0
                        # The transport calls the data_received it looked up when it got its protocol (uvloop
                        # keeps the bound method): giving it the protocol again makes it look again.
                        protocol.transport.set_protocol(protocol)

            def log_exception(protocol, *args, **kwargs) -> None:
                """A handler failing because its client left (a body read cut off) is no server error."""
                if protocol.transport is None and isinstance(kwargs.get("exc_info"), ConnectionError):
                    protocol.logger.debug(*args, **kwargs)
                    return
                super().log_exception(*args, **kwargs)

        tracking = functools.lru_cache(maxsize=None)(lambda cls: movable(cls, arrived))  # one twin per class
        # Resumed connections (given back by a worker) are watched from their first read: they moved because
        # the gate was open.
        return protocol_factory(server, loop, ObservedRequestHandler, make_request,
                                resumed_wrap=tracking if mover is not None else None)

    def lost(self, protocol) -> None:
        """A connection closed: a request still running on it is counted as cut off."""
        begun = self.started.pop(protocol, None)
        if begun is not None:
            if begun[2] is not EMPTY_PAYLOAD:
                self.limits.release_body(begun[2])
            self.stats.observe(begun[1], GONE, perf_counter() - begun[0])

    def cut_off(self) -> None:
        """At the final report: count every request still without a response."""
        for protocol in list(self.started):
            self.lost(protocol)


def movable(cls: type, arrived: set) -> type:
    """cls, noting in fed whether its parser may hold part of a request (log_access() reads and resets it).

    A connection's protocol becomes its class's twin (__class__, same layout) once its worker's requests pass
    keep-alive rebalancing's gate: until then no read pays for the watching.

    fed counts the reads since the last response: 1 means one read that ended with the blank line ending a
    request's headers (nothing of a next request can be in the parser), 2 anything else. The C parser's own
    state is not readable, so this is what tells a connection that may move (workers/rebalance.py). A read
    ending with that blank line also puts the connection in arrived until its request begins.
    """
    received = cls.data_received

    class Movable(cls):
        __slots__ = ()
        tracks_reads = True

        def data_received(protocol, data: bytes) -> None:
            if data[-4:] == b"\r\n\r\n":
                protocol.fed = 2 if protocol.fed else 1
                arrived.add(protocol)
            else:
                protocol.fed = 2
            received(protocol, data)

    return Movable


def end_after(response, protocol) -> None:
    """While draining: make response end its connection, unless a request waits behind it or it went out already.

    A streamed response whose headers went out keep-alive (prepared before the drain began) is left as it
    went: the client may send its next request on the connection, which is then answered with Connection:
    close, or the connection closes idle at --keepalive-timeout. Closing it after the response would drop
    that next request.
    """
    if queued(protocol) or getattr(response, "prepared", True):
        return  # not a response at all (aiohttp reports that as it would): nothing to do either
    response.force_close()


class HandlerExit(Exception):
    """A handler raised SystemExit, KeyboardInterrupt or another BaseException; aiohttp answers it with a 500."""
