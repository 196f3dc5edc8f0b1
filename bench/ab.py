"""A/B of balancer revisions: what one change bought, measured side by side in one run.

  python -m bench.ab e464b74 HEAD                 # Connection: close, 6 rounds x 5 s, 2 workers
  python -m bench.ab e464b74 cf5bc26 HEAD --mode keepalive --rounds 4
  python -m bench.ab 'HEAD --accept-coalesce 0' 'HEAD BALANCER_NO_EXTENSIONS=1' HEAD   # options, environment

Each revision is checked out in a temporary git worktree and started as its own balancer (own process group,
own free port in 18000-18999 or --ports, the bench's Application `bench.apps:create_app` as every system in the
full bench serves it, and balancer's defaults: metrics on, on a free port). Rounds alternate the order of the
revisions; each cell is one wrk run. Reported per revision, as medians over rounds: req/s (and the ratio to
the first revision), the master's CPU per new connection, and the workers' CPU per request, both from
/proc/<pid>/schedstat (nanoseconds, not clock ticks). Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import loadgen
from bench.procstat import group_cpu
from bench.systems import (HOST, PORTS, checkout, default_ports, free_port, http_get, parse_ports, remove_checkout,
                           stop_group)

REPO = Path(__file__).resolve().parent.parent


def cpu_ns(pid: int) -> int:
    """CPU time pid has used, in ns (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def parse_spec(spec: str) -> tuple[str, dict[str, str], list[str]]:
    """'REV [NAME=VALUE ...] [--balancer-option ...]' -> (rev, environment, balancer arguments)."""
    tokens = spec.split()
    if not tokens or tokens[0].startswith("-") or "=" in tokens[0]:
        raise ValueError(f"{spec!r}: a spec starts with a git revision")
    env = dict(t.split("=", 1) for t in tokens[1:] if "=" in t and not t.startswith("-"))
    args = [t for t in tokens[1:] if not ("=" in t and not t.startswith("-"))]
    return tokens[0], env, args


def handoff_of(log: Path, wait: float = 10.0) -> str:
    """C or Python, from the serving line of a balancer's log (a worker answers before that line is written)."""
    deadline = time.monotonic() + wait
    while True:
        text = log.read_text()
        found = re.search(r"hand-off in (\w+)", text)
        if found:
            return found.group(1)
        if " workers serving on " in text or time.monotonic() > deadline:
            return "Python"  # revisions before 2a2b00c do not say, and have no C module
        time.sleep(0.05)


class Build:
    """One spec (a revision, maybe with environment and options): its worktree and its running balancer."""

    def __init__(self, spec: str, index: int, root: Path, workers: int, backend: str) -> None:
        rev, self.env, self.args = parse_spec(spec)
        self.workers = workers
        self.backend = backend
        sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout.strip()
        extra = " ".join(spec.split()[1:])
        self.label = (rev if rev == sha else f"{rev} ({sha})") + (f" {extra}" if extra else "")
        self.tree = root / f"tree-{sha}"
        checkout(sha, self.tree)  # specs of one revision share its worktree
        self.port = 0
        self.ports = PORTS
        self.proc: subprocess.Popen | None = None
        self.log = root / f"balancer-{index}-{sha}.log"
        self.runs: list[tuple[float, float, float, int]] = []  # (req/s, master us/conn, workers us/req, errors)

    def start(self, avoid=()) -> None:
        self.port = free_port(avoid, self.ports)
        cmd = [sys.executable, "-m", "balancer", "--backend", self.backend,
               "--workers", str(self.workers), "--bind", f"{HOST}:{self.port}", "--metrics-bind", f"{HOST}:0",
               "--control-socket", str(self.log.with_suffix(".sock")), *self.args]
        # cwd and PYTHONPATH = the worktree: `-m balancer` and the workers import that revision's code.
        env = {**os.environ, "PYTHONPATH": str(self.tree), **self.env}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.tree, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every worker has answered (X-Worker-Pid)."""
        deadline = time.monotonic() + timeout
        pids: set[str] = set()
        while len(pids) < self.workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} did not start; see {self.log}")
            try:
                status, headers = http_get(self.port)
                if status == 200:
                    pids.add(headers.get("x-worker-pid", ""))
            except OSError:
                time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        return [pid for pid in group_cpu(self.proc.pid) if pid != self.proc.pid]

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, 15)


def measure(build: Build, opts, workdir: Path, tag: str) -> None:
    """One wrk cell against build, with the CPU its master and workers used during it."""
    workers = build.worker_pids()
    m0, w0 = cpu_ns(build.proc.pid), sum(cpu_ns(p) for p in workers)
    headers = ("Connection: close",) if opts.mode == "close" else ()
    res = loadgen.run_wrk(f"http://{HOST}:{build.port}/", int(opts.duration), opts.connections, 1, workdir, tag,
                          headers=headers)
    m1, w1 = cpu_ns(build.proc.pid), sum(cpu_ns(p) for p in workers)
    n = max(res["requests"], 1)
    errors = res["errors"]["socket"] + res["errors"]["non2xx"]
    build.runs.append((res["rps"], (m1 - m0) / 1e3 / n, (w1 - w0) / 1e3 / n, errors))


def report(builds: list[Build], opts) -> str:
    """A markdown table of medians."""
    base = statistics.median(r[0] for r in builds[0].runs)
    lines = [f"A/B, `wrk -t1 -c{opts.connections} -d{opts.duration:g}s`"
             f"{' -H Connection: close' if opts.mode == 'close' else ' (keep-alive)'}, {opts.workers} workers, "
             f"{opts.rounds} interleaved rounds, medians:", "",
             "| revision | req/s | vs first | master us/conn | workers us/req | errors | runs (req/s) |",
             "|---|---|---|---|---|---|---|"]
    for b in builds:
        rps = statistics.median(r[0] for r in b.runs)
        master = statistics.median(r[1] for r in b.runs)
        workers = statistics.median(r[2] for r in b.runs)
        lines.append(f"| {b.label} | {rps:,.0f} | {rps / base:.3f}x | {master:.1f} | {workers:.1f} | "
                     f"{sum(r[3] for r in b.runs)} | {', '.join(f'{r[0]:,.0f}' for r in b.runs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", metavar="SPEC",
                        help="'REV [NAME=VALUE ...] [--option ...]': a git revision, maybe with environment and "
                             "balancer options, as one argument (the first is the baseline)")
    parser.add_argument("--mode", choices=("close", "keepalive"), default="close")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--ports", type=parse_ports, default=default_ports(), metavar="LO-HI",
                        help="where each balancer's free port is found (default $BENCH_PORTS, else 18000-18999)")
    parser.add_argument("--backend", default="bench.apps:create_app",
                        help="MODULE:ATTR every revision serves (default: the full bench's Application)")
    opts = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    root = Path(tempfile.mkdtemp(prefix="balancer-ab-"))
    try:
        for spec in opts.specs:
            parse_spec(spec)
    except ValueError as exc:
        parser.error(str(exc))
    builds: list[Build] = []
    try:
        for i, spec in enumerate(opts.specs):  # one at a time: a failure still removes the worktrees made so far
            builds.append(Build(spec, i, root, opts.workers, opts.backend))
            builds[-1].ports = opts.ports
        for i, b in enumerate(builds):
            b.start(avoid={other.port for other in builds[:i]})  # none has bound its port yet
        for b in builds:
            b.wait_ready()
            print(f"{b.label}: hand-off in {handoff_of(b.log)}", file=sys.stderr, flush=True)
        for i in range(opts.rounds):
            order = builds if i % 2 == 0 else builds[::-1]
            for b in order:
                measure(b, opts, root, f"ab-{i}-{b.port}")
                r = b.runs[-1]
                print(f"[round {i + 1}/{opts.rounds}] {b.label}: {r[0]:,.0f} req/s, master {r[1]:.1f} us/conn, "
                      f"workers {r[2]:.1f} us/req", file=sys.stderr, flush=True)
    finally:
        for b in builds:
            b.stop()
        for b in builds:
            remove_checkout(b.tree)
        shutil.rmtree(root, ignore_errors=True)
    print(report(builds, opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
