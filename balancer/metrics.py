"""Prometheus endpoint of the master: per-slot worker series that survive restarts, /healthz and /readyz."""

from __future__ import annotations

import asyncio
import errno
import importlib.metadata
import logging
import os
import platform

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                            Metric)
from prometheus_client.utils import floatToGoString

from balancer import __version__, handoff
from balancer.board import BUCKETS
from balancer.config import parse_bind
from balancer.errnos import RESOURCE_ERRNOS
from balancer.process import Phase
from balancer.scrape import Reply, ScrapeServer

log = logging.getLogger("balancer")

RESTART_REASONS = ("crash", "timeout", "reload", "recycle", "scale")
# Samples of the backend's own metrics that only grow: folded into the slot's base when a worker exits.
FOLDED = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}
TEXT = "text/plain; charset=utf-8"
# What the workers run, read from the installed distribution: importing aiohttp would load its web stack here.
AIOHTTP_VERSION = importlib.metadata.version("aiohttp")
LE = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# The worker's own event counters: heartbeat field -> (metric name, help). Each is kept per slot and folded.
EVENT_COUNTERS = {
    "header_timeouts": ("balancer_worker_header_timeouts",
                        "Connections cut off for not sending complete headers in time."),
    "body_timeouts": ("balancer_worker_body_timeouts",
                      "Requests answered 408 for a body slower than --body-min-rate over --body-timeout."),
    "bad_requests": ("balancer_worker_bad_requests", "Malformed requests answered 400 by the HTTP parser."),
    "proxy_protocol_errors": ("balancer_worker_proxy_protocol_errors",
                              "Connections from --forwarded-allow-ips peers closed for a missing or malformed "
                              "PROXY header."),
    "tls_handshake_errors": ("balancer_worker_tls_handshake_errors",
                             "TLS handshakes refused (protocol, certificate, cipher); ones cut by --header-timeout "
                             "count as header timeouts."),
}


def read_proc(pid: int) -> tuple[float, int, int] | None:
    """(CPU seconds, resident bytes, open fds) of pid from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        fds = open_fd_count(pid)
    except (OSError, IndexError):
        return None
    # fields[0] is stat field 3 (state): utime is field 14, stime 15, rss 24 (in pages).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[21]) * PAGE_SIZE, fds


def open_fd_count(pid: int) -> int:
    """How many fds pid has open: Linux 6.2+ gives it as the size of /proc/PID/fd, older kernels need a listing."""
    path = f"/proc/{pid}/fd"
    return os.stat(path).st_size or len(os.listdir(path))


def read_procs(pids: list[int]) -> dict[int, tuple[float, int, int]]:
    """read_proc for each pid still there; runs in a thread, never on the master's loop."""
    out = {}
    for pid in pids:
        figures = read_proc(pid)
        if figures is not None:
            out[pid] = figures
    return out


class SlotFigures:
    """One slot's figures: counters of its exited workers plus whatever its live workers report."""

    def __init__(self) -> None:
        self.dispatched = 0
        self.returned = 0  # idle keep-alive connections given back to the master (keep-alive rebalancing)
        self.resumed = 0  # connections that served elsewhere before, handed to this slot again
        self.requests: dict[tuple[str, str], int] = {}
        self.buckets = [0] * len(LE)
        self.duration_sum = 0.0
        self.events = dict.fromkeys(EVENT_COUNTERS, 0)  # heartbeat field -> count
        self.cpu = 0.0
        self.user: dict[str, dict[tuple, float]] = {}  # family -> (sample name, labels) -> value
        # Gauges: live workers only, never folded.
        self.open = 0
        self.inflight = 0
        self.rss = 0
        self.fds = 0
        self.up = 0
        self.start_time = 0.0
        self.wanted = False  # a slot the master keeps filled, or one with a worker still alive

    def copy(self) -> SlotFigures:
        """A fresh figures object starting from these counters (a base is never changed by a scrape)."""
        out = SlotFigures()
        out.dispatched, out.duration_sum = self.dispatched, self.duration_sum
        out.returned, out.resumed = self.returned, self.resumed
        out.cpu = self.cpu
        out.events = dict(self.events)
        out.requests = dict(self.requests)
        out.buckets = list(self.buckets)
        out.user = {name: dict(samples) for name, samples in self.user.items()}
        return out

    def add(self, stats: dict, link, cpu: float, families: dict, live: bool) -> None:
        """Add one worker's counters (and its gauges when live) to the slot; families learns type and help."""
        self.dispatched += link.dispatched
        self.returned += link.returned
        self.resumed += link.resumed
        self.cpu += cpu
        requests = self.requests
        for method, status, n in stats.get("requests", ()):
            key = (method, str(status))
            requests[key] = requests.get(key, 0) + n
        buckets = stats.get("buckets")
        if buckets and len(buckets) == len(self.buckets):
            running = 0
            for i, n in enumerate(buckets):  # the worker counts per bucket; Prometheus wants cumulative
                running += n
                self.buckets[i] += running
        self.duration_sum += stats.get("sum", 0.0)
        events = self.events
        for field in events:
            events[field] += stats.get(field, 0)
        if live:
            self.inflight += stats.get("inflight", 0)
        for name, typ, doc, samples in stats.get("metrics", ()):
            families[name] = (typ, doc)
            folded = FOLDED.get(typ, ())
            merged = self.user.setdefault(name, {})
            for suffix, labels, value in samples:
                if not live and suffix not in folded:
                    continue
                key = (name + suffix, tuple(labels.items()))
                merged[key] = merged.get(key, 0.0) + value


