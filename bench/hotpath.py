"""What balancer's worker adds to aiohttp per request, counted in CPU instructions (valgrind), not timed.

  python -m bench.hotpath                       # plain aiohttp, +observation, +proxy headers, both
  python -m bench.hotpath --variants plain,observe --requests 4000
  python -m bench.hotpath --sequential          # one request per read, as wrk sends them, not pipelined

On a shared 2-core VM, timings of one request drift by 10-20% from minute to minute, more than the few
percent a hot-path change is worth. Instructions retired do not drift. Each variant runs the bench's
Application (bench.apps:create_app) on a real aiohttp Server, in this process, over a socketpair: N pipelined
keep-alive requests per connection, under valgrind's cachegrind (no cache simulation), once with a few
connections and once with more; the difference divided by the extra requests is the cost of one request, free
of start-up. The client's share (one send and a few receives per connection) is in every variant alike.

  plain    aiohttp's Server as gunicorn's aiohttp worker runs it (no access log)
  observe  the worker's request observation (workers/observe.py): start time, per-method counts, the latency
           histogram, the in-flight gauge, via the worker's RequestHandler (serve_request() and log_access()),
           and keep-alive rebalancing's per-read and per-response checks (workers/rebalance.py), on by default
  proxy    the worker's proxy-header check in the request factory (workers/forwarded.py)

Needs valgrind (apt-get install valgrind). Nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\n\r\n"
VARIANTS = ("plain", "observe", "proxy", "observe+proxy")


async def serve(variant: str, connections: int, per_connection: int, sequential: bool = False) -> None:
    """Set the variant's Server up, then push per_connection pipelined requests through each connection."""
    from aiohttp import web

    from balancer_workers.forwarded import ProxyHeaders
    from balancer_workers.limits import Limits
    from balancer_workers.observe import Observer
    from balancer_workers.stats import RequestStats
    from bench.apps import create_app

    loop = asyncio.get_running_loop()
    runner = web.AppRunner(create_app(), handle_signals=False, access_log=None)
    await runner.setup()
    server = factory = runner.server
    if "observe" in variant:
        settings = {"header_timeout": 10, "body_timeout": 10, "body_min_rate": 500, "client_max_size": 1 << 20}
        stats = RequestStats()
        observer = Observer(stats, Limits(settings, stats, loop), lambda: None)
    if "proxy" in variant:
        server.request_factory = ProxyHeaders("127.0.0.1").wrap(server.request_factory)
    if "observe" in variant:  # the worker's connections: the request factory above is read as each one is made
        # With keep-alive rebalancing on, as it is by default, its gate shut as it is for this cheap handler:
        # under valgrind a request costs 20 to 50 times the CPU, which would open it.
        from balancer_workers import observe
        from balancer_workers.rebalance import Mover

        observe.MOVE_MIN_CPU_NS = 1 << 62
        mover = Mover(loop, None, None, observer.started, observer.arrived)
        factory = observer.protocol_factory(server, loop, request_factory=server.request_factory, mover=mover)
    for _ in range(connections):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        await loop.connect_accepted_socket(factory, ours)
        if sequential:  # as wrk and browsers do: the next request once the response is in, one read each
            for _ in range(per_connection):
                await loop.sock_sendall(theirs, REQUEST)
                got = b""
                while not whole_response(got):
                    got += await loop.sock_recv(theirs, 1 << 20)
        else:
            await loop.sock_sendall(theirs, REQUEST * per_connection)
            answered = 0
            while answered < per_connection:
                answered += (await loop.sock_recv(theirs, 1 << 20)).count(b"HTTP/1.1 200")
        theirs.close()
    await runner.cleanup()


def whole_response(got: bytes) -> bool:
    """True once got holds one whole response (headers and Content-Length bytes of body)."""
    head, sep, body = got.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    return length is not None and len(body) >= int(length.group(1))


def instructions(variant: str, connections: int, per_connection: int, sequential: bool = False) -> int:
    """Instructions the whole run of one variant took, from valgrind's summary line."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts in every run
    proc = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-m", "bench.hotpath", "--run", variant, str(connections),
         str(per_connection), *(["--sequential"] if sequential else [])],
        capture_output=True, text=True, env=env, timeout=1800)
    found = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"bench.hotpath: {variant} failed under valgrind:\n{proc.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--requests", type=int, default=2000, help="extra requests the longer run makes")
    parser.add_argument("--per-connection", type=int, default=200)
    parser.add_argument("--sequential", action="store_true",
                        help="each request sent once the last response is in (one read each, as wrk does), "
                             "instead of all pipelined")
    parser.add_argument("--run", nargs=3, metavar=("VARIANT", "CONNECTIONS", "PER_CONNECTION"),
                        help=argparse.SUPPRESS)  # the child valgrind runs
    opts = parser.parse_args(argv)
    if opts.run:
        import uvloop

        logging.disable(logging.CRITICAL)
        uvloop.run(serve(opts.run[0], int(opts.run[1]), int(opts.run[2]), opts.sequential))
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    names = [v.strip() for v in opts.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    few = 2
    more = few + max(1, opts.requests // opts.per_connection)
    extra = (more - few) * opts.per_connection
    per_request = {}
    for v in names:
        per_request[v] = (instructions(v, more, opts.per_connection, opts.sequential)
                          - instructions(v, few, opts.per_connection, opts.sequential)) / extra
        print(f"{v}: {per_request[v]:,.0f} instructions per request", file=sys.stderr, flush=True)
    base = per_request.get("plain")
    how = "one at a time" if opts.sequential else "pipelined"
    print(f"Instructions per keep-alive request (valgrind cachegrind; {extra:,} requests, {opts.per_connection} "
          f"{how} per connection, the bench Application):\n")
    print("| variant | instructions per request | vs plain aiohttp |\n|---|---|---|")
    for v in names:
        vs = f"{per_request[v] - base:+,.0f} ({per_request[v] / base - 1:+.1%})" if base else "-"
        print(f"| {v} | {per_request[v]:,.0f} | {vs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
