"""Keep-alive connections under the tail mix, simulated: what moving a connection between workers gives.

    python -m bench.keepalive_model [--rate 1361] [--requests 400000] [--move-us 80] [--seed 1]

The client is a pool of keep-alive connections, as nginx's `keepalive 16` upstream cache and bench/openloop.c:
16 connections opened at the start; a request takes the most recently used idle connection (LIFO), or opens a
new one if none is idle (placed on the worker with the fewest connections, ties round robin); at its response's
end the connection goes back on the idle stack, and past 16 idle the one used longest ago is closed. One request
in flight per connection. Two workers run one request at a time to its end (CPU-bound handlers), FIFO among the
requests of the connections that live on them; service times and Poisson arrivals as bench/dispatch_model.py.
Printed: the short requests' p50/p99/p99.9 (arrival to end of service), the share of requests that came through
the master (`moved`, each paying M) and the share served on another worker than their connection's last request.

  sticky               a connection stays on the worker it was handed to (--no-keepalive-rebalance)
  central              one central FIFO queue per request, free of cost (the ideal; moved is 100%, at no cost)
  move-all+M           at every response's end the connection goes back to the master; its next request goes
                       to a free worker (its last one if free), else the master holds it for the first worker to
                       go free, which gets it 50 us (WAKE) later; every such request costs M us of worker CPU
  move-if-busy+M       the connection goes back only if its worker has other requests queued at that moment,
                       else it stays (until a later response's end finds the worker busy)
  move-if-busy-or-long+M  also goes back when the response that just ended ran over 5x the median service time
  move-if-busy-and-free+M  policy 6, balancer's (workers/rebalance.py): goes back only if others wait on its
                       worker and another worker is free (a worker reads the others' boards for that).

Why policy 6: the master gives a held connection only to a worker with nothing left to do, so under rules 4
and 5 it waits behind every request queued on the sticky connections of both workers, later ones included; with
a third to a half of requests moved, that starves them (worse than sticky at every M, and near capacity far
worse). Under rule 3 most requests are held, and each leaves its worker idle for the WAKE and costs it M: only
at light load does it beat sticky, for small M. Rule 6 moves a connection only when some worker is free, so its
next request almost never waits at the master; 2-5% of requests move, and M hardly matters. A worker cannot do
better on what it knows: handler lengths are independent, so a long one just ended says nothing of the next
(rule 5's extra moves gain nothing), and with no worker free, moving only trades its own queue for the
master's, which is served last.

A model, not a measurement: no preemption, no client CPU, workers never share a core, the master's CPU is not
on the workers' cores, the free-worker test is exact (a real worker reads the others' boards), and a request
given at once to a free worker reaches it with no latency (the WAKE only when it was held). New
connections are placed as above under every policy: their first request never goes through the master.
"""

from __future__ import annotations

import argparse
import heapq
from collections import deque

from bench.dispatch_model import LONG, SHARE_LONG, SHORT, arrivals, percentiles

WORKERS, POOL = 2, 16
WAKE = 50e-6  # a held request reaches the worker that went free this long after (IDLE, wake-up, hand-off)
LONG_AFTER = 5 * SHORT  # 5x the median service time


def never(queued: int, service: float, free: int) -> bool:
    """sticky: a connection never goes back to the master."""
    return False


def always(queued: int, service: float, free: int) -> bool:
    """move-all: every connection goes back to the master at its response's end."""
    return True


def if_busy(queued: int, service: float, free: int) -> bool:
    """move-if-busy: back to the master if others wait on its worker."""
    return queued > 0


def if_busy_or_long(queued: int, service: float, free: int) -> bool:
    """move-if-busy-or-long: also after a response that ran over 5x the median service time."""
    return queued > 0 or service > LONG_AFTER


def if_busy_and_free(queued: int, service: float, free: int) -> bool:
    """move-if-busy-and-free (policy 6): others wait on its worker and another worker is free."""
    return queued > 0 and free > 0


