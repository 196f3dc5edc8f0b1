"""Exponential respawn delay per slot, forgiven once a worker has stayed up."""

from __future__ import annotations


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

    @property
    def looping(self) -> bool:
        """True when this slot has been dying young often enough to be at the cap."""
        return self.base * self.factor ** max(self.failures - 1, 0) >= self.cap
