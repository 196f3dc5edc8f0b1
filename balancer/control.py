"""Control socket of the master (placeholder until the control work lands)."""


class ControlServer:
    """Placeholder: accepts the master and does nothing."""

    def __init__(self, master) -> None:
        self.master = master

    async def start(self) -> None:
        """Nothing to start yet."""

    async def close(self) -> None:
        """Nothing to close yet."""


def client_main(command: str, argv: list[str]) -> int:
    """Placeholder client."""
    print(f"balancer: error: {command} is not available yet")
    return 2
