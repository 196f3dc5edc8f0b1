"""The scaling model on paper: what one master can hand out, and where it caps a machine of C cores.

  python -m bench.scaling                      # inputs from the newest full run's raw JSON
  python -m bench.scaling bench/results/tmp/full-<time>.json --cores 8,16,32,64

A 2-core machine cannot show 64 cores, but it can measure the two costs that decide them (medians of
balancer's cells, like-for-like row):
  m  = master CPU per new connection (us), from hello-close (every request is a new connection);
  wc = worker CPU per request on a new connection (us), from hello-close;
  wk = worker CPU per keep-alive request (us), from hello-keepalive.
The master is one thread: it hands out at most 1e6 / m connections per second. On C cores running C
workers and the master, close-heavy traffic needs (m + wc) us of CPU per connection, so

  R(C) = min(C * 1e6 / (m + wc), 1e6 / m)          new connections (= requests) per second

and the master becomes the bottleneck at C* = (m + wc) / m cores. Past C*, more workers add nothing for
close-heavy traffic (they idle) but still add capacity for keep-alive requests, which never reach the
master (C * 1e6 / wk), and for CPU-heavy handlers: a connection that brings W us of worker CPU moves the
point to (m + W) / m. Nothing here runs a load; kernel and NIC costs beyond what loopback charges to the
processes are left out, so the figures are upper bounds of the model, not capacities.

Holding and moving connections cost the master too. From a run with the tail cells (CPU-bound mix, at its
highest load, 85% of gunicorn's capacity by default; the newest such run unless --tail names one):
  mh = master CPU per new connection under the tail mix (us), holds included (tail-close);
  mk = master CPU per keep-alive request under the tail mix (us), parked connections and their moves to another
       worker included (tail-keepalive); with balancer-sticky in the run, the same without rebalancing.
The master then caps CPU-bound keep-alive traffic at 1e6 / mk requests/s, and close-heavy CPU-bound traffic at
1e6 / mh connections/s; a worker's share of a move (giving the connection back, taking it as a new one) is in
its CPU per request, which the model does not split out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.report import SUBJECT

RAW = Path(__file__).resolve().parent / "results" / "tmp"


def cell_values(data: dict, system: str, workload: str, key: str) -> list[float]:
    """key of every ok cell of system under workload that has it."""
    return [c[key] for c in data["cells"] if c["system"] == system and c["workload"] == workload
            and c["ok"] and c.get(key) is not None]


def inputs(data: dict) -> dict[str, float]:
    """m, wc, wk (us) as medians of the subject's ok cells."""
    def median(workload: str, key: str) -> float:
        vals = cell_values(data, SUBJECT, workload, key)
        if not vals:
            raise SystemExit(f"bench.scaling: no {SUBJECT} {workload} cells with {key} in this run")
        return statistics.median(vals)
    return {"m": median("hello-close", "leader_us_per_request"),
            "wc": median("hello-close", "worker_us_per_request"),
            "wk": median("hello-keepalive", "worker_us_per_request")}


def tail_inputs(data: dict) -> dict[str, float]:
    """mh, mk (and mk of balancer-sticky when it ran) in us, as medians of the most loaded tail cells."""
    def median(system: str, family: str) -> float | None:
        names = sorted((w["name"] for w in data["workloads"] if w["name"].startswith(family + "-")),
                       key=lambda name: int(name.rsplit("-", 1)[1]))
        if not names:
            return None
        vals = cell_values(data, system, names[-1], "leader_us_per_request")
        return statistics.median(vals) if vals else None
    out = {"mh": median(SUBJECT, "tail-close"), "mk": median(SUBJECT, "tail-keepalive"),
           "mk_sticky": median("balancer-sticky", "tail-keepalive")}
    return {k: v for k, v in out.items() if v is not None}


