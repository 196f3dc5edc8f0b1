"""The tail workload's queueing, simulated: what each way of placing connections gives, free of any machine.

    python -m bench.dispatch_model [--rate 700] [--requests 400000] [--wake-us 0,50,100,200] [--extra-us 0]

Two workers serve one request per connection, one at a time (CPU-bound handlers), service times from the tail
mix plus a per-request overhead (DESIGN.md: 95% 0.65 ms, 5% 10.15 ms); Poisson arrivals. Printed: the short
requests' p50/p99/p99.9 (from arrival to the end of service) for

  central      a central queue: each worker takes the oldest waiting request when it is free (the ideal)
  jsq          least-connections, ties round robin (balancer before issue 25; with one request per
               connection, its free-first picks without a hold place the same way)
  hold+W       balancer's hold: a free worker if any, else the master keeps the connection and gives it to
               the first worker to go free, W us after (its IDLE message, the master's wake-up, the hand-off)
  random       the kernel's SO_REUSEPORT hash, as far as placement goes

A model, not a measurement: no preemption, no client CPU, workers never share a core. --extra-us adds CPU to
every request, as a master does on a machine whose cores the workers already fill (its share per connection,
and the worker's receipt of the fd): `--rate 1290 --extra-us 80` against `--rate 1290` is what that costs an
otherwise ideal central queue.
"""

from __future__ import annotations

import argparse
import random
from collections import deque

SHORT, LONG, SHARE_LONG = 0.65e-3, 10.15e-3, 0.05


def arrivals(rate: float, n: int, seed: int, extra: float = 0.0) -> list[tuple[float, float]]:
    """(arrival time, service time) for n requests; extra seconds of CPU added to each (see --extra-us)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, (LONG if rng.random() < SHARE_LONG else SHORT) + extra))
    return out


def central(reqs, wake: float = 0.0, hold: bool = False) -> list[float]:
    """A central FIFO queue; with hold, a request that waited reaches its worker `wake` seconds after it freed."""
    free_at = [0.0, 0.0]
    out = []
    for arrive, service in reqs:
        i = 0 if free_at[0] <= free_at[1] else 1
        start = max(arrive, free_at[i])
        if hold and start > arrive:  # it waited for a worker: the wake-up and hand-off come first
            start += wake
        free_at[i] = start + service
        out.append(free_at[i] - arrive)
    return out


def push(reqs, choose) -> list[float]:
    """Each request goes to the worker choose() names at its arrival and queues there (FIFO per worker)."""
    queues = [deque(), deque()]  # end times of the requests each worker holds
    free_at = [0.0, 0.0]
    out = []
    for n, (arrive, service) in enumerate(reqs):
        for q in queues:
            while q and q[0] <= arrive:
                q.popleft()
        i = choose(queues, n)
        start = max(arrive, free_at[i])
        free_at[i] = start + service
        queues[i].append(free_at[i])
        out.append(free_at[i] - arrive)
    return out


def jsq(queues, n):
    a, b = len(queues[0]), len(queues[1])
    return 0 if a < b else 1 if b < a else n % 2


def random_pick(rng):
    return lambda queues, n: rng.randrange(2)


def percentiles(latencies: list[float], reqs) -> str:
    short = sorted(lat for lat, (_, s) in zip(latencies, reqs) if s < LONG)
    at = lambda p: short[min(len(short) - 1, int(p / 100 * len(short)))] * 1e3  # noqa: E731
    return f"{at(50):6.2f} {at(99):7.2f} {at(99.9):7.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=700.0)
    parser.add_argument("--requests", type=int, default=400_000)
    parser.add_argument("--wake-us", default="0,50,100,200")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--extra-us", type=float, default=0.0,
                        help="CPU per request added on the workers' cores: a dispatcher's own cost where the workers "
                             "have every core (the master's share per connection, and the fd's receipt)")
    args = parser.parse_args()
    reqs = arrivals(args.rate, args.requests, args.seed, args.extra_us * 1e-6)
    mean = SHORT * (1 - SHARE_LONG) + LONG * SHARE_LONG + args.extra_us * 1e-6
    print(f"{args.rate:g} req/s on 2 workers (utilisation {args.rate * mean / 2:.0%}); short requests' latency, ms")
    print("| placement | p50 | p99 | p99.9 |\n|---|---|---|---|")
    rows = [("central", central(reqs))]
    rows += [(f"hold+{w}us", central(reqs, float(w) * 1e-6, hold=True)) for w in args.wake_us.split(",")]
    rows += [("jsq", push(reqs, jsq)), ("random", push(reqs, random_pick(random.Random(args.seed))))]
    for name, lat in rows:
        print(f"| {name} | " + " | ".join(percentiles(lat, reqs).split()) + " |")


if __name__ == "__main__":
    main()
