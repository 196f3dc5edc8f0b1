"""Entry point of a worker process: `python -m balancer_workers --channel-fd N --board-fd B --master-pid P --settings JSON`."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import faulthandler
import json
import os
import signal
import socket
import sys

from balancer import board, proctitle
from balancer.eventloop import LoopUnavailable, loop_factory
from balancer.logs import LogSetupError
from balancer_workers.accesslog import reopen_on_sigusr1, setup_worker_logging
from balancer_workers.stdio import whole_lines

PR_SET_PDEATHSIG = 1


def die_with_master(master_pid: int) -> None:
    """Ask the kernel for SIGTERM when the master dies, covering a loop too blocked to see EOF."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != master_pid:  # it died before prctl took effect
        sys.exit(0)


def main() -> int:
    """Parse the master's arguments, then run the worker until it drains."""
    whole_lines()  # first: the log handlers below, and the backend, write through these
    # A backend's C extension that crashes the process (SIGSEGV, SIGABRT...) still leaves the Python stack of
    # every thread in the log (the master's stderr, which workers share).
    faulthandler.enable(file=sys.stderr)
    parser = argparse.ArgumentParser(prog="python -m balancer_workers")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--board-fd", type=int, required=True)
    parser.add_argument("--master-pid", type=int, required=True)
    parser.add_argument("--settings", required=True)
    args = parser.parse_args()
    return serve(args.channel_fd, args.board_fd, args.master_pid, json.loads(args.settings))


def ignore_signals() -> None:
    """Leave Ctrl-C, Ctrl-\\, SIGHUP, the resize and the user signals to the master: it decides, and tells us."""
    # Ctrl-C and Ctrl-\ (SIGQUIT, a core dump by default) reach the whole process group; the master decides,
    # and drains us with DRAIN.
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def serve(channel_fd: int, board_fd: int, master_pid: int, settings: dict) -> int:
    """Run the worker on its channel and board until it drains; also what a zygote's forked worker runs."""
    ignore_signals()
    die_with_master(master_pid)
    os.environ["BALANCER_WORKER_SLOT"] = str(settings["slot"])  # for the backend: which slot am I
    try:  # the master opened the same files and applied the same --log-config: this fails only in a race
        setup_worker_logging(settings)
    except LogSetupError as exc:
        print(f"balancer worker: {exc}", file=sys.stderr)
        return 3
    proctitle.title_worker(settings["slot"])  # `balancer: worker 0 [name]` in ps and top
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, channel_fd)
    ack_board = board.attach(board_fd, channel_fd)  # IDLE, when the master asks, goes on the channel
    os.close(board_fd)

    from balancer_workers.worker import Worker

    async def run() -> int:
        reopen_on_sigusr1(asyncio.get_running_loop())  # SIGUSR1 was ignored until now: logrotate's reopen
        try:
            return await Worker(channel, settings, ack_board).run()
        finally:
            # Closing the loop puts SIGUSR1's default action back: one the master forwards now (logrotate)
            # must not kill a worker on its way out, nor a late SIGTERM turn its exit into a crash.
            signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGTERM))

    try:  # the master checked it too: this fails only if uvloop went away since
        factory = loop_factory(settings.get("loop", "auto"))
    except LoopUnavailable as exc:
        raise SystemExit(f"balancer worker: {exc}") from None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run())


if __name__ == "__main__":
    sys.exit(main())
