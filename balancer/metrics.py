"""Prometheus endpoint of the master (placeholder until the metrics work lands)."""


class MetricsServer:
    """Placeholder: accepts the master and does nothing."""

    def __init__(self, master) -> None:
        self.master = master

    async def start(self) -> None:
        """Nothing to start yet."""

    async def close(self) -> None:
        """Nothing to close yet."""
