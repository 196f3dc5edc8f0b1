"""The workloads: what load each cell puts on a system and which figure of it matters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import loadgen
from bench.systems import HOST

HERE = Path(__file__).resolve().parent

# The tail workloads: open-loop Poisson arrivals at these shares of the capacity measured for gunicorn-uvloop
# in the same run (bench/run.py calibrate()), every system at the same absolute rate.
TAIL_LOADS = (0.5, 0.7, 0.85)
TAIL_PATH = "/spin"  # bench/apps.py: a busy loop of ?ms= CPU milliseconds
TAIL_POOL = 16  # tail-keepalive: the client's pool, as nginx's `keepalive 16` to an upstream
TAIL_MAX_CONNS = 512  # connections the generator opens at most; past them requests wait in it (and count)
CALIBRATE_CONCURRENCY = 16  # requests in flight while gunicorn-uvloop's capacity is measured


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    kind: str                       # "wrk" (closed loop), "openloop" (fixed rate) or "tail" (Poisson, the mix)
    path: str = "/"
    headers: tuple[str, ...] = ()
    lua: str = ""                   # extra wrk script body (bench/skewed.lua)
    key: str = "rps"                # the headline figure: "rps" (higher is better), "p99" or "p99_short" (lower)
    tls: bool = False               # https, against the systems with tls (bench/systems.py) and only those
    close: bool = False             # tail: a new connection per request (else the keep-alive pool)
    load: float = 0.0               # tail: the share of gunicorn-uvloop's capacity to send

    @property
    def family(self) -> str:
        """tail-close / tail-keepalive for the tail cells (one per load), else the name."""
        return ("tail-close" if self.close else "tail-keepalive") if self.kind == "tail" else self.name

    def run(self, port: int, opts, workdir: Path, tag: str, rnd: int = 1) -> dict:
        if self.kind == "openloop":
            return loadgen.run_openloop(HOST, port, self.path, opts.open_rate, opts.duration, workdir, tag)
        if self.kind == "tail":
            # Every system of a round gets the same schedule (the seed), each round another one.
            return tail_load(port, opts, workdir, tag, self.close, rate=self.load * opts.capacity[self.family],
                             seed=1000 + rnd)
        lua_args: tuple[str, ...] = ()
        body = ""
        if self.lua:
            body = (HERE / self.lua).read_text()
            lo, hi = opts.slow_ms
            lua_args = (str(opts.slow_share), str(lo), str(hi))
        scheme = "https" if self.tls else "http"
        return loadgen.run_wrk(f"{scheme}://{HOST}:{port}{self.path}", int(opts.duration), opts.connections,
                               opts.threads, workdir, tag, headers=self.headers, lua=body, lua_args=lua_args)


def tail_load(port: int, opts, workdir: Path, tag: str, close: bool, rate: float = 0.0, closed: int = 0,
              seed: int = 1000, duration: float = 0.0) -> dict:
    """The tail mix against port: open loop at rate (Poisson), or closed loop with `closed` requests in flight."""
    return loadgen.run_openloop(HOST, port, TAIL_PATH, rate, duration or opts.duration, workdir, tag,
                                conns=0 if close else TAIL_POOL, max_conns=TAIL_MAX_CONNS, pool=TAIL_POOL,
                                fifo=False, mix=opts.tail_mix, poisson=True, close=close, closed=closed, seed=seed)


def tail_workloads(opts) -> list[Workload]:
    """tail-close-50 ... tail-keepalive-85: one cell per load."""
    out = []
    for close in (True, False):
        family = "tail-close" if close else "tail-keepalive"
        how = "a new connection per request" if close else f"a pool of {TAIL_POOL} keep-alive connections"
        for load in opts.tail_loads:
            out.append(Workload(f"{family}-{round(load * 100)}",
                                f"CPU-bound mix {opts.tail_mix} ms at {load:.0%} of gunicorn-uvloop's capacity, "
                                f"Poisson arrivals, {how} (bench/openloop.c)", "tail", TAIL_PATH, key="p99_short",
                                close=close, load=load))
    return out


def all_workloads(opts) -> list[Workload]:
    lo, hi = opts.slow_ms
    return [
        Workload("hello-keepalive", "hello, keep-alive (wrk)", "wrk", "/"),
        Workload("hello-close", "hello, new connection per request (wrk -H 'Connection: close')", "wrk", "/",
                 headers=("Connection: close",)),
        Workload("template", "Jinja2 template page, CPU-bound (wrk)", "wrk", "/template"),
        Workload("skewed", f"skewed mix: {opts.slow_share:.1%} of requests sleep {lo}-{hi} ms "
                           "(wrk + bench/skewed.lua)", "wrk", "/", lua="skewed.lua", key="p99"),
        Workload("open-loop", f"open loop: {opts.open_rate:g} req/s of the template page "
                              "(bench/openloop.c)", "openloop", "/template", key="p99"),
        *tail_workloads(opts),
        Workload("https-keepalive", "hello over https, keep-alive (wrk)", "wrk", "/", tls=True),
        Workload("https-close", "hello over https, a TLS handshake per request (wrk -H 'Connection: close')", "wrk",
                 "/", headers=("Connection: close",), tls=True),
    ]
