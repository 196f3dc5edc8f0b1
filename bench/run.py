"""Benchmark balancer against its peers; see bench/README.md.

  python -m bench                 # full run: 5 rounds x 10 s per cell, writes bench/results/results.{md,png}
  python -m bench --quick         # 1 round x 5 s, writes bench/results/tmp/quick/
  python -m bench --smoke         # 1 round x 1 s, no warm-up, writes bench/results/tmp/smoke/ (the test suite)

Each round starts every system (own process group, own free port in 18000-18999 or --ports), waits until each
worker answers, warms up, then runs every workload on every system (system order rotated each round to spread
noise), then stops them all. The tail workloads' rates come from gunicorn-uvloop's capacity for their mix,
measured once before the first round (calibrate()). Progress goes to stderr; the table, chart and raw JSON to the
output directory.
Targets are reported as PASS/MISS; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.procstat import cpu_delta, machine_busy, machine_cpu
from bench.systems import BASELINE_TREE, REPO, SPECS, Running, checkout, default_ports, parse_ports, remove_checkout
from bench.tls import self_signed
from bench.workloads import CALIBRATE_CONCURRENCY, TAIL_LOADS, all_workloads, tail_load

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 round x 5 s per cell, output under results/tmp/quick")
    mode.add_argument("--smoke", action="store_true",
                      help="1 round x 1 s per cell, no warm-up, output under results/tmp/smoke")
    p.add_argument("--rounds", type=int, help="rounds (default 5; quick/smoke 1)")
    p.add_argument("--duration", type=int, help="seconds per cell (default 10; quick 5; smoke 1)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for every system (default 2)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: leave the cores to servers)")
    p.add_argument("--systems", default=",".join(SPECS), help=f"comma list (default all: {','.join(SPECS)})")
    p.add_argument("--workloads", default="", help="comma list of workload names (default all)")
    p.add_argument("--slow-share", type=float, default=0.005,
                   help="skewed mix: share of requests that sleep (default 0.005, see README)")
    p.add_argument("--slow-ms", default="50-100", help="skewed mix: sleep range in ms (default 50-100)")
    p.add_argument("--open-rate", type=float,
                   help="open-loop workload: requests per second of the template page (default 500; smoke 100)")
    p.add_argument("--tail-mix", default="0.95:0.5,0.05:10", metavar="MIX",
                   help="tail workloads: SHARE:MS,... CPU milliseconds per request (default 0.95:0.5,0.05:10), or "
                        "lognormal:MEDIAN_MS:SIGMA")
    p.add_argument("--tail-loads", help="tail workloads: shares of gunicorn-uvloop's capacity, in percent "
                                        "(default 50,70,85; smoke 70)")
    p.add_argument("--capacity", metavar="CLOSE,KEEPALIVE",
                   help="tail workloads: gunicorn-uvloop's capacity in req/s for the mix, new connections and "
                        "keep-alive, instead of measuring it before the first round")
    p.add_argument("--baseline", default="main", metavar="REV",
                   help="the git revision the balancer-base system runs (default main)")
    p.add_argument("--ports", type=parse_ports, metavar="LO-HI", default=default_ports(),
                   help="where the systems' free ports are found (default $BENCH_PORTS, else 18000-18999)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per system per round (default 2; smoke 0)")
    p.add_argument("--max-other", type=float, default=25.0, metavar="PCT",
                   help="a cell during which processes outside the benchmark used more than PCT%% of a core is "
                        "'disturbed' and re-run (default 25)")
    p.add_argument("--retries", type=int, help="re-runs of a disturbed cell (default 2; quick 1; smoke 0)")
    p.add_argument("--quiet-wait", type=float,
                   help="seconds to wait before a cell for the machine to go quiet (default 60; quick 30; smoke 0)")
    p.add_argument("--extra-budget", type=float, metavar="SECONDS",
                   help="most time the whole run may spend waiting for quiet and re-running disturbed cells "
                        "(default 600; quick 120; smoke 0)")
    p.add_argument("--out", type=Path, help="output directory (default results/, or results/tmp/<mode>/)")
    p.add_argument("--report", type=Path, metavar="RAW.json",
                   help="run nothing: redo the table and chart from a raw JSON of an earlier run "
                        "(into --out, default results/tmp/report/)")
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.mode = mode
    args.rounds = args.rounds or {"full": 5, "quick": 1, "smoke": 1}[mode]
    args.duration = args.duration or {"full": 10, "quick": 5, "smoke": 1}[mode]
    args.warmup = args.warmup if args.warmup is not None else {"full": 2.0, "quick": 1.0, "smoke": 0.0}[mode]
    args.retries = args.retries if args.retries is not None else {"full": 2, "quick": 1, "smoke": 0}[mode]
    args.quiet_wait = (args.quiet_wait if args.quiet_wait is not None
                       else {"full": 60.0, "quick": 30.0, "smoke": 0.0}[mode])
    args.extra_budget = (args.extra_budget if args.extra_budget is not None
                         else {"full": 600.0, "quick": 120.0, "smoke": 0.0}[mode])
    args.extra_used = 0.0
    args.open_rate = args.open_rate or (100.0 if mode == "smoke" else 500.0)
    loads = args.tail_loads or ("70" if mode == "smoke" else ",".join(str(round(x * 100)) for x in TAIL_LOADS))
    args.tail_loads = tuple(float(x) / 100 for x in loads.split(",") if x.strip())
    if args.capacity:
        try:
            close, keepalive = (float(x) for x in args.capacity.split(","))
        except ValueError:
            p.error(f"--capacity {args.capacity!r}: expected CLOSE,KEEPALIVE in req/s, e.g. 1100,1400")
        args.capacity = {"tail-close": close, "tail-keepalive": keepalive}
    args.out = args.out or (RESULTS if mode == "full" else RESULTS / "tmp" / mode)
    lo, _, hi = args.slow_ms.partition("-")
    args.slow_ms = (int(lo), int(hi or lo))
    args.system_names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.system_names if s not in SPECS]
    if unknown:
        p.error(f"unknown system(s) {unknown}; known: {list(SPECS)}")
    known = all_workloads(args)
    names = [w.name for w in known]
    asked = [w.strip() for w in args.workloads.split(",") if w.strip()]
    families = {w.family for w in known}
    unknown = [w for w in asked if w not in names and w not in families]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; known: {names} (tail-close and tail-keepalive name every load)")
    args.workload_names = [w.name for w in known if w.name in asked or w.family in asked] if asked else names
    return args


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def _dirty() -> str:
    """' + uncommitted changes in ...' when the code under test differs from the commit."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "balancer", "workers"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    paths = sorted({line[3:].strip() for line in out.splitlines() if line.strip()})
    return f" + uncommitted changes in {', '.join(paths)}" if paths else ""


