"""Request counters, latency histogram and in-flight gauge kept by a worker, shipped in heartbeats."""

from __future__ import annotations

import json
import logging
import sys
from bisect import bisect_left
from collections import defaultdict

log = logging.getLogger("balancer.worker")

# Upper bounds in seconds, shared with the master's histogram (Prometheus le labels).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FIRST_BUCKET = BUCKETS[0]
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"))
# A heartbeat is one datagram, and it must stay far below the channel's send buffer (~208 KiB by default):
# a datagram past the buffer fails outright (EMSGSIZE), and a big one holds the room acks and refusals need.
# The worker's own figures always go; the backend's metrics get what is left of this.
HEARTBEAT_BYTES = 32 * 1024
BEAT_EXTRAS = 128  # bytes kept for the fields the heartbeat adds to a snapshot ("open", "final", "recycle")
_COMPACT = (",", ":")  # as wire.encode_json writes it


class RequestStats:
    """Cumulative figures since the worker started; the master folds them per slot."""

    def __init__(self) -> None:
        # method -> status -> count; a request with a method outside METHODS counts under "other" (unbounded
        # label values would let a client blow up the series count). Per method, so no key tuple per request.
        self.by_method: dict[str, defaultdict[int, int]] = {m: defaultdict(int) for m in (*METHODS, "other")}
        self.buckets = [0] * (len(BUCKETS) + 1)  # last one is +Inf
        self.duration_sum = 0.0
        self.count = 0
        # protocol -> (start, method) of each request whose handler runs (workers/observe.py): the in-flight count.
        self.started: dict = {}
        self.header_timeouts = 0
        self.body_timeouts = 0  # requests answered 408: their body came slower than --body-min-rate
        self.bad_requests = 0  # malformed requests answered 400 by aiohttp's parser
        self.proxy_protocol_errors = 0  # connections closed for a missing or malformed PROXY header
        self.tls_handshake_errors = 0  # TLS handshakes the TLS layer refused (deadline cuts are header_timeouts)
        self._default_names: frozenset[str] | None = None
        self._warned_cap = False
        self._warned_collect = False

    def observe(self, method: str, status: int, seconds: float) -> None:
        """Record one finished request."""
        counts = self.by_method.get(method)
        if counts is None:
            counts = self.by_method["other"]
        counts[status] += 1
        # Most requests finish within the first bucket: one comparison instead of a search.
        self.buckets[0 if seconds <= FIRST_BUCKET else bisect_left(BUCKETS, seconds)] += 1
        self.duration_sum += seconds
        self.count += 1

    def snapshot(self, max_bytes: int = HEARTBEAT_BYTES) -> dict:
        """A JSON-able copy of the figures, with as many of the backend's prometheus_client metrics as fit."""
        body = {
            "requests": [[m, s, n] for m, counts in self.by_method.items() for s, n in counts.items()],
            "buckets": list(self.buckets),
            "sum": self.duration_sum,
            "count": self.count,
            "inflight": len(self.started),
            "header_timeouts": self.header_timeouts,
            "body_timeouts": self.body_timeouts,
            "bad_requests": self.bad_requests,
            "proxy_protocol_errors": self.proxy_protocol_errors,
            "tls_handshake_errors": self.tls_handshake_errors,
        }
        # A backend that never imported prometheus_client registered nothing: don't pay for the import.
        if "prometheus_client" in sys.modules:
            room = max_bytes - BEAT_EXTRAS - len(json.dumps(body, separators=_COMPACT))
            try:
                metrics = self.user_metrics(room)
            except Exception:  # a broken custom collector must not stop the heartbeat that carries it
                metrics = []
                if not self._warned_collect:
                    self._warned_collect = True
                    log.exception("collecting the backend's prometheus_client metrics failed")
            if metrics:
                body["metrics"] = metrics
        return body

    def user_metrics(self, room: int = HEARTBEAT_BYTES) -> list:
        """The default REGISTRY's families as [name, type, help, [[suffix, labels, value], ...]].

        The process/platform/gc collectors are left out: the master reads those figures from /proc itself.
        Suffixes (_total, _bucket, ...) are relative to the family name to keep the heartbeat small;
        _created samples are dropped because the master's per-slot totals outlive any one worker.
        """
        from prometheus_client import REGISTRY

        skip = self._defaults()
        out = []
        for family in REGISTRY.collect():
            name = family.name
            if name not in skip:
                cut = len(name)
                samples = [[s.name[cut:], s.labels, s.value] for s in family.samples if not s.name.endswith("_created")]
                out.append([name, family.type, family.documentation, samples])
        # Measuring with C json is cheaper than estimating sample by sample in Python; trimming is the rare case.
        if len(json.dumps(out, separators=_COMPACT)) + len(',"metrics":') > room:
            out = self._trim(out, room)
        return out

    def _trim(self, families: list, room: int) -> list:
        """The leading families that fit in room bytes of JSON; warn once."""
        total = room
        room -= len(',"metrics":[]')
        kept = []
        for family in families:
            room -= len(json.dumps(family, separators=_COMPACT)) + 1
            if room < 0:
                break
            kept.append(family)
        if not self._warned_cap:
            self._warned_cap = True
            log.warning("prometheus_client metrics past %d KiB; the master sees only the first %d of %d families",
                        max(total, 0) // 1024, len(kept), len(families))
        return kept

    def _defaults(self) -> frozenset[str]:
        """Family names of prometheus_client's default collectors, found once."""
        if self._default_names is None:
            import prometheus_client

            defaults = (prometheus_client.PROCESS_COLLECTOR, prometheus_client.PLATFORM_COLLECTOR,
                        prometheus_client.GC_COLLECTOR)
            self._default_names = frozenset(f.name for c in defaults for f in c.collect())
        return self._default_names
