"""Per-request observation: timing, counts, limits and the access log, without a coroutine around the handler."""

from __future__ import annotations

from time import perf_counter

from aiohttp.abc import AbstractAccessLogger
from aiohttp.streams import EMPTY_PAYLOAD

# Counted for a request whose handler never finished: its client went away, or the graceful deadline cut it.
GONE = 499


class Observer:
    """One worker's request bookkeeping, split between the start of a request and aiohttp's access-log call.

    aiohttp calls its access logger after every response it writes, whatever the handler did (returned, raised
    an HTTP error, crashed into a 500), with the request and the response. Recording there, and only noting
    the start time where the handler is called, costs two plain function calls per request; a coroutine
    wrapped around the handler cost an extra frame, an await and a try/finally on every request.
    A request whose handler is cancelled (client gone, graceful deadline) gets no access-log call: it is
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
            if self.draining:
                close_after(request)
            started[protocol] = (perf_counter(), request.method)
            if request._payload is not EMPTY_PAYLOAD:
                limits.watch_body(request)  # may raise 413: aiohttp answers it, and logs it through log()
            # A plain function returning inner's coroutine: aiohttp awaits it, and no frame of ours stays.
            return inner(request)

        return handle

    def drain(self) -> None:
        """From now on every response says Connection: close, including those of requests running now."""
        self.draining = True
        for protocol in self.started:
            request = protocol._current_request
            if request is not None:
                close_after(request)

    def access_logger_class(self):
        """An AbstractAccessLogger subclass whose log() is this observer's finish()."""

        class RequestObserver(AbstractAccessLogger):
            __slots__ = ()
            enabled = True  # aiohttp then calls log() for every response it writes
            log = staticmethod(self.finish)  # no frame of its own between aiohttp and finish()

        return RequestObserver

    def finish(self, request, response, time: float = 0.0) -> None:
        """A response was written (or failed to be): count it with its duration; release its body; log it."""
        end = perf_counter()
        # None: not through our handler (aiohttp's own 400 for a request it could not parse).
        start, _ = self.started.pop(request._protocol, None) or (end, None)
        if request._payload is not EMPTY_PAYLOAD:
            self.limits.release_body(request._payload)
        stats = self.stats
        stats.observe(request.method, response.status, end - start)
        if self.draining:  # prepared before the drain began, so it went out keep-alive: end the connection now
            response.force_close()
        if self.access is not None:
            self.access.log(request, response, end - start)
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


def close_after(request) -> None:
    """Make request's response (unless already sent) say Connection: close, and its connection end after it."""
    request._message = request._message._replace(should_close=True)