def tail_lines(got: dict[str, float]) -> str:
    """What holding and moving connections cost the master, and the ceilings that follow."""
    lines = []
    if "mh" in got:
        lines.append(f"CPU-bound mix, new connection per request: mh = {got['mh']:.1f} us of master CPU per connection "
                     f"(holds included): at most {1e6 / got['mh']:,.0f} connections/s from one master.")
    if "mk" in got:
        sticky = (f" (without rebalancing, balancer-sticky: {got['mk_sticky']:.1f} us)"
                  if "mk_sticky" in got else "")
        lines.append(f"CPU-bound mix, keep-alive: mk = {got['mk']:.1f} us of master CPU per request, parked "
                     f"connections and moves included{sticky}: the master caps it at {1e6 / got['mk']:,.0f} req/s.")
    return "\n".join(lines)


def newest_tail_run() -> Path | None:
    """The newest full run of the subject with tail cells, if any."""
    return newest_with(lambda names: any(name.startswith("tail-") for name in names))


def model(m: float, wc: float, wk: float, cores: int) -> dict[str, float | str]:
    """The model's figures for a machine of cores cores running that many workers."""
    by_cpu = cores * 1e6 / (m + wc)
    ceiling = 1e6 / m
    rate = min(by_cpu, ceiling)
    return {"cores": cores, "close_rate": rate, "limit": "master" if ceiling < by_cpu else "CPU",
            "master_busy": rate * m / 1e6, "workers_busy": rate * wc / (cores * 1e6),
            "keepalive_rate": cores * 1e6 / wk}


def table(m: float, wc: float, wk: float, cores: list[int]) -> str:
    lines = [f"Inputs: m = {m:.1f} us master CPU per new connection, wc = {wc:.1f} us worker CPU per request on a "
             f"new connection, wk = {wk:.1f} us worker CPU per keep-alive request.",
             f"One master hands out at most 1e6 / m = {1e6 / m:,.0f} new connections/s; it becomes the bottleneck "
             f"for close-heavy traffic at C* = (m + wc) / m = {(m + wc) / m:.1f} cores.", "",
             "| cores (= workers) | close-heavy conn/s | limited by | master core busy | workers busy | "
             "keep-alive req/s (master not involved) |",
             "|---|---|---|---|---|---|"]
    for c in cores:
        r = model(m, wc, wk, c)
        lines.append(f"| {c} | {r['close_rate']:,.0f} | {r['limit']} | {r['master_busy']:.0%} | "
                     f"{r['workers_busy']:.0%} | {r['keepalive_rate']:,.0f} |")
    return "\n".join(lines)


def newest_with(wanted) -> Path | None:
    """The newest full run of the subject whose workload names wanted() accepts, if any."""
    for path in sorted(RAW.glob("full-*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        data = json.loads(path.read_text())
        if SUBJECT in data["systems"] and wanted({w["name"] for w in data["workloads"]}):
            return path
    return None


def newest_run() -> Path:
    """The newest full run of the subject with hello-close and hello-keepalive."""
    path = newest_with(lambda names: {"hello-close", "hello-keepalive"} <= names)
    if path is None:
        raise SystemExit(f"bench.scaling: no full run with {SUBJECT} hello-close and hello-keepalive in {RAW}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", nargs="?", type=Path, help="a full run's raw JSON (default: the newest)")
    parser.add_argument("--cores", default="8,16,32,64")
    parser.add_argument("--tail", type=Path, help="a full run's raw JSON with the tail cells (default: the newest)")
    opts = parser.parse_args(argv)
    path = opts.raw or newest_run()
    got = inputs(json.loads(path.read_text()))
    print(f"From {path}:\n")
    print(table(got["m"], got["wc"], got["wk"], [int(c) for c in opts.cores.split(",")]))
    tail = opts.tail or newest_tail_run()
    if tail is not None:
        text = tail_lines(tail_inputs(json.loads(tail.read_text())))
        if text:
            print(f"\nHolding and moving connections, from {tail}:\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
