"""The master's Python cost per new connection, by worker count and batch size, with its syscalls left out.

    python -m bench.dispatch_cost [--rounds N]

Runs what one accept wake-up does in the master, through balancer's own Dispatcher: look at every worker's ack
board and closes, count the room, share a batch of accepted fds among the least-loaded workers and record
them, with the workers acking every message before the next wake-up. The syscalls (send, close) are replaced
by no-ops, so the figure is only the Python (and `fill()`, in C when built) around them: the part of the
master's cost per connection that can grow with the number of workers. The scaling model in bench/README.md
adds it to the per-connection cost measured end to end with 2 workers.
"""

from __future__ import annotations

import argparse
import socket
import time

from balancer import board, dispatch
from balancer.dispatch import Dispatcher, Link

WORKERS = (2, 8, 16, 32, 64)
BATCHES = (4, 16, 64)
OPEN = 30  # connections open on each worker: a busy pool


def pool(n: int) -> Dispatcher:
    """A dispatcher over n READY workers with OPEN connections each and private ack boards."""
    d = Dispatcher(cap=1000)
    links = []
    for slot in range(n):
        link = Link(slot, None)
        link.ready = True
        link.acked_total = OPEN
        links.append(link)
    d.set_links(links)
    return d


def ack_everything(d: Dispatcher) -> None:
    """Each worker acks every message it was sent and closes as many connections as it took."""
    for link in d.links:
        if link.sent:
            took = sum(len(ids) for _, ids in link.sent)
            link.board[board.HANDLED] = board.pack(link.sent_msgs, link.refused_seen)
            link.board[board.CLOSED] += took


def one_wake(d: Dispatcher, items: list[tuple[int, int]]) -> None:
    """What AcceptPath._on_readable does around its syscalls."""
    d.survey()
    d.dispatch(items, surveyed=True)


def one_wake_before(d: Dispatcher, items: list[tuple[int, int]]) -> None:
    """The same before survey() (commit f0f390d and earlier): a pass per question, a scan per connection."""
    d.collect_all()
    d.free_capacity()
    d.dispatch(items)
    d.all_busy(8)


def cost(n: int, batch: int, rounds: int) -> float:
    """Microseconds of Python per connection for n workers and batches of `batch`."""
    d = pool(n)
    wake = one_wake if hasattr(d, "survey") else one_wake_before  # run against an older checkout to compare
    items = [(100 + i, socket.AF_INET) for i in range(batch)]
    wakes = max(50, rounds // n)
    clock = time.perf_counter
    best = float("inf")
    for _ in range(3):  # the least disturbed of three runs
        spent = 0.0
        for _ in range(wakes):
            began = clock()
            wake(d, items)
            spent += clock() - began
            ack_everything(d)  # the workers' part: not the master's time
        best = min(best, spent)
    return best / wakes / batch * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40_000, help="wake-ups per figure, divided by the workers")
    args = parser.parse_args()
    dispatch.handoff.send_handoff = lambda channel, ids, families, fds: None
    dispatch.handoff.close_fds = lambda fds: None
    fill = getattr(dispatch, "fill", None)
    kind = "none (a scan per connection)" if fill is None else "Python" if fill is dispatch.fill_py else "C"
    print(f"fill: {kind}; us of Python per connection")
    print("| workers | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
    print("|---|" + "---|" * len(BATCHES))
    for n in WORKERS:
        print(f"| {n} | " + " | ".join(f"{cost(n, b, args.rounds):.2f}" for b in BATCHES) + " |")


if __name__ == "__main__":
    main()
