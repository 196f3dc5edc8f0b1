"""Receive connection fds from the master, serve them with aiohttp, drain, heartbeat, report."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import signal
import socket
import sys
import _socket
from collections import deque

from aiohttp import http_parser, streams, web

from balancer import board, wire
from workers.backend import BackendError, load_app, skip_router
from workers.stats import RequestStats

log = logging.getLogger("balancer.worker")

BOOT_ERROR_EXIT = 3
HEADER_SWEEP = 0.25  # seconds between header-deadline sweeps: the deadline is kept to within this


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


def c_parser_in_use() -> bool:
    """True when aiohttp parses requests with its C parser (the pure-Python one is laxer)."""
    return http_parser.HttpRequestParser is not getattr(http_parser, "HttpRequestParserPy", None)


class Worker:
    """One worker process's runtime: channel to the master, the aiohttp runner, drain and stats."""

    def __init__(self, channel: socket.socket, settings: dict, ack_board: memoryview) -> None:
        self.channel = channel
        self.board = ack_board  # acks and closes, read by the master (balancer/board.py)
        self.handled = 0  # handoff messages handled, taken or refused
        self.refused = 0
        self.closed = 0  # connections closed since start
        self.settings = settings
        self.slot = settings["slot"]
        self.loop = asyncio.get_running_loop()
        self.stats = RequestStats()
        self.open = 0
        self.draining = False
        self.master_gone = False
        self.stopped = self.loop.create_future()  # set when it is time to drain
        self.idle = asyncio.Event()  # set while draining once no connection is open
        self.runner: web.AppRunner | None = None
        self.server = None
        self._outbox: deque[bytes] = deque()
        self._inbox = wire.inbox(wire.MASTER_MSG_BYTES)
        # protocol -> monotonic deadline for its first request's headers. Insertion order is deadline order
        # (one fixed timeout), so a periodic sweep pops expired ones from the front: no timer per connection.
        self._deadlines: dict = {}
        self._socks: dict = {}  # protocol -> our socket object for its fd, to shut it down on close
        limit = settings.get("max_requests", 0)
        self.request_limit = limit + random.randint(0, settings.get("max_requests_jitter", 0)) if limit else 0
        self._recycle_asked = False
        self._pumps: set[asyncio.Task] = set()  # body-limit pumps, referenced until done

    # ---- boot ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Load the backend, report READY, serve until told to stop, drain, and return an exit code."""
        channel = self.channel
        channel.setblocking(False)
        try:
            backend = await load_app(self.settings["backend"], self.settings.get("app_dir", ""),
                                     client_max_size=self.settings["client_max_size"])
            self.runner = web.AppRunner(
                backend.app,
                handle_signals=False,
                access_log=logging.getLogger("aiohttp.access") if self.settings.get("access_log") else None,
                keepalive_timeout=self.settings["keepalive_timeout"],
                tcp_keepalive=False,  # SO_KEEPALIVE and its timings are inherited from the master's listener
                shutdown_timeout=1.0,  # only what is still running at the graceful deadline waits this
            )
            await self.runner.setup()
        except BackendError as exc:
            return self._boot_failed(str(exc))
        except Exception as exc:  # on_startup hooks are the user's code too
            log.debug("backend startup failed", exc_info=True)
            return self._boot_failed(f"backend startup failed: {type(exc).__name__}: {exc}")
        self._hook_server(self.runner.server, skip_router(backend) if backend.route else None)
        self.loop.add_reader(channel.fileno(), self._on_channel)
        self.loop.add_signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        if not c_parser_in_use():
            log.warning("aiohttp's C HTTP parser is not in use; the pure-Python parser is slower and laxer")
        self._send(wire.encode_json(wire.READY, {"pid": os.getpid(), "c_parser": c_parser_in_use()}))
        self._beat()
        self._sweep_header_deadlines()
        await self.stopped
        await self._drain()
        return 0

    def _boot_failed(self, text: str) -> int:
        """Tell the master why we cannot serve, then exit with the boot-error code."""
        try:
            self.channel.setblocking(True)
            self.channel.send(wire.encode_json(wire.BOOT_ERROR, text))
        except OSError:
            print(f"balancer worker: {text}", file=sys.stderr)
        return BOOT_ERROR_EXIT

    def _hook_server(self, server, dispatch=None) -> None:
        """Count connections in and out of aiohttp's Server (it has no public callbacks for this)."""
        self.server = server
        # Observe requests where aiohttp's Server calls the Application, outside every middleware: an
        # inserted middleware of our own cost ~6% of keep-alive throughput in aiohttp's per-middleware wrapping.
        # dispatch, for a bare handler, replaces the Application's routing (workers/backend.py skip_router).
        server.request_handler = functools.partial(self._observe, handler=dispatch or server.request_handler)
        made, lost = server.connection_made, server.connection_lost
        header_timeout = self.settings["header_timeout"]
        clock = self.loop.time
        socks = self._socks
        deadlines = self._deadlines

        def connection_made(handler, transport):
            made(handler, transport)
            deadlines[handler] = clock() + header_timeout

        def connection_lost(handler, exc=None):
            sock = socks.pop(handler, None)
            if sock is not None:
                # The master may still hold its copy of this fd (its ack is not processed yet); the last
                # close() does the TCP teardown, and on loopback that costs ~10 us. shutdown() here does it
                # in this worker, where the connection lived, instead of in the master's hot loop.
                shutdown_quietly(sock)
            lost(handler, exc)
            deadlines.pop(handler, None)
            self._count_closed()

        server.connection_made = connection_made
        server.connection_lost = connection_lost

    def _sweep_header_deadlines(self) -> None:
        """Cut off clients that have not completed their first request's headers in time (slowloris)."""
        now = self.loop.time()
        deadlines = self._deadlines
        while deadlines:
            handler, deadline = next(iter(deadlines.items()))
            if deadline > now:
                break
            del deadlines[handler]
            self.stats.header_timeouts += 1
            handler.force_close()
        if not self.master_gone or deadlines:
            self.loop.call_later(HEADER_SWEEP, self._sweep_header_deadlines)

    # ---- the hot path ------------------------------------------------------------------------

    def _on_channel(self) -> None:
        """Take every waiting message from the master."""
        while True:
            try:
                msg, fds, truncated = wire.recv_message(self.channel, self._inbox)
            except BlockingIOError:
                return
            except OSError:
                msg, fds, truncated = b"", [], False
            if not msg and not fds:
                self._master_gone()
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
                ids, families = wire.decode_handoff(msg)
            except wire.ProtocolError:
                self._publish()  # taken and lost: the master must not give these half-seen fds to anyone else
                raise
            if truncated or len(fds) != len(ids) or self.draining:
                # Some fds were lost in transit (MSG_CTRUNC) or we are leaving: the master still holds
                # its copies and gives every one of them to another worker.
                wire.close_all(fds)
                self._send(wire.encode_ids(wire.REFUSE, ids))  # the ids first, then the count that says so
                self.refused += 1
                self._publish()
                return
            self._publish()  # the ack
            self._serve(fds, families)
        elif kind == wire.DRAIN:
            wire.close_all(fds)
            self.stop("master")
        else:
            wire.close_all(fds)
            raise wire.ProtocolError(f"unknown message type {kind:#x}")

    def _serve(self, fds: list[int], families: list[int]) -> None:
        """Wrap each fd (family known, so no getsockopt probing) and attach it to aiohttp's protocol."""
        self.open += len(fds)  # counted from the ack, so a drain never misses one still connecting
        connect, server = self.loop.connect_accepted_socket, self.server
        for fd, family in zip(fds, families):
            try:
                sock = AcceptedSocket(family, socket.SOCK_STREAM, 0, fd)
            except OSError:
                os.close(fd)
                self._count_closed()
                continue
            self._drive(connect(server, sock), sock)

    def _drive(self, coro, sock: socket.socket, _done=None) -> None:
        """Run connect_accepted_socket to its end without a Task: resumed by each future it waits on.

        A Task per batch, awaiting each connect in turn, cost one Task and two loop turns per connection.
        """
        try:
            waiting = coro.send(None)
        except StopIteration as finished:
            protocol = finished.value[1]
            if protocol.transport is not None:  # still open: remember our socket for its shutdown
                self._socks[protocol] = sock
            return
        except Exception as exc:  # OSError: the connection died first; anything else is logged, not lost
            if not isinstance(exc, OSError):
                log.error("attaching a connection failed: %r", exc)
            shutdown_quietly(sock)
            sock.close()
            self._count_closed()  # it died before aiohttp got it: still counted as closed
            return
        waiting._asyncio_future_blocking = False  # what a Task does with a future it was handed
        waiting.add_done_callback(functools.partial(self._drive, coro, sock))

    async def _observe(self, request: web.Request, handler):
        """Time and count one request; answer with Connection: close while draining."""
        self._deadlines.pop(request.protocol, None)
        stats = self.stats
        stats.inflight += 1
        start = self.loop.time()
        status = 500
        try:
            if request.body_exists:
                request = self._limit_body(request)
            response = await handler(request)
            status = response.status
            if self.draining:
                response.force_close()
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # client went away mid-request
            raise
        finally:
            stats.inflight -= 1
            stats.observe(request.method, status, self.loop.time() - start)
            if self.request_limit and stats.count >= self.request_limit and not self._recycle_asked:
                self._recycle_asked = True
                self._beat(reschedule=False)

    def _limit_body(self, request: web.Request) -> web.Request:
        """Enforce --client-max-size on every body: by Content-Length up front, by counting when chunked."""
        limit = self.settings["client_max_size"]
        length = request.content_length
        if length is not None:
            if length > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
            return request  # the parser never reads past Content-Length
        # _payload, not .content: .content is cached on first read, and the swap below must not be undone
        source = request._payload
        limited = streams.StreamReader(request.protocol, 2 ** 16, loop=self.loop)

        async def pump() -> None:
            total = 0
            try:
                async for chunk in source.iter_any():
                    total += len(chunk)
                    if total > limit:
                        limited.set_exception(web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=total))
                        return
                    limited.feed_data(chunk)
                limited.feed_eof()
            except Exception as exc:
                limited.set_exception(exc)

        task = self.loop.create_task(pump())
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)
        # aiohttp has no public way to swap a request's body stream; only chunked uploads pay for this.
        request._payload = limited
        return request

    # ---- reports to the master -----------------------------------------------------------------

    def _send(self, msg: bytes) -> None:
        """Queue msg for the master, in order; never block the loop and never drop an ack."""
        if self.master_gone:
            return
        if not self._outbox:
            try:
                self.channel.send(msg)
                return
            except BlockingIOError:
                self.loop.add_writer(self.channel.fileno(), self._flush_outbox)
            except OSError:
                self._master_gone()
                return
        self._outbox.append(msg)

    def _flush_outbox(self) -> None:
        """Send what queued up while the channel was full."""
        while self._outbox:
            try:
                self.channel.send(self._outbox[0])
            except BlockingIOError:
                return
            except OSError:
                self._outbox.clear()
                self._master_gone()
                break
            self._outbox.popleft()
        self.loop.remove_writer(self.channel.fileno())
        self._publish()

    def _publish(self) -> None:
        """Store the handled and refused counts on the board: the master's ack, one 8-byte store.

        Not while reports wait in the outbox: a REFUSE must reach the master before the count that covers it.
        """
        if not self._outbox:
            self.board[board.HANDLED] = board.pack(self.handled, self.refused)

    def _count_closed(self) -> None:
        """One of our connections closed: tell the master through the board."""
        self.open -= 1
        self.closed += 1
        self.board[board.CLOSED] = self.closed
        if self.draining and self.open == 0:
            self.idle.set()

    def _beat(self, reschedule: bool = True) -> None:
        """Heartbeat from the event loop itself: if the loop is blocked, no beat goes out."""
        body = self.stats.snapshot()
        body["open"] = self.open
        if self._recycle_asked:
            body["recycle"] = True
        self._send(wire.encode_json(wire.BEAT, body))
        if reschedule and not self.master_gone:
            self.loop.call_later(self.settings.get("beat_interval", 1.0), self._beat)

    # ---- leaving -------------------------------------------------------------------------------

    def stop(self, why: str) -> None:
        """Begin draining (DRAIN from the master, SIGTERM, or the master gone)."""
        # At once, not when _drain() gets scheduled: a handoff read in the same batch as DRAIN is refused.
        self.draining = True
        if not self.stopped.done():
            log.debug("draining (%s)", why)
            self.stopped.set_result(why)

    def _master_gone(self) -> None:
        """The channel closed: the master died. Finish what we have and exit."""
        if not self.master_gone:
            self.master_gone = True
            try:
                self.loop.remove_reader(self.channel.fileno())
                self.loop.remove_writer(self.channel.fileno())
            except (ValueError, OSError):
                pass
            self.stop("master gone")

    async def _drain(self) -> None:
        """No new connections; each open one closes after its next response or keep-alive expiry."""
        self.draining = True
        if self.open:
            self.idle.clear()
            try:
                await asyncio.wait_for(self.idle.wait(), self.settings["graceful_timeout"])
            except asyncio.TimeoutError:
                log.warning("graceful timeout with %d connections open; closing them", self.open)
        await self.runner.cleanup()
        self._flush_outbox()
