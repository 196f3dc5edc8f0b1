"""The `balancer` command's entry point: hold the master's signals back before anything slow is imported."""

from __future__ import annotations

import signal

from balancer.signals import HANDLED_SIGNALS


def main() -> int:
    """Block the handled signals, then run the CLI (which lets them through again unless it runs a master)."""
    # Importing the CLI and parsing the options take tens of milliseconds, during which a SIGHUP or SIGUSR1
    # would kill the process and a SIGTTIN stop it (their default actions). Held back from here, they reach a
    # master once its loop can act on them; every other subcommand unblocks them at once (balancer/cli.py).
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    from balancer.cli import main as cli_main

    return cli_main()
