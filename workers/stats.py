"""Request counters, latency histogram and in-flight gauge kept by a worker, shipped in heartbeats."""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds in seconds, shared with the master's histogram (Prometheus le labels).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"))


class RequestStats:
    """Cumulative figures since the worker started; the master folds them per slot."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)  # last one is +Inf
        self.duration_sum = 0.0
        self.count = 0
        self.inflight = 0
        self.header_timeouts = 0

    def observe(self, method: str, status: int, seconds: float) -> None:
        """Record one finished request."""
        if method not in METHODS:
            method = "other"  # unbounded label values would let a client blow up the series count
        key = (method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.duration_sum += seconds
        self.count += 1

    def snapshot(self) -> dict:
        """A JSON-able copy of the figures."""
        return {
            "requests": [[m, s, n] for (m, s), n in self.requests.items()],
            "buckets": list(self.buckets),
            "sum": self.duration_sum,
            "count": self.count,
            "inflight": self.inflight,
            "header_timeouts": self.header_timeouts,
        }
