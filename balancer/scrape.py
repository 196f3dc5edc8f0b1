"""The master's small HTTP/1.1 server for /metrics, /healthz and /readyz, on h11 and asyncio streams.

The master answers three GET routes to scrapers and probes. aiohttp's server did it at the price of its whole
web stack in the master's memory (about a third of the master's resident set, in every instance of a pod);
h11 parses and frames HTTP/1.1 (keep-alive, pipelining, HEAD, malformed input) in a fraction of that, and
this file adds only routing, limits and timeouts.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Awaitable, Callable

import h11

log = logging.getLogger("balancer")

Reply = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[dict[str, str]], Awaitable[Reply]]  # called with the request's headers, names lower-case

# A scraper keeps its connection between scrapes (Prometheus: every 15 s to 1 min). A request must be complete
# this long after its connection went idle: a client that sends nothing, or drips its headers, is let go.
IDLE_TIMEOUT = 15.0
# Scrapers and probes send their request as soon as they connect: a new connection has this long for it.
FIRST_REQUEST_TIMEOUT = 5.0
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024  # no route reads a body; past this the client is answered 413 and let go
# Scrapers and probes need a handful; the master's other fds are for dispatch. At the cap a new connection
# ends the one idle longest instead of being refused, so idle connections cannot keep /healthz unanswered.
MAX_CONNECTIONS = 128
# After the last reply the master shuts its side and reads what the client still sends for this long: closing
# with unread input makes the kernel send a reset, which can destroy the reply before the client reads it.
LINGER = 1.0
GZIP_MIN_BYTES = 1024
READ_SIZE = 64 * 1024
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large",
           500: b"Internal Server Error", 501: b"Not Implemented", 503: b"Service Unavailable",
           505: b"HTTP Version Not Supported"}


@dataclass
class Asked:
    """One request as the routes see it, or the reply it gets without reaching them."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    early: Reply | None = None  # answered without routing (a body too large, a target that is not a path)
    close: bool = False  # end the connection after the reply (Transfer-Encoding and Content-Length both sent)


class ScrapeServer:
    """GET and HEAD on a fixed set of paths; keep-alive, pipelining and gzip when asked; nothing else."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.server: asyncio.Server | None = None
        self.clients: set[asyncio.Task] = set()
        # Those waiting for their client, in the order they began to (a dict as an ordered set): the first is
        # the one idle longest, ended when a new connection needs its place.
        self.idle: dict[asyncio.Task, None] = {}

    async def start(self, host: str, port: int, sock=None) -> tuple[str, int]:
        """Listen on host:port (every address host resolves to), or on sock; returns the first bound address."""
        if sock is not None:  # the one a master upgrade carried across its exec
            self.server = await asyncio.start_server(self.serve, sock=sock, limit=READ_SIZE)
        else:
            self.server = await asyncio.start_server(self.serve, host, port, limit=READ_SIZE)
        return self.server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        """Stop listening and end every connection, a scrape in progress included."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for task in list(self.clients):
            task.cancel()
        if self.clients:
            await asyncio.wait(list(self.clients), timeout=1.0)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests in order until either side closes, the client idles out, or it misbehaves."""
        if len(self.clients) >= MAX_CONNECTIONS and not self.end_idlest():
            writer.transport.abort()  # every one is being answered: each is bounded in time, this one is not
            return
        task = asyncio.current_task()
        self.clients.add(task)
        try:
            await self.converse(reader, writer)
            self.idle[task] = None
            await linger(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.CancelledError):  # cancelled: closed, or ended as idlest
            pass
        except Exception:  # a bug here must cost one connection, never the master's loop
            log.exception("metrics endpoint: a connection failed")
        finally:
            self.clients.discard(task)
            self.idle.pop(task, None)
            writer.transport.abort()  # nothing left to flush: every reply was drained, or it is too late

    def end_idlest(self) -> bool:
        """End the connection that has waited for its client longest; False when none waits."""
        if not self.idle:
            return False
        task = next(iter(self.idle))
        del self.idle[task]
        task.cancel()
        return True

    async def converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The request/response cycles of one connection."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        task = asyncio.current_task()
        wait = FIRST_REQUEST_TIMEOUT
        while True:
            self.idle[task] = None
            try:
                async with asyncio.timeout(wait):
                    asked = await next_request(conn, reader, writer)
            except TimeoutError:
                if conn.their_state is not h11.IDLE or conn.trailing_data[0]:  # it had started a request
                    await send(conn, writer, "GET", (408, "text/plain", b"request timeout\n"), {}, close=True)
                return
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    await send(conn, writer, "GET", (status, "text/plain", f"{exc}\n".encode()), {}, close=True)
                return
            finally:
                self.idle.pop(task, None)
            wait = IDLE_TIMEOUT
            if asked is None:  # the client closed between requests
                return
            close = asked.close or (asked.early is not None and conn.their_state is h11.SEND_BODY)  # body unread
            reply = asked.early or await self.route(asked)
            await send(conn, writer, asked.method, reply, asked.headers, close=close)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def route(self, asked: Asked) -> Reply:
        """The route's reply; a route that raises is a 500, logged."""
        route = self.routes.get(asked.path)
        if route is None:
            return 404, "text/plain", b"not found\n"
        if asked.method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        try:
            return await route(asked.headers)
        except Exception:
            log.exception("metrics endpoint: %s %s failed", asked.method, asked.path)
            return 500, "text/plain", b"internal error\n"


