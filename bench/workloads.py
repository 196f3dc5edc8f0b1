"""The workloads: what load each cell puts on a system and which figure of it matters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import loadgen
from bench.systems import HOST

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    kind: str                       # "wrk" (closed loop) or "openloop" (fixed rate)
    path: str = "/"
    headers: tuple[str, ...] = ()
    lua: str = ""                   # extra wrk script body (bench/skewed.lua)
    key: str = "rps"                # the headline figure: "rps" (higher is better) or "p99" (lower is better)
    tls: bool = False               # https, against the systems with tls (bench/systems.py) and only those

    def run(self, port: int, opts, workdir: Path, tag: str) -> dict:
        if self.kind == "openloop":
            return loadgen.run_openloop(HOST, port, self.path, opts.open_rate, opts.duration, workdir, tag)
        lua_args: tuple[str, ...] = ()
        body = ""
        if self.lua:
            body = (HERE / self.lua).read_text()
            lo, hi = opts.slow_ms
            lua_args = (str(opts.slow_share), str(lo), str(hi))
        scheme = "https" if self.tls else "http"
        return loadgen.run_wrk(f"{scheme}://{HOST}:{port}{self.path}", int(opts.duration), opts.connections,
                               opts.threads, workdir, tag, headers=self.headers, lua=body, lua_args=lua_args)


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
                              "(bench/openloop.py)", "openloop", "/template", key="p99"),
        Workload("https-keepalive", "hello over https, keep-alive (wrk)", "wrk", "/", tls=True),
        Workload("https-close", "hello over https, a TLS handshake per request (wrk -H 'Connection: close')", "wrk",
                 "/", headers=("Connection: close",), tls=True),
    ]