class MetricsServer:
    """Serves /metrics, /healthz and /readyz from the master's own event loop."""

    def __init__(self, master) -> None:
        self.master = master
        self.bases: dict[int, SlotFigures] = {}  # slot -> counters of its workers that have exited
        self.families: dict[str, tuple[str, str]] = {}  # backend family -> (type, help), last seen
        self._cpu_seen: dict[int, float] = {}  # pid -> CPU seconds at the last scrape, folded on exit
        self._proc: dict[int, tuple[float, int, int]] = {}  # pid -> read_proc(), read off the loop per scrape
        self._skipped: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)  # the master's own CPU and memory: it is the dispatch path
        self.server: ScrapeServer | None = None
        self.address: tuple[str, int] | None = None  # (host, port) bound, once started

    async def start(self) -> None:
        """Hook worker exits, bind, and log the real address."""
        self.master.supervisor.on_exit_hooks.append(self.fold)
        self.server = ScrapeServer({"/metrics": self.handle_metrics, "/healthz": self.handle_healthz,
                                    "/readyz": self.handle_readyz})
        bind = parse_bind(self.master.config.metrics_bind)
        carried = self.master.upgrader.carried_service("metrics")  # re-executed by an upgrade: the same socket
        sock = carried[0] if carried is not None else None
        host, port = self.address = await self.server.start(bind.host, bind.port, sock)
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics", shown, port)

    async def close(self) -> None:
        """Stop serving."""
        if self.server is not None:
            await self.server.close()
            self.server = None

    # ---- HTTP ---------------------------------------------------------------------------------

    async def handle_metrics(self, headers: dict[str, str]) -> Reply:
        """Read the workers' /proc figures in a thread, then collect and answer in the format asked for."""
        # A worker's fd table grows with its connections: reading it on the loop would stall every accept.
        pids = [w.pid for w in self.master.supervisor.records() if not w.exited]
        self._proc = await asyncio.get_running_loop().run_in_executor(None, read_procs, pids)
        self.master.dispatcher.collect_all()  # open connections as of now, not as of the last tick
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return 200, content_type, encoder(self.registry)

    async def handle_healthz(self, headers: dict[str, str]) -> Reply:
        """The master's loop answers: it is alive."""
        return 200, TEXT, b"ok\n"

    async def handle_readyz(self, headers: dict[str, str]) -> Reply:
        """200 while at least one worker is ready and the master is not shutting down, else 503 saying why."""
        if self.master.stopping:  # also during --shutdown-delay, while it serves on
            return 503, TEXT, b"not ready: shutting down\n"
        sup = self.master.supervisor
        ready = sum(1 for w in sup.records() if w.phase is Phase.READY)
        if ready:
            return 200, TEXT, f"ready: {ready} workers\n".encode()
        return 503, TEXT, b"not ready: no worker ready\n"

    # ---- folding ------------------------------------------------------------------------------

    def fold(self, w) -> None:
        """A worker was reaped: keep its last counters in its slot's base so the slot never goes back."""
        cpu = self._cpu_seen.pop(w.pid, 0.0)
        base = self.bases.setdefault(w.slot, SlotFigures())
        base.add(w.stats, w.link, cpu, self.families, live=False)

    def figures(self) -> dict[int, SlotFigures]:
        """Every slot's figures now: its base plus its live workers (two of them during a reload)."""
        sup = self.master.supervisor
        out = {slot: base.copy() for slot, base in self.bases.items()}
        for slot in range(sup.target):
            out.setdefault(slot, SlotFigures()).wanted = True
        seen = {}
        for w in sup.records():
            fig = out.get(w.slot) or out.setdefault(w.slot, SlotFigures())
            fig.wanted = True
            proc = None if w.exited else self._proc.get(w.pid)  # None too for a worker newer than the reading
            if proc is None:
                cpu = self._cpu_seen.get(w.pid, 0.0)  # a figure it already showed must not vanish
            else:
                cpu = max(proc[0], self._cpu_seen.get(w.pid, 0.0))  # concurrent scrapes: never backwards
                fig.rss += proc[1]
                fig.fds += proc[2]
            seen[w.pid] = cpu
            fig.add(w.stats, w.link, cpu, self.families, live=True)
            fig.open += w.link.open_conns
            if w.phase is Phase.READY:
                fig.up = 1
            fig.start_time = max(fig.start_time, w.started_wall)
        for slot, w in enumerate(sup.slots):
            if w is not None:  # the serving worker, not a replacement still booting
                out[slot].start_time = w.started_wall
        self._cpu_seen = seen  # only live pids: nothing here grows with worker churn
        return out

    # ---- collection ---------------------------------------------------------------------------

    def collect(self):
        """Build every family at scrape time; the hot path only bumps plain ints."""
        master, sup = self.master, self.master.supervisor
        figs = sorted(self.figures().items())
        yield counter("balancer_connections_accepted", "Connections accepted by the master.", master.accepted)
        errors = CounterMetricFamily("balancer_accept_errors", "accept() failures by errno.", labels=["errno"])
        # The resource errors are there at zero from the start, so that rate() and increase() see the first one.
        for name in sorted({errno.errorcode[e] for e in RESOURCE_ERRNOS} | set(master.accept_errors)):
            errors.add_metric([name], master.accept_errors.get(name, 0))
        yield errors
        yield counter("balancer_accept_paused_seconds",
                      "Seconds the master stopped accepting while every ready worker was full (backpressure).",
                      master.paused_total())
        yield counter("balancer_accept_coalesced",
                      "Times the master waited --accept-coalesce before accepting again, every worker being busy.",
                      master.coalesced)
        parking = getattr(master, "parking", None)  # None until the loop runs
        yield GaugeMetricFamily("balancer_parked_connections",
                                "Idle keep-alive connections the master watches for their next request.",
                                value=len(parking.parked) if parking is not None else 0)
        for name, doc, field in (
                ("balancer_parked_connections_expired", "Parked connections closed idle at --keepalive-timeout.",
                 "expired"),
                ("balancer_parked_connections_ended", "Parked connections their client closed.", "ended")):
            yield counter(name, doc, getattr(parking, field) if parking is not None else 0)
        yield counter("balancer_connections_redispatched",
                      "Handed-off connections given to another worker after a refusal, full channel or death.",
                      master.dispatcher.redispatched)
        info = GaugeMetricFamily("balancer_build_info", "Versions in use; always 1. handoff: c or python.",
                                 labels=["version", "python", "aiohttp", "handoff"])
        info.add_metric([__version__, platform.python_version(), AIOHTTP_VERSION, handoff.IMPLEMENTATION], 1)
        yield info
        yield gauge("balancer_workers_desired", "Worker slots the master keeps filled.", sup.target)
        yield gauge("balancer_start_time_seconds", "Unix time the master started.", master.started)
        yield gauge("balancer_master_start_time_seconds",
                    "Unix time the master's current image started: its start, or its latest in-place upgrade.",
                    master.upgrader.exec_started)
        yield counter("balancer_master_upgrades", "In-place upgrades of the master (SIGUSR2, balancer upgrade).",
                      master.upgrader.upgrades)

        def per_slot(kind, name, doc, value, wanted_only=False):
            fam = kind(name, doc, labels=["worker"])
            for slot, fig in figs:
                if fig.wanted or not wanted_only:
                    fam.add_metric([str(slot)], value(fig))
            return fam

        # Counters of a slot removed by a scale-down stay (they never go back); its up does not, or it would read
        # as a worker down for good.
        yield per_slot(GaugeMetricFamily, "balancer_worker_up", "1 while the slot has a ready worker.",
                       lambda f: f.up, wanted_only=True)
        yield per_slot(CounterMetricFamily, "balancer_worker_connections_dispatched",
                       "Connections handed to the slot's workers.", lambda f: f.dispatched)
        yield per_slot(CounterMetricFamily, "balancer_worker_connections_returned",
                       "Idle keep-alive connections the slot's workers gave back to the master (rebalancing).",
                       lambda f: f.returned)
        yield per_slot(CounterMetricFamily, "balancer_worker_connections_resumed",
                       "Kept-alive connections handed to the slot's workers again for their next request, "
                       "after a worker gave them back.", lambda f: f.resumed)
        yield per_slot(GaugeMetricFamily, "balancer_worker_open_connections",
                       "Connections the slot's workers hold open.", lambda f: f.open)
        yield per_slot(GaugeMetricFamily, "balancer_worker_requests_in_flight",
                       "Requests being handled by the slot's workers (as of their last heartbeat).",
                       lambda f: f.inflight)
        for field, (name, doc) in EVENT_COUNTERS.items():
            yield per_slot(CounterMetricFamily, name, doc, lambda f, field=field: f.events[field])
        yield per_slot(CounterMetricFamily, "balancer_worker_cpu_seconds",
                       "User and system CPU seconds of the slot's workers.", lambda f: f.cpu)
        yield per_slot(GaugeMetricFamily, "balancer_worker_resident_memory_bytes",
                       "Resident memory of the slot's workers.", lambda f: f.rss)
        yield per_slot(GaugeMetricFamily, "balancer_worker_open_fds", "Open file descriptors of the slot's workers.",
                       lambda f: f.fds)
        started = GaugeMetricFamily("balancer_worker_start_time_seconds",
                                    "Unix time the slot's serving worker started.", labels=["worker"])
        for slot, fig in figs:
            if fig.start_time:
                started.add_metric([str(slot)], fig.start_time)
        yield started
        restarts = CounterMetricFamily("balancer_worker_restarts", "Worker replacements by reason.",
                                       labels=["worker", "reason"])
        reasons = sorted(set(RESTART_REASONS) | {reason for _, reason in sup.restarts})
        for slot, _ in figs:
            for reason in reasons:
                restarts.add_metric([str(slot), reason], sup.restarts.get((slot, reason), 0))
        yield restarts
        requests = CounterMetricFamily("balancer_worker_requests", "Requests finished, by method and status code.",
                                       labels=["worker", "method", "code"])
        duration = HistogramMetricFamily("balancer_worker_request_duration_seconds",
                                         "Time from request headers to response, per worker slot.", labels=["worker"])
        for slot, fig in figs:
            for (method, code), n in sorted(fig.requests.items()):
                requests.add_metric([str(slot), method, code], n)
            if fig.buckets[-1] or fig.duration_sum:
                duration.add_metric([str(slot)], list(zip(LE, fig.buckets)), fig.duration_sum)
        yield requests
        yield duration
        yield from self.user_families(figs)

    def user_families(self, figs: list[tuple[int, SlotFigures]]):
        """The backend's own prometheus_client metrics, each sample labelled with its worker slot."""
        for name in sorted({name for _, fig in figs for name in fig.user}):
            if name.startswith("balancer_") or name.startswith("process_") or name not in self.families:
                if name not in self._skipped:  # a clash would make the whole exposition invalid
                    self._skipped.add(name)
                    log.warning("backend metric %s clashes with the master's own names; not exported", name)
                continue
            typ, doc = self.families[name]
            try:
                fam = Metric(name, doc, typ)
            except ValueError:
                continue
            for slot, fig in figs:
                for (sample, labels), value in fig.user.get(name, {}).items():
                    labels = {("exported_worker" if k == "worker" else k): v for k, v in labels}
                    fam.add_sample(sample, {"worker": str(slot), **labels}, value)
            yield fam


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    """An unlabelled counter family."""
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    """An unlabelled gauge family."""
    return GaugeMetricFamily(name, doc, value=value)
