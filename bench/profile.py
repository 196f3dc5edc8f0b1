"""Where a worker's CPU goes per keep-alive request, side by side: py-spy samples priced in microseconds.

  python -m bench.profile                                   # balancer vs gunicorn-uvloop, 10 s, hello keep-alive
  python -m bench.profile --systems balancer,reuseport --duration 15 --path /template

Each system serves bench.apps (as in the full bench) with 2 workers. wrk drives keep-alive load while py-spy
samples every worker (--nonblocking, so that sampling does not stop the worker). A sample is charged to the innermost frame that names a component
(see COMPONENTS); the worker CPU per request (from /proc, over the same window) is then split in proportion.
py-spy samples without --native (it cannot read native stacks without pausing the worker), so time in C
(the HTTP parser, multidict, send()) is charged to the Python frame that called it; idle samples (epoll_wait)
are left out.
The result is a table of microseconds per request by component: what each system spends, and where.
Nothing here asserts a speed; py-spy's own overhead is in the figures of every system alike.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import loadgen
from bench.systems import HOST, SPECS, Running

# (component, substrings of a frame's file or function); the first component found from the innermost frame
# outwards gets the sample. Order matters only within one frame.
COMPONENTS = [
    # py-spy without --native charges C code to the Python frame that called it: this one is the send() of
    # each response, where loopback TCP does the receiver's work too.
    ("socket send (transport.write)", ("StreamWriter._writelines", "StreamWriter._write ")),
    ("balancer: request observation", ("balancer_workers/observe.py", "workers/observe.py",
                                       "balancer_workers/stats.py", "workers/stats.py")),
    ("balancer: proxy headers", ("forwarded.py", "trusted.py")),
    ("the app's handler", ("bench/apps.py", "examples/hello.py", "examples/template.py", "jinja2")),
    ("balancer: limits, connections, heartbeat",
     ("balancer_workers/", "workers/limits.py", "workers/connections.py", "workers/heartbeat.py",
      "workers/channel.py", "workers/worker.py", "balancer/")),
    ("aiohttp routing", ("web_urldispatcher.py", "web_app.py")),
    ("aiohttp response", ("web_response.py", "http_writer.py", "helpers.py", "_http_writer", "cookies")),
    ("aiohttp request", ("web_request.py", "_http_parser", "http_parser.py", "multidict", "yarl", "streams.py")),
    ("aiohttp protocol loop", ("web_protocol.py", "web_server.py", "base_protocol.py")),
    # A stack whose innermost Python frame runs the loop: uvloop's own C work (reading sockets, callbacks).
    ("event loop (uvloop, in C)", ("asyncio/", "uvloop", "GunicornWebWorker.run")),
    ("gunicorn", ("gunicorn/",)),
]
OTHER = "other"


def component(stack: list[str]) -> str:
    """The component of one sampled stack (outermost frame first)."""
    for frame in reversed(stack):
        for name, needles in COMPONENTS:
            if any(n in frame for n in needles):
                return name
    return OTHER


def read_raw(path: Path) -> collections.Counter:
    """py-spy's raw (collapsed) output: 'frame;frame;... count' lines -> samples per component."""
    out: collections.Counter = collections.Counter()
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out[component(stack.split(";"))] += int(count)
    return out


def profile(name: str, args, workdir: Path) -> dict:
    """Run one system under wrk while py-spy samples its workers; per-component us per request."""
    system = Running(SPECS[name], args.workers, workdir)
    system.start()
    try:
        system.wait_ready()
        loadgen.run_wrk(f"http://{HOST}:{system.port}{args.path}", 2, args.connections, 1, workdir, f"warm-{name}")
        workers = [pid for pid in system.processes() if system.role(pid) == "worker" or name == "single"]
        before = system.processes()
        spies = []
        for pid in workers:
            raw = workdir / f"{name}-{pid}.txt"
            spies.append((raw, subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--duration", str(int(args.duration)), "--rate",
                 str(args.rate), "--nonblocking", "--format", "raw", "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        res = loadgen.run_wrk(f"http://{HOST}:{system.port}{args.path}", int(args.duration), args.connections, 1,
                              workdir, f"prof-{name}")
        for _, spy in spies:
            spy.wait(timeout=args.duration + 30)
        after = system.processes()
    finally:
        system.stop()
    cpu_s = sum(after[p][0] - before[p][0] for p in workers if p in after and p in before)
    samples: collections.Counter = collections.Counter()
    for raw, _ in spies:
        samples.update(read_raw(raw))
    busy = dict(samples)
    total = sum(busy.values()) or 1
    us_per_request = cpu_s / max(res["requests"], 1) * 1e6
    return {"system": name, "rps": res["rps"], "us_per_request": us_per_request,
            "components": {k: us_per_request * v / total for k, v in busy.items()}, "samples": total}


def table(results: list[dict]) -> str:
    names = [c for c, _ in COMPONENTS] + [OTHER]
    shown = [c for c in names if any(r["components"].get(c, 0) >= 0.05 for r in results)]
    lines = ["| component (us of worker CPU per request) | " + " | ".join(r["system"] for r in results) + " |",
             "|---|" + "---|" * len(results)]
    for c in shown:
        lines.append(f"| {c} | " + " | ".join(f"{r['components'].get(c, 0):.1f}" for r in results) + " |")
    lines.append("| **total** (from /proc) | " + " | ".join(f"**{r['us_per_request']:.1f}**" for r in results)
                 + " |")
    lines.append("| req/s during the profile | " + " | ".join(f"{r['rps']:,.0f}" for r in results) + " |")
    lines.append("| busy samples | " + " | ".join(str(r["samples"]) for r in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="balancer,gunicorn-uvloop")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--path", default="/")
    opts = parser.parse_args(argv)
    for tool in ("wrk", "py-spy"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed ({'apt-get install wrk' if tool == 'wrk' else 'pip install py-spy'})")
    names = [s.strip() for s in opts.systems.split(",") if s.strip()]
    unknown = [n for n in names if n not in SPECS or SPECS[n].tls or n == "node-cluster"]
    if unknown:
        parser.error(f"cannot profile {unknown}: pick Python systems of {[n for n in SPECS if not SPECS[n].tls]}")
    workdir = Path(tempfile.mkdtemp(prefix="balancer-profile-"))
    try:
        results = [profile(n, opts, workdir) for n in names]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"py-spy --nonblocking, {opts.rate} Hz, wrk -t1 -c{opts.connections} -d{opts.duration:g}s keep-alive "
          f"{opts.path}, {opts.workers} workers per system:\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
