"""Limits on what a client may make a worker hold: header and body deadlines, body size, bad-request logging."""

from __future__ import annotations

import logging
import sys
from collections import deque

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from balancer_workers.aiohttp_compat import body_buffer, replace_body_buffer, unread_bytes

SWEEP = 0.25  # seconds between deadline sweeps: every deadline is kept to within this
LOG_WINDOW = 10.0  # seconds over which repeated error lines are counted against LOG_BURST
LOG_BURST = 5  # lines of one kind per LOG_WINDOW; the rest become one summary line
LOG_TEXT = 200  # characters of an error's text kept in its one line (client bytes can be long)
CUT = -1  # a body record's byte mark once its request was answered 408: the next expiry closes the connection


class Limits:
    """One worker's deadlines and body limits; a periodic sweep enforces the deadlines, no timer per connection."""

    def __init__(self, settings: dict, stats, loop) -> None:
        self.stats = stats
        self.loop = loop
        self.header_timeout = settings["header_timeout"]
        # Where the body size limit comes from, for the 413's text: each request carries its limit
        # (request.client_max_size, the Application's), which --client-max-size sets when given (backend.py).
        self.size_origin = "the Application's client_max_size"
        self.body_timeout = settings.get("body_timeout", 0.0)
        # The least a body must bring per window; with a rate of 0 the window is an idle timeout (1 byte).
        self.body_window_bytes = max(1, int(settings.get("body_min_rate", 0) * self.body_timeout))
        # protocol -> monotonic deadline for its first request's headers, set as each connection is made
        # (workers/observe.py). Insertion order is deadline order (one fixed timeout), so the sweep pops expired
        # ones from the front.
        self.deadlines: dict = {}
        # body stream -> (end of its current window, total_bytes at the window's start, its connection's
        # protocol); ordered as above.
        self.bodies: dict = {}
        self.server_log = ServerLog(stats, loop.time)

    # ---- per request with a body ---------------------------------------------------------------

    def watch_body(self, request: web.Request, protocol, stream) -> None:
        """Enforce the body size limit and deadline on request's body, stream (released by release_body)."""
        limit = request.client_max_size  # 0: the app asked for no limit, as aiohttp's read() takes it
        length = request.content_length
        if limit and length is not None and length > limit:
            raise closing(self.too_large(limit, length))
        if limit and length is None:  # chunked: only counting what arrives can tell
            if stream.total_bytes > limit:
                if not stream.is_eof():
                    refuse(stream, protocol)
                raise closing(self.too_large(limit, stream.total_bytes))
            if not stream.is_eof():
                # Counted where aiohttp's parser feeds the stream, not by a second reader of it: aiohttp reads
                # what a handler left unread after answering, and two readers of one stream collide.
                replace_body_buffer(stream, lambda buffer: SizeLimit(buffer, stream, protocol, limit, self))
        if self.body_timeout and not stream.is_eof():  # all here already: nothing to wait for
            self.bodies[stream] = (self.loop.time() + self.body_timeout, stream.total_bytes, protocol)

    def too_large(self, limit: int, size: int) -> web.HTTPRequestEntityTooLarge:
        """The 413 for a body of size bytes, naming the limit and where it was set."""
        return web.HTTPRequestEntityTooLarge(
            max_size=limit, actual_size=size,
            text=f"Maximum request body size {limit} exceeded (the limit is {self.size_origin}).")

    def release_body(self, stream) -> None:
        """The request ended: stop watching its body, and end a body cut off at the size limit."""
        self.bodies.pop(stream, None)
        buffer = body_buffer(stream)
        if type(buffer) is SizeLimit and buffer.passed and not stream.is_eof():
            # Only now, outside aiohttp's parser: EOF tells aiohttp not to read the rest after the response
            # (a read would raise the 413 again, logged as an unhandled exception).
            stream.feed_eof()

    # ---- the sweep -----------------------------------------------------------------------------

    def sweep(self) -> None:
        """Cut off clients past their header deadline or too slow with a body; flush log summaries; re-arm."""
        self.loop.call_later(SWEEP, self.sweep)  # first, so that no failure below stops the sweeps
        now = self.loop.time()
        deadlines = self.deadlines
        while deadlines:
            protocol, deadline = next(iter(deadlines.items()))
            if deadline > now:
                break
            del deadlines[protocol]
            self.stats.header_timeouts += 1
            protocol.force_close()
        bodies = self.bodies
        while bodies:
            stream, (deadline, mark, protocol) = next(iter(bodies.items()))
            if deadline > now:
                break
            del bodies[stream]
            if mark != CUT and (stream.is_eof() or stream.exception() is not None):
                continue  # it all arrived, or it failed (413, client gone): nothing left to wait for
            if mark == CUT:  # answered 408 a window ago and still not finished: the handler ignored it
                protocol.force_close()
                continue
            # A stream with unread bytes is waiting for the handler, not for the client; one paused for the
            # same reason (aiohttp stops reading at its high-water mark) brings nothing in the meantime.
            if stream.total_bytes - mark >= self.body_window_bytes or unread_bytes(stream):
                bodies[stream] = (now + self.body_timeout, stream.total_bytes, protocol)
                continue
            self.stats.body_timeouts += 1
            # The exception before the EOF: a read woken by the EOF alone would see the body as complete.
            stream.set_exception(closing(web.HTTPRequestTimeout()))  # the handler's read raises it: a 408 answer
            refuse(stream, protocol)
            bodies[stream] = (now + self.body_timeout, CUT, protocol)
        self.server_log.flush(now)


