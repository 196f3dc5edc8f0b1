"""One worker process's runtime: load the backend, hook aiohttp's Server, serve until told to stop, drain."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import signal
import sys

from aiohttp import http_parser, web

from balancer import wire
from balancer.habits import refusing_run_app
from balancer_workers import aiohttp_compat
from balancer_workers.accesslog import AccessLog
from balancer_workers.backend import BackendError, load_app, skip_router
from balancer_workers.channel import Channel
from balancer_workers.connections import Connections
from balancer_workers.edge import Edge, EdgeError
from balancer_workers.forwarded import ProxyHeaders
from balancer_workers.heartbeat import Heartbeat
from balancer_workers.limits import Limits
from balancer_workers.observe import Observer
from balancer_workers.rebalance import Mover
from balancer_workers.stats import RequestStats
from balancer_workers.tuning import tune_gc

log = logging.getLogger("balancer.worker")

BOOT_ERROR_EXIT = 3


def c_parser_in_use() -> bool:
    """True when aiohttp parses requests with its C parser (the pure-Python one is laxer)."""
    return http_parser.HttpRequestParser is not getattr(http_parser, "HttpRequestParserPy", None)


class WorkerRunner(web.AppRunner):
    """aiohttp's AppRunner whose on_shutdown hooks run once: the drain runs them first, cleanup() finds them done."""

    __slots__ = ("_shut_down",)

    def __init__(self, app: web.Application, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self._shut_down = False

    async def shutdown(self) -> None:
        """The app's on_shutdown hooks, the first time only."""
        if not self._shut_down:
            self._shut_down = True
            await super().shutdown()


class Worker:
    """One worker process's runtime: the aiohttp runner and its hooks, wired to the channel, drain and stats."""

    def __init__(self, channel_sock, settings: dict, ack_board: memoryview) -> None:
        self.settings = settings
        self.slot = settings["slot"]
        self.loop = asyncio.get_running_loop()
        self.stats = RequestStats(ack_board)  # counted on the board, where the master reads them
        self.connections = Connections(self.loop, ack_board)
        self.channel = Channel(channel_sock, self.loop, ack_board, serve=self.connections.serve,
                               on_drain=functools.partial(self.stop, "master"),
                               on_gone=functools.partial(self.stop, "master gone"))
        self.heartbeat = Heartbeat(self.loop, self.channel, self.stats, self.connections,
                                   settings.get("beat_interval", 1.0))
        self.stopped = self.loop.create_future()  # set when it is time to drain
        self.mover: Mover | None = None  # gives idle keep-alive connections back (--keepalive-rebalance)
        self.runner: web.AppRunner | None = None
        self.limits = Limits(settings, self.stats, self.loop)  # header and body deadlines, body size, bad requests
        limit = settings.get("max_requests", 0)
        self.observer = Observer(self.stats, self.limits, self.heartbeat.ask_recycle,
                                 limit + random.randint(0, settings.get("max_requests_jitter", 0)) if limit else 0,
                                 access=AccessLog.from_settings(settings))

    # ---- boot ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Load the backend, report READY, serve until told to stop, drain, and return an exit code."""
        try:  # TLS files are read at every boot: a reload (SIGHUP) serves certificates rotated on disk
            edge = Edge.from_settings(self.loop, self.connections, self.stats, self.settings)
        except EdgeError as exc:
            return self._boot_failed(str(exc))
        try:
            aiohttp_compat.require()  # an aiohttp whose internals moved: refused here, not served half-watched
            with refusing_run_app():  # a module that ends in web.run_app(app) gets told to guard that call
                backend = await load_app(self.settings["backend"], self.settings.get("app_dir", ""),
                                         client_max_size=self.settings.get("client_max_size", 0))
            self.limits.size_origin = backend.size_origin
            self.runner = WorkerRunner(
                backend.app,
                handle_signals=False,
                # No aiohttp access logger: every response goes through the observer's log_access() instead
                # (observe.py), which counts and times it and writes the access line when that is on.
                access_log=None,
                keepalive_timeout=self.settings["keepalive_timeout"],
                tcp_keepalive=False,  # SO_KEEPALIVE and its timings are inherited from the master's listener
                shutdown_timeout=1.0,  # only what is still running at the graceful deadline waits this
                logger=self.limits.server_log,  # bad requests counted, error tracebacks rate-limited
            )
            await self.runner.setup()
        except (BackendError, aiohttp_compat.AiohttpChanged) as exc:
            return self._boot_failed(str(exc))
        except Exception as exc:  # on_startup hooks are the user's code too
            log.debug("backend startup failed", exc_info=True)
            return self._boot_failed(f"backend startup failed: {type(exc).__name__}: {exc}")
        if self.settings.get("keepalive_rebalance", True) and (edge is None or edge.tls is None):
            self.mover = Mover(self.loop, self.channel, self.connections, self.observer.started,
                               self.observer.arrived)  # never TLS
            self.channel.on_peers = self.mover.set_peers
        self._hook_server(self.runner.server, skip_router(backend) if backend.route else None)
        if edge is not None:  # PROXY header and TLS handshake before aiohttp; without them the plain path
            self.channel.serve = edge.serve
        aiohttp_compat.skip_second_nodelay()
        tune_gc()  # last before serving: what booting made is frozen, and the app's own gc choice is seen
        self.channel.start()
        self.loop.add_signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        if not c_parser_in_use():
            log.warning("aiohttp's C HTTP parser is not in use; the pure-Python parser is slower and laxer")
        self.channel.send(wire.encode_json(wire.READY, {"pid": os.getpid(), "c_parser": c_parser_in_use(),
                                                        "peers": self.mover is not None}))
        self.heartbeat.start()
        self.limits.sweep()
        await self.stopped
        await self._drain()
        return 0

    def _boot_failed(self, text: str) -> int:
        """Tell the master why we cannot serve, then exit with the boot-error code."""
        try:
            self.channel.sock.setblocking(True)
            self.channel.sock.send(wire.encode_json(wire.BOOT_ERROR, text))
        except OSError:
            print(f"balancer worker: {text}", file=sys.stderr)
        return BOOT_ERROR_EXIT

    def _hook_server(self, server, dispatch=None) -> None:
        """Serve aiohttp's Server's connections with the observer's protocol, counted in and out."""
        # Observe requests where aiohttp's Server calls the Application, outside every middleware: a
        # middleware of our own would cost aiohttp's per-middleware wrapping on every request.
        # dispatch, for a bare handler, replaces the Application's routing (workers/backend.py skip_router).
        request_factory = None
        if self.settings.get("proxy_headers"):
            # In the request factory, so the access log and error lines see the client as the handler does.
            # Off (--no-proxy-headers), nothing is added to the request path.
            proxy = ProxyHeaders(self.settings["forwarded_allow_ips"], self.settings.get("forwarded_host", False))
            request_factory = proxy.wrap(server.request_factory)
        self.connections.protocol_factory = self.observer.protocol_factory(server, self.loop, dispatch, request_factory,
                                                                 self.connections, self.mover)

    # ---- leaving -------------------------------------------------------------------------------

    def stop(self, why: str) -> None:
        """Begin draining (DRAIN from the master, SIGTERM, or the master gone)."""
        # At once, not when _drain() gets scheduled: a handoff read in the same batch as DRAIN is refused.
        self.channel.refusing = True
        self.observer.drain()
        if not self.stopped.done():
            log.debug("draining (%s)", why)
            self.stopped.set_result(why)

    async def _drain(self) -> None:
        """on_shutdown; no new connections, each open one closes after its next response or keep-alive expiry."""
        grace = self.settings["graceful_timeout"]
        deadline = self.loop.time() + grace
        # The app's on_shutdown hooks first, where aiohttp's own runner (run_app, gunicorn's worker) runs them
        # as a stop begins: apps close their websockets and event streams there (GOING_AWAY), which then end
        # with a close frame instead of being cut at the graceful deadline.
        try:
            await asyncio.wait_for(self.runner.shutdown(), grace)
        except asyncio.TimeoutError:
            log.warning("on_shutdown hooks still running at --graceful-timeout %gs; cancelled", grace)
        except Exception:
            log.exception("an on_shutdown hook failed; draining on")
        await self.connections.wait_idle(max(0.0, deadline - self.loop.time()))
        # Past the graceful deadline: cut what is still open now. aiohttp's cleanup would wait for each running
        # handler again (shutdown_timeout, twice), racing the master's SIGKILL, which loses the final report.
        for protocol in self.runner.server.connections:
            protocol.force_close()
        await self.runner.cleanup()
        # Requests cut off at the graceful deadline were counted (499) as their connections closed during the
        # cleanup; any whose close is still queued are counted here, before the final report.
        self.observer.cut_off()
        self.channel.read()  # handoffs that raced the drain are refused before the master sees our EOF
        self.heartbeat.send_final()  # the final figures: requests since the last beat must not vanish
        self.channel.close()
