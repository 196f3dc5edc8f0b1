"""Exponential respawn delay per slot, forgiven once a worker has stayed up."""

from __future__ import annotations

# A slot whose workers died this many times in a row, each young, and none of whose workers has stayed up for
# stable_after since, is crash-looping.
CRASH_LOOP_FAILURES = 3


class Backoff:
    """Delay before respawning a slot whose worker died: base * factor**(n-1), capped."""

    def __init__(self, base: float = 0.1, factor: float = 2.0, cap: float = 10.0, stable_after: float = 10.0) -> None:
        self.base = base
        self.factor = factor
        self.cap = cap  # the crash-loop cap: a slot that keeps crashing is retried this often, no faster
        self.stable_after = stable_after
        self.failures = 0

    def failure(self, uptime: float) -> float:
        """Record a death after uptime seconds; return how long to wait before the next spawn."""
        if uptime >= self.stable_after:
            self.failures = 0
        self.failures += 1
        return min(self.cap, self.base * self.factor ** (self.failures - 1))

    def crash_looping(self, up_for: float | None) -> bool:
        """Dying young again and again; up_for: the serving worker's uptime (None: none serves)."""
        return self.failures >= CRASH_LOOP_FAILURES and (up_for is None or up_for < self.stable_after)
