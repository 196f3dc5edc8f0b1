"""Open-loop load generator: a fixed request rate for a fixed time, latency from each request's scheduled time.

wrk is closed-loop (a slow answer delays the next request on that connection, so the slowness is hidden:
"coordinated omission"). Here request i is due at t0 + i/rate whatever happened before. It opens --conns
keep-alive connections first (like that many clients) and uses them in turn (the idle one that has waited
longest goes first, so the load spreads over all of them and over the workers they landed on); when all are
busy it opens another one, up to --max-conns, then queues. Latency counts from when the request was due, so
queueing in the client counts too.

  python -m bench.openloop --port P --rate 300 --duration 10 --path /template

Prints one line `BENCH_JSON {...}` on stdout (same shape as bench/report.lua's, latencies in microseconds).
Runs in its own process so its CPU never mixes with the system under test's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time


class Conn(asyncio.Protocol):
    """One HTTP/1.1 keep-alive client connection; one request at a time (no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.need = -1          # total bytes of the current response once its headers are parsed
        self.status = 0
        self.keep = True
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    self.keep = False
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            del self.buf[:self.need]
            self.need = -1
            if self.waiter and not self.waiter.done():
                self.waiter.set_result(self.status)

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed before a full response"))

    def request(self, raw: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter


class Generator:
    def __init__(self, host: str, port: int, path: str, rate: float, duration: float, conns: int,
                 max_conns: int, timeout: float) -> None:
        self.host, self.port, self.rate, self.duration = host, port, rate, duration
        self.conns, self.max_conns, self.timeout = conns, max(conns, max_conns), timeout
        self.raw = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        self.idle: collections.deque[Conn] = collections.deque()
        self.open = 0
        self.opened = 0
        self.waiters: list[asyncio.Future] = []
        self.latencies: list[float] = []
        self.errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
        self.max_late = 0.0

    async def _acquire(self) -> Conn:
        loop = asyncio.get_running_loop()
        while True:
            while self.idle:
                conn = self.idle.popleft()
                if not conn.lost:
                    return conn
                self.open -= 1
            if self.open < self.max_conns:
                self.open += 1
                try:
                    _, conn = await loop.create_connection(Conn, self.host, self.port)
                except OSError:
                    self.open -= 1
                    raise
                self.opened += 1
                return conn
            fut = loop.create_future()
            self.waiters.append(fut)
            await fut

    def _release(self, conn: Conn, reuse: bool) -> None:
        if reuse and conn.keep and not conn.lost:
            self.idle.append(conn)
        else:
            self.open -= 1
            if conn.transport is not None:
                conn.transport.close()
        while self.waiters:
            fut = self.waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                break

    async def one(self, due: float) -> None:
        try:
            conn = await asyncio.wait_for(self._acquire(), self.timeout)
        except asyncio.TimeoutError:
            self.errors["timeout"] += 1
            return
        except OSError:
            self.errors["connect"] += 1
            return
        ok = False
        try:
            status = await asyncio.wait_for(conn.request(self.raw), self.timeout)
            self.latencies.append(time.perf_counter() - due)
            if not 200 <= status < 300:
                self.errors["status"] += 1
            ok = True
        except asyncio.TimeoutError:
            self.errors["timeout"] += 1
        except (ConnectionError, OSError):
            self.errors["read"] += 1
        finally:
            self._release(conn, ok)

    async def run(self) -> dict:
        loop = asyncio.get_running_loop()
        for _ in range(self.conns):
            _, conn = await loop.create_connection(Conn, self.host, self.port)
            self.open += 1
            self.opened += 1
            self.idle.append(conn)
        # time.perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
        clock = time.perf_counter
        total = int(self.rate * self.duration)
        tasks: set[asyncio.Task] = set()
        t0 = clock() + 0.01
        i = 0
        while i < total:
            now = clock()
            while i < total and t0 + i / self.rate <= now:
                due = t0 + i / self.rate
                self.max_late = max(self.max_late, now - due)
                task = asyncio.ensure_future(self.one(due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if i < total:
                await asyncio.sleep(max(0.0, t0 + i / self.rate - clock()))
        if tasks:
            await asyncio.wait(set(tasks), timeout=self.timeout + 1)
        elapsed = clock() - t0
        for conn in self.idle:
            conn.transport.close()
        return self.summary(total, elapsed)

    def summary(self, sent: int, elapsed: float) -> dict:
        lat = sorted(self.latencies)

        def pct(p: float) -> int:
            if not lat:
                return 0
            return int(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e6)

        return {
            "requests": len(lat), "sent": sent, "duration_us": int(elapsed * 1e6), "rate": self.rate,
            "connections": self.opened, "max_late_us": int(self.max_late * 1e6),
            "errors": self.errors,
            "latency_us": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "p999": pct(99.9),
                           "max": int(lat[-1] * 1e6) if lat else 0,
                           "mean": round(sum(lat) / len(lat) * 1e6, 1) if lat else 0.0},
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second (default 1000)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    p.add_argument("--conns", type=int, default=32, help="connections opened before the run (default 32)")
    p.add_argument("--max-conns", type=int, default=256, help="most connections open at once (default 256)")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout in seconds (default 5)")
    args = p.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    gen = Generator(args.host, args.port, args.path, args.rate, args.duration, args.conns, args.max_conns,
                    args.timeout)
    started = time.monotonic()
    result = asyncio.run(gen.run())
    result["wall_s"] = round(time.monotonic() - started, 3)
    sys.stdout.write("BENCH_JSON " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