def closing(answer: web.HTTPException) -> web.HTTPException:
    """answer, saying Connection: close: the rest of its request's body is not read, or not worth reading."""
    answer.force_close()
    return answer


def refuse(stream, protocol) -> None:
    """Read no more of this body: its connection parses nothing more and closes after the answer."""
    protocol.close()
    stream.feed_eof()  # and aiohttp does not wait for the rest after the answer either


class SizeLimit(deque):
    """A body stream's buffer that fails the stream with 413 once more than limit bytes are fed to it."""

    # aiohttp's StreamReader.feed_data appends each piece to its buffer, then adds it to total_bytes
    # (workers/aiohttp_compat.py checks that).
    __slots__ = ("stream", "protocol", "limit", "limits", "passed")

    def __init__(self, buffer, stream, protocol, limit: int, limits: Limits) -> None:
        super().__init__(buffer)  # what arrived with the headers, not read yet
        self.stream = stream
        self.protocol = protocol
        self.limit = limit
        self.limits = limits
        self.passed = False

    def append(self, data: bytes) -> None:
        """Keep data, or fail the stream with 413 the first time the total passes the limit."""
        if not self.passed:
            total = self.stream.total_bytes + len(data)
            if total > self.limit:
                self.passed = True
                # The parser is still feeding this stream: stop its connection reading (it closes after the
                # answer); EOF comes later, in Limits.release_body, because feeding a stream after its EOF fails.
                self.protocol.close()
                self.stream.set_exception(closing(self.limits.too_large(self.limit, total)))
                return
            super().append(data)


class LogBudget:
    """Lets LOG_BURST lines of one kind out per LOG_WINDOW and counts the rest for one summary line."""

    __slots__ = ("summary", "ends", "used", "held")

    def __init__(self, summary) -> None:
        self.summary = summary  # called with the number of lines held back in a window that ended
        self.ends = 0.0
        self.used = 0
        self.held = 0

    def take(self, now: float) -> int:
        """1 for the window's first line, 2.. for the next ones let out, 0 when this one is held back."""
        if now >= self.ends:
            self.flush(now)
            self.ends = now + LOG_WINDOW
            self.used = 0
        if self.used < LOG_BURST:
            self.used += 1
            return self.used
        self.held += 1
        return 0

    def flush(self, now: float) -> None:
        """Write the summary of a window that has ended, if it held lines back."""
        if self.held and now >= self.ends:
            held, self.held = self.held, 0
            self.summary(held)


def one_line(text: str) -> str:
    """text on one line (aiohttp's parser errors span three), cut to LOG_TEXT characters."""
    text = " ".join(text.split())
    return text if len(text) <= LOG_TEXT else text[:LOG_TEXT] + "..."


class ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger, given to its RequestHandler: bad requests counted, error lines rate-limited."""

    # aiohttp logs each malformed request and each handler exception with a multi-line traceback: a flood of
    # either fills the disk. Here a bad request gets one line, a handler error a traceback only as the first of
    # its window, and past LOG_BURST lines a window ends with one line saying how many were left out.

    def __init__(self, stats, clock) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.stats = stats
        self.clock = clock
        self.bad = LogBudget(lambda n: self.logger.info(
            "%d more bad requests in the last %.0f s not logged (balancer_worker_bad_requests_total counts them)",
            n, LOG_WINDOW))
        self.errors = LogBudget(lambda n: self.logger.error(
            "%d more request errors in the last %.0f s not logged", n, LOG_WINDOW))

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        """aiohttp's error path: a bad request (400) or a handler error (500), or an unhandled one."""
        exc = sys.exc_info()[1] if exc_info is True else exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if isinstance(exc, HttpProcessingError):
            self._bad_request(args, exc)
            return
        nth = self.errors.take(self.clock())
        if nth == 1:
            self.logger.error(msg, *args, exc_info=exc if exc is not None else False)
        elif nth:
            try:
                text = msg % args if args else str(msg)
            except (TypeError, ValueError):
                text = str(msg)
            detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
            self.logger.error("%s", one_line(text + detail))

    def debug(self, msg, *args, **kwargs) -> None:
        """aiohttp sends a first request with a bad method (TLS or noise on the port) here: it counts too."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self._bad_request(args, exc)
        else:
            super().debug(msg, *args, **kwargs)

    def _bad_request(self, args: tuple, exc: HttpProcessingError) -> None:
        """Count one malformed request and log it on one line, within the budget."""
        self.stats.bad_requests += 1
        if self.bad.take(self.clock()):
            remote = args[0] if args else "?"
            self.logger.info("bad request from %s: %s %s: %s", remote, exc.code, type(exc).__name__,
                             one_line(exc.message))

    def flush(self, now: float) -> None:
        """Write the summaries of windows that have ended."""
        self.bad.flush(now)
        self.errors.flush(now)