def simulate(reqs, park, move: float = 0.0, wake: float = WAKE, central: bool = False):
    """Latencies, requests moved and requests on another worker for reqs; park(queued, service, free) decides."""
    conn_worker: list[int] = []  # the worker each connection lives on; -1: with the master
    conn_last: list[int] = []  # the worker that served its last request; -1: none yet
    count = [0] * WORKERS  # connections living on each worker
    rr = [0]

    def open_conn() -> int:
        """A new connection, placed on the worker with the fewest connections, ties round robin."""
        low = min(count)
        ties = [w for w in range(WORKERS) if count[w] == low]
        w = ties[rr[0] % len(ties)]
        rr[0] += 1
        count[w] += 1
        conn_worker.append(w)
        conn_last.append(-1)
        return len(conn_worker) - 1

    idle = deque(open_conn() for _ in range(POOL))  # the client's idle connections; right: most recently used
    lat = [0.0] * len(reqs)
    running: list = [None] * WORKERS  # (request, connection, service) each worker runs; None: free
    queues = [deque() for _ in range(WORKERS)]  # (request, connection) waiting on each worker
    held: deque = deque()  # (request, connection) the master holds for the first worker to go free
    ends: list = []  # (end of service, worker)
    moved = other = 0

    def start(w: int, t: float, k: int, c: int, via_master: bool) -> None:
        """Worker w starts request k of connection c at t (with the move's CPU if it came through the master)."""
        nonlocal other
        service = reqs[k][1] + (move if via_master else 0.0)
        running[w] = (k, c, service)
        heapq.heappush(ends, (t + service, w))
        lat[k] = t + service - reqs[k][0]
        if conn_last[c] not in (-1, w):
            other += 1
        conn_last[c] = w
        if via_master and not central:
            conn_worker[c] = w
            count[w] += 1

    i, n = 0, len(reqs)
    while i < n or ends:
        if ends and (i >= n or ends[0][0] <= reqs[i][0]):  # a response ends
            t, w = heapq.heappop(ends)
            k, c, service = running[w]
            running[w] = None
            q = queues[w]
            if not central and park(len(q), service, sum(r is None for r in running) - 1):
                conn_worker[c] = -1
                count[w] -= 1
            idle.append(c)
            if len(idle) > POOL:  # the pool is full: the connection used longest ago is closed
                old = idle.popleft()
                if conn_worker[old] >= 0:
                    count[conn_worker[old]] -= 1
                conn_worker[old] = -1
            if q:
                start(w, t, *q.popleft(), False)
            elif held:
                start(w, t + wake, *held.popleft(), True)
        else:  # a request arrives
            k, t = i, reqs[i][0]
            i += 1
            c = idle.pop() if idle else open_conn()
            w = conn_worker[c]
            if central or w < 0:
                moved += 1
                free = [x for x in range(WORKERS) if running[x] is None]
                if free:  # its last worker if that one is free
                    start(conn_last[c] if conn_last[c] in free else free[0], t, k, c, True)
                else:
                    held.append((k, c))
            elif running[w] is None:
                start(w, t, k, c, False)
            else:
                queues[w].append((k, c))
    return lat, moved, other


def main() -> None:
    """Print one table row per policy (and move cost)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1361.0)
    parser.add_argument("--requests", type=int, default=400_000)
    parser.add_argument("--move-us", default="80", help="worker CPU per moved request, us; a comma list")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    reqs = arrivals(args.rate, args.requests, args.seed)
    mean = SHORT * (1 - SHARE_LONG) + LONG * SHARE_LONG
    print(f"{args.rate:g} req/s on {WORKERS} workers (utilisation {args.rate * mean / WORKERS:.0%}), "
          f"{args.requests} requests, seed {args.seed}; short requests' latency, ms")
    print("| policy | p50 | p99 | p99.9 | moved % | other worker % |\n|---|---|---|---|---|---|")
    runs = [("sticky", never, 0.0, False), ("central", always, 0.0, True)]
    for m in args.move_us.split(","):
        for name, park in (("move-all", always), ("move-if-busy", if_busy),
                           ("move-if-busy-or-long", if_busy_or_long),
                           ("move-if-busy-and-free", if_busy_and_free)):
            runs.append((f"{name}+{m}", park, float(m) * 1e-6, False))
    for name, park, move, central in runs:
        lat, moved, other = simulate(reqs, park, move, 0.0 if central else WAKE, central)
        cells = percentiles(lat, reqs).split() + [f"{100 * moved / len(reqs):.1f}", f"{100 * other / len(reqs):.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