async def next_request(conn: h11.Connection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> Asked | None:
    """The next whole request on conn (its body read and dropped), or None at a clean end of stream."""
    request: h11.Request | None = None
    body = 0
    close = False
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:  # the client sends its (small) body once told to
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
            data = await reader.read(READ_SIZE)
            if not data and request is None and conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                return None
            conn.receive_data(data)  # b"" tells h11 the client closed: a half-sent request is its error
        elif isinstance(event, h11.Request):
            request = event
            # h11 bounds only a head still incomplete; one that arrived whole in a single read is checked here.
            if len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers) > MAX_HEADER_BYTES:
                return Asked(event.method.decode("ascii"), "", early=(431, "text/plain", b"headers too large\n"))
            target = event.target.split(b"?", 1)[0]
            method = event.method.decode("ascii")
            if event.http_version not in (b"1.0", b"1.1"):
                return Asked(method, "", early=(505, "text/plain", b"HTTP/1.1 or 1.0 only\n"))
            if not target.startswith(b"/"):  # absolute-form or "*": no proxying here
                return Asked(method, "", early=(400, "text/plain", b"bad request target\n"))
            names = {name for name, _ in event.headers}
            if b"content-length" in names:
                if b"transfer-encoding" in names:  # RFC 9112 6.1: framed by the chunks, then the connection ends
                    close = True
                elif int(dict(event.headers)[b"content-length"]) > MAX_BODY_BYTES:  # h11 checked it is a number
                    return Asked(method, "", early=(413, "text/plain", b"body too large\n"))
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_BODY_BYTES:
                return Asked(request.method.decode("ascii"), "", early=(413, "text/plain", b"body too large\n"))
        elif isinstance(event, h11.EndOfMessage):
            headers: dict[str, str] = {}
            for name, value in request.headers:  # h11 lower-cases names; repeated fields join as RFC 9110 says
                key, text = name.decode("latin-1"), value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            return Asked(request.method.decode("ascii"), target.decode("latin-1"), headers, close=close)
        else:  # ConnectionClosed
            return None


async def send(conn: h11.Connection, writer: asyncio.StreamWriter, method: str, reply: Reply,
               headers: dict[str, str], close: bool) -> None:
    """Write one response (its head only for HEAD); close=True says Connection: close and h11 ends the cycle."""
    status, content_type, body = reply
    fields = [(b"Content-Type", content_type.encode("latin-1")), (b"Date", formatdate(usegmt=True).encode())]
    if status == 405:
        fields.append((b"Allow", b"GET, HEAD"))
    if status == 200 and len(body) >= GZIP_MIN_BYTES:
        fields.append((b"Vary", b"Accept-Encoding"))  # caches must not serve one form for the other
        if accepts_gzip(headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=6)
            fields.append((b"Content-Encoding", b"gzip"))
    fields.append((b"Content-Length", str(len(body)).encode()))
    if close:
        fields.append((b"Connection", b"close"))
    data = conn.send(h11.Response(status_code=status, headers=fields, reason=REASONS.get(status, b"")))
    if method != "HEAD" and body:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    writer.write(data)
    async with asyncio.timeout(IDLE_TIMEOUT):  # a client that does not read its reply is let go (TimeoutError)
        await writer.drain()


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send FIN, then read and drop what the client still sends, until it closes or LINGER runs out."""
    if writer.transport.is_closing():
        return
    writer.write_eof()
    dropped = 0
    try:
        async with asyncio.timeout(LINGER):
            while dropped <= MAX_BODY_BYTES and (data := await reader.read(READ_SIZE)):
                dropped += len(data)
    except TimeoutError:
        pass


def accepts_gzip(accept_encoding: str) -> bool:
    """True when an Accept-Encoding value lists gzip (with any q but 0)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False