def environment(args: argparse.Namespace, argv: list[str]) -> dict:
    import aiohttp
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "command": "python -m bench" + ("" if not argv else " " + shlex.join(argv)),
        "mode": args.mode, "rounds": args.rounds, "duration_s": args.duration, "workers": args.workers,
        "connections": args.connections, "threads": args.threads, "open_rate": args.open_rate,
        "tail_mix": args.tail_mix, "tail_loads": list(args.tail_loads), "baseline": args.baseline,
        "slow_share": args.slow_share, "slow_ms": list(args.slow_ms), "warmup_s": args.warmup,
        "max_other": args.max_other, "retries": args.retries, "quiet_wait_s": args.quiet_wait,
        "extra_budget_s": args.extra_budget,
        "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "aiohttp": aiohttp.__version__,
        "gunicorn": _version([sys.executable, "-m", "gunicorn", "--version"]),
        "node": _version(["node", "--version"]), "wrk": _version(["wrk", "--version"]).split(" [")[0],
        "commit": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) + _dirty(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def check_tools() -> None:
    missing = [t for t in ("wrk", "node") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing tool(s) {missing}: apt-get install -y wrk nodejs")


def start_all(systems: list[Running]) -> None:
    for i, s in enumerate(systems):
        s.start(avoid={other.port for other in systems[:i]})  # none has bound its port yet
    for s in systems:
        try:
            s.wait_ready()
        except RuntimeError as exc:
            # A peer that exits while starting (seen once: Node's primary exiting 0, as on SIGTERM, with an
            # empty log) is started once more, and it says so. balancer's rows never are: that is a failure.
            if s.spec.leader == "master" or s.alive():
                raise
            progress(f"  {s.name} exited while starting ({exc}); starting it once more")
            s.stop()
            s.start(avoid={other.port for other in systems})
            s.wait_ready()
        note = f" ({s.note})" if s.note else ""
        progress(f"  {s.name} ready on :{s.port}, pids {sorted(s.processes())}{note}")


def warm_up(system: Running, args: argparse.Namespace, workdir: Path) -> None:
    from bench import loadgen
    scheme = "https" if system.spec.tls else "http"
    for path in ("/",) if system.spec.tls else ("/", "/template"):
        loadgen.run_wrk(f"{scheme}://127.0.0.1:{system.port}{path}", max(1, int(args.warmup / 2)), 16, 1, workdir,
                        f"warmup-{system.name}")


def runs_on(workload, system_name: str) -> bool:
    """https workloads run on the https systems, the others on the plain ones."""
    return workload.tls == SPECS[system_name].tls


def run_cell(system: Running, workload, args: argparse.Namespace, workdir: Path, rnd: int) -> dict:
    """One workload on one system, with CPU accounting of every process in the system's group."""
    cell = {"round": rnd, "system": system.name, "workload": workload.name, "ok": False}
    before = system.processes()
    m0 = machine_cpu()
    t0 = time.monotonic()
    try:
        res = workload.run(system.port, args, workdir, f"r{rnd}-{system.name}-{workload.name}", rnd)
    except Exception as exc:  # noqa: BLE001 - a failed cell is reported, not fatal
        cell["error"] = f"{type(exc).__name__}: {exc}"
        res = None
    wall = time.monotonic() - t0
    m1 = machine_cpu()
    after = system.processes()
    delta = cpu_delta(before, after)
    gone = sorted(set(before) - set(after))
    span = res["duration_s"] if res else wall
    cell["processes"] = [{"pid": pid, "role": system.role(pid), "comm": after[pid][1], "cpu_s": round(d, 3),
                          "cpu_pct": round(100 * d / span, 1) if span else 0.0}
                         for pid, d in sorted(delta.items(), key=lambda kv: (system.role(kv[0]) != system.spec.leader, -kv[1]))]
    cell["exited_pids"] = gone
    # Whole-machine CPU over the cell (% of one core): what neither the system nor the load generator used
    # ("other") is interference from outside the benchmark.
    cell["machine"] = {"busy_pct": round(100 * (m1[0] - m0[0]) / wall, 1),
                       "idle_pct": round(100 * (m1[1] - m0[1]) / wall, 1),
                       "steal_pct": round(100 * (m1[2] - m0[2]) / wall, 1)}
    cell["crashed"] = not system.alive() or bool(gone)
    if res:
        cell.update(res)
        cell["ok"] = True
        cell["machine"]["other_pct"] = round(
            cell["machine"]["busy_pct"] - sum(p["cpu_s"] for p in cell["processes"]) * 100 / wall
            - 100 * res["loadgen_cpu_s"] / wall, 1)
        leader = [p for p in cell["processes"] if p["role"] == system.spec.leader]
        if leader and res["requests"] and system.spec.leader != "server":  # "server" is also the worker
            cell["leader_us_per_request"] = round(leader[0]["cpu_s"] / res["requests"] * 1e6, 2)
        if res["requests"]:  # the processes that serve: every one but a separate leader (master, arbiter...)
            served = sum(p["cpu_s"] for p in cell["processes"]
                         if p["role"] == "worker" or system.spec.leader == "server")
            cell["worker_us_per_request"] = round(served / res["requests"] * 1e6, 2)
    return cell


def wait_quiet(args: argparse.Namespace, tag: str) -> None:
    """Before a cell: wait (up to --quiet-wait) until nothing outside the benchmark keeps a core busy.
    Our own systems sit idle between cells, so busy time now is somebody else's."""
    if args.quiet_wait <= 0 or args.extra_used >= args.extra_budget:
        return
    started = time.monotonic()
    deadline = started + min(args.quiet_wait, args.extra_budget - args.extra_used)
    said = False
    while True:
        busy = machine_busy(0.5)
        if busy <= args.max_other:
            args.extra_used += time.monotonic() - started if said else 0.0
            return
        if time.monotonic() > deadline:
            args.extra_used += time.monotonic() - started
            progress(f"{tag}     machine still busy ({busy:.0f}% of a core outside the benchmark); going on")
            return
        if not said:
            progress(f"{tag}     waiting for the machine to go quiet ({busy:.0f}% of a core busy outside the benchmark)")
            said = True
        time.sleep(1.0)


def run_cell_retrying(system: Running, workload, args: argparse.Namespace, workdir: Path, rnd: int,
                      tag: str) -> dict:
    """run_cell, re-run while processes outside the benchmark took more than --max-other of a core."""
    for attempt in range(args.retries + 1):
        wait_quiet(args, tag)
        cell = run_cell(system, workload, args, workdir, rnd)
        other = cell.get("machine", {}).get("other_pct", 0.0)
        cell["attempts"] = attempt + 1
        cell["disturbed"] = cell["ok"] and other > args.max_other
        if not cell["disturbed"] or attempt == args.retries or args.extra_used >= args.extra_budget:
            return cell
        args.extra_used += args.duration
        progress(f"{tag}     {describe(cell)}")
        progress(f"{tag}     disturbed: {other:.0f}% of a core used outside the benchmark; re-running")
    return cell


def describe(cell: dict) -> str:
    if not cell["ok"]:
        return "FAILED: " + cell.get("error", "?")
    lat = cell["latency_us"]
    if "short_latency_us" in cell:  # a tail cell: the short requests' tail is the figure
        short = cell["short_latency_us"]
        err = cell["errors"]["socket"] + cell["errors"]["non2xx"]
        cpu = " ".join(f"{p['role'][0]}{p['cpu_pct']:.0f}%" for p in cell["processes"])
        return (f"{cell['rps']:,.0f} req/s  short p50 {short['p50'] / 1000:.2f} p99 {short['p99'] / 1000:.2f} "
                f"p99.9 {short['p999'] / 1000:.2f} ms  all p99 {lat['p99'] / 1000:.2f} ms  errors {err}  "
                f"cpu {cpu} loadgen {100 * cell['loadgen_cpu_s'] / cell['duration_s']:.0f}%"
                + (" CRASHED" if cell["crashed"] else ""))
    err = cell["errors"]["socket"] + cell["errors"]["non2xx"]
    cpu = " ".join(f"{p['role'][0]}{p['cpu_pct']:.0f}%" for p in cell["processes"])
    crash = " CRASHED" if cell["crashed"] else ""
    other = cell.get("machine", {}).get("other_pct")
    other = "" if other is None else f"  other {other:.0f}%"
    return (f"{cell['rps']:,.0f} req/s  p50 {lat['p50'] / 1000:.2f} ms  p99 {lat['p99'] / 1000:.2f} ms  "
            f"errors {err}  cpu {cpu}{other}{crash}")


def calibrate(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """gunicorn-uvloop's capacity for the tail mix (req/s), new connections and keep-alive: the tail rates' basis.

    Closed loop, CALIBRATE_CONCURRENCY requests always in flight, one --duration each, after a warm-up.
    """
    system = Running(SPECS["gunicorn-uvloop"], args.workers, workdir, ports=args.ports)
    out = {}
    try:
        system.start()
        system.wait_ready()
        for family, close in (("tail-close", True), ("tail-keepalive", False)):
            if args.warmup > 0:
                tail_load(system.port, args, workdir, f"calibrate-warmup-{family}", close,
                          closed=CALIBRATE_CONCURRENCY, duration=args.warmup)
            res = tail_load(system.port, args, workdir, f"calibrate-{family}", close, closed=CALIBRATE_CONCURRENCY)
            if not res["requests"]:
                raise RuntimeError(f"gunicorn-uvloop answered no request of the tail mix ({family})")
            out[family] = res["rps"]
            progress(f"calibrate: gunicorn-uvloop serves {res['rps']:,.0f} req/s of the tail mix ({family}, "
                     f"{CALIBRATE_CONCURRENCY} in flight); the tail cells send "
                     + ", ".join(f"{load:.0%} = {load * res['rps']:,.0f}" for load in args.tail_loads) + " req/s")
    finally:
        system.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report:
        data = json.loads(args.report.read_text())
        out = args.out if "--out" in argv else RESULTS / "tmp" / "report"
        md, png = report.write(data, out)
        progress(f"bench: table {md}, chart {png} (from {args.report})")
        if out.resolve() == RESULTS.resolve() and data["env"].get("mode") == "full":
            for readme in (HERE / "README.md", HERE.parent / "README.md"):  # re-rendering a full run's raw data
                if report.update_readme(data, readme, RESULTS):
                    progress(f"bench: updated the latest-results section of {readme}")
        for line in report.target_lines(data):
            print(line)
        return 0
    check_tools()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = RESULTS / "tmp" / f"work-{args.mode}"
    workdir.mkdir(parents=True, exist_ok=True)
    env = environment(args, argv)
    workloads = [w for w in all_workloads(args) if w.name in args.workload_names]
    order = list(args.system_names)
    baseline = workdir / BASELINE_TREE if "balancer-base" in order else None
    if baseline is not None:
        remove_checkout(baseline)  # one left over by a run that was killed
        env["baseline_commit"] = checkout(args.baseline, baseline)
        progress(f"bench: balancer-base runs {args.baseline} ({env['baseline_commit']}) from {baseline}")
    try:
        if any(w.kind == "tail" for w in workloads) and args.capacity is None:
            args.capacity = calibrate(args, workdir)
        env["capacity"] = args.capacity
        return run_rounds(args, argv, env, workloads, order, workdir, baseline)
    finally:
        if baseline is not None:
            remove_checkout(baseline)


def run_rounds(args: argparse.Namespace, argv: list[str], env: dict, workloads: list, order: list[str],
               workdir: Path, baseline: Path | None) -> int:
    """Every round of the run, then the table, chart and target lines."""
    cells: list[dict] = []
    total = args.rounds * sum(runs_on(w, n) for w in workloads for n in order)
    # One certificate for every https system of the run, so they all do the same handshake work.
    tls_files = self_signed(workdir) if any(SPECS[n].tls for n in order) else None
    progress(f"bench: {args.mode} run, {args.rounds} round(s) x {len(workloads)} workload(s) x {len(order)} "
             f"system(s), {args.duration} s per cell, {args.workers} workers; ~"
             f"{total * (args.duration + 0.5) / 60:.1f} min of load")
    started = time.monotonic()
    done = 0
    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(order)
        names = order[k:] + order[:k]
        tag = f"[round {rnd}/{args.rounds}]"
        progress(f"{tag} starting {', '.join(names)}")
        systems = [Running(SPECS[n], args.workers, workdir, tls_files=tls_files, ports=args.ports,
                           tree=baseline if n == "balancer-base" else None) for n in names]
        try:
            try:
                start_all(systems)
            except RuntimeError as exc:
                progress(f"{tag} start failed: {exc}")
                for s in systems:
                    for w in workloads:
                        if runs_on(w, s.name):
                            cells.append({"round": rnd, "system": s.name, "workload": w.name, "ok": False,
                                          "crashed": not s.alive(), "error": str(exc).splitlines()[0]})
                continue
            if args.warmup > 0:
                for s in systems:
                    progress(f"{tag} {s.name} warm-up ...")
                    warm_up(s, args, workdir)
            for w in workloads:
                for s in systems:
                    if not runs_on(w, s.name):
                        continue
                    done += 1
                    progress(f"{tag} ({done}/{total}) {s.name} {w.name} ...")
                    if not s.alive():
                        progress(f"{tag} {s.name} is down; restarting it")
                        s.stop()
                        s.start()
                        s.wait_ready()
                    cell = run_cell_retrying(s, w, args, workdir, rnd, tag)
                    cell["note"] = s.note
                    cells.append(cell)
                    progress(f"{tag}     {describe(cell)}")
        finally:
            for s in systems:
                s.stop()
    env["elapsed_s"] = round(time.monotonic() - started, 1)
    env["extra_used_s"] = round(args.extra_used, 1)
    data = {"env": env, "workloads": [w.__dict__ for w in workloads], "systems": order,
            "descriptions": {n: SPECS[n].description for n in order}, "cells": cells}
    raw = RESULTS / "tmp" / f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    raw.write_text(json.dumps(data, indent=1))
    md, png = report.write(data, args.out)
    progress(f"bench: done in {env['elapsed_s'] / 60:.1f} min; table {md}, chart {png}, raw {raw}")
    if args.out.resolve() == RESULTS.resolve():
        for readme in (HERE / "README.md", HERE.parent / "README.md"):
            if report.update_readme(data, readme, RESULTS):
                progress(f"bench: updated the latest-results section of {readme}")
    for line in report.target_lines(data):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
