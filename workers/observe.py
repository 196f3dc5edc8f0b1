"""Per-request observation: timing, counts, limits and the access log; a handler's BaseException made a 500."""

from __future__ import annotations

import asyncio
from time import perf_counter

from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_exceptions import HTTPException
from aiohttp.web_protocol import RequestHandler

# Counted for a request whose handler never finished: its client went away, or the graceful deadline cut it.
GONE = 499


class Observer:
    """One worker's request bookkeeping, split between the start of a request and its access-log call.

    aiohttp's RequestHandler calls its log_access() after every response it writes, whatever the handler did
    (returned, raised an HTTP error, crashed into a 500), with the request and the response. The worker's
    connections are RequestHandlers whose log_access() is finish(); the start time is noted where the handler
    is called. The counting costs two plain function calls per request: done in a coroutine wrapped around
    the handler it cost a frame, an await and a try/finally more, and aiohttp's own access-logger object (one
    per connection) adds two clock reads per request on top. The one coroutine around the handler is
    guarded(), a bare try/except (about 0.6% of a keep-alive request's instructions).
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
        # protocol -> (perf_counter() at its current request's start, its method). aiohttp serves one request
        # at a time per connection, so the protocol names the request; its size is the in-flight gauge.
        # perf_counter, not aiohttp's loop.time(): uvloop's clock has millisecond resolution.
        self.started = stats.started

    def wrap(self, inner):
        """The request handler aiohttp's Server calls: note the start, check the body, then call inner."""
        started, deadlines, limits = self.started, self.limits.deadlines, self.limits

        def handle(request):
            protocol = request._protocol
            deadlines.pop(protocol, None)  # its headers are in: the header deadline is lifted
            started[protocol] = (perf_counter(), request._method)
            if request._payload is not EMPTY_PAYLOAD:
                limits.watch_body(request)  # may raise 413: aiohttp answers it, and logs it through log()
            return guarded(inner(request), self, protocol)

        return handle

    def drain(self) -> None:
        """From now on each connection ends after the response to the last request it has sent in full.

        Requests a client pipelined are received whole before they are answered: each is answered before its
        connection closes, or it would be lost though the client did nothing wrong. So a response says
        Connection: close only when, as its handler returns, no parsed request waits behind it (guarded()):
        decided then, not when the drain began, a request pipelined while the handler ran is answered too.
        """
        self.draining = True

    def closing(self, protocol) -> bool:
        """True when a response now ready is to end its connection: draining, and nothing queued behind it."""
        return self.draining and not protocol._messages

    def protocol_factory(self, server, loop):
        """What makes each connection's protocol: aiohttp's RequestHandler, with finish() as its log_access()."""

        class ObservedRequestHandler(RequestHandler):
            __slots__ = ()
            log_access = staticmethod(self.finish)  # no frame of its own between aiohttp and finish()

            def log_exception(self, *args, **kwargs) -> None:
                """A handler failing because its client left (a body read cut off) is no server error."""
                if self.transport is None and isinstance(kwargs.get("exc_info"), ConnectionError):
                    self.logger.debug(*args, **kwargs)
                    return
                super().log_exception(*args, **kwargs)

        # As aiohttp's Server.__call__ does, with the Server's own handler options (its _kwargs: there is no
        # public way to give Server a RequestHandler class); the Server stays the manager of each connection.
        kwargs = server._kwargs

        def make_protocol() -> RequestHandler:
            return ObservedRequestHandler(server, loop=loop, **kwargs)

        return make_protocol

    def finish(self, request, response, start_time=None) -> None:
        """A response was written (or failed to be): count it with its duration; release its body; log it."""
        end = perf_counter()
        protocol = request._protocol
        # None: not through our handler (aiohttp's own 400 for a request it could not parse), or already
        # counted as cut off by lost(): its client left while the handler ran, and the handler went on to fail
        # (a body read raising ConnectionResetError, answered 500 to nobody) or to answer.
        started = self.started.pop(protocol, None)
        if request._payload is not EMPTY_PAYLOAD:
            self.limits.release_body(request._payload)
        if started is None and protocol.transport is None:
            return
        seconds = end - started[0] if started is not None else 0.0
        stats = self.stats
        stats.observe(request._method, response._status, seconds)
        if self.access is not None:
            self.access.log(request, response, seconds)
        if self.request_limit and stats.count >= self.request_limit:
            self.on_limit()

    def lost(self, protocol) -> None:
        """A connection closed: a request still running on it is counted as cut off."""
        started = self.started.pop(protocol, None)
        if started is not None:
            self.stats.observe(started[1], GONE, perf_counter() - started[0])

    def cut_off(self) -> None:
        """At the final report: count every request still without a response."""
        for protocol in list(self.started):
            self.lost(protocol)


class HandlerExit(Exception):
    """A handler raised SystemExit, KeyboardInterrupt or another BaseException; aiohttp answers it with a 500."""


async def guarded(handler, observer: Observer, protocol):
    """Await the handler; a BaseException it raises (not a cancellation) becomes a HandlerExit.

    aiohttp answers an Exception with a 500 and serves on, but a SystemExit or KeyboardInterrupt (a sys.exit()
    in a handler) goes up through the event loop and ends the worker with every request it is serving, and
    another BaseException drops the connection unanswered. A cancellation stays one: it is how aiohttp
    stops a handler whose client left. While the worker drains, the response (or the HTTP error raised)
    is made to end its connection when nothing is queued behind it and its headers are still to go out
    (Observer.drain, end_after).
    """
    try:
        response = await handler
    except HTTPException as exc:
        if observer.closing(protocol):
            exc.force_close()
        raise
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:
        raise HandlerExit(f"the handler raised {type(exc).__name__}: {exc}") from exc
    if observer.draining and observer.closing(protocol):  # draining first: every request passes here
        end_after(response)
    return response


def end_after(response) -> None:
    """While draining: make response end its connection, unless its headers went out already.

    A streamed response whose headers went out keep-alive (prepared before the drain began) is left as it
    went: the client may send its next request on the connection, which is then answered with Connection:
    close, or the connection closes idle at --keepalive-timeout. Closing it after the response would drop
    that next request.
    """
    if not getattr(response, "prepared", True):  # not a response at all: aiohttp reports that as it would
        response.force_close()
