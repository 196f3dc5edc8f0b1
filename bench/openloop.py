"""Open-loop load generator: requests due at fixed or Poisson times, latency from each request's due time.

wrk is closed-loop (a slow answer delays the next request on that connection, so the slowness is hidden:
"coordinated omission"). Here request i is due at its scheduled time whatever happened before, and its latency
counts from then, so queueing anywhere (client included) counts. The generator is `bench/openloop.c`, built on
first use with the system's C compiler into bench/results/tmp/: it shares the cores with the servers it
measures, so it has to be cheap (one request costs the syscalls it needs) and on time (a timerfd fires at each
due time; uvloop's millisecond timers in the Python generator it replaced sent requests up to 1 ms late).

  python -m bench.openloop --port P --rate 300 --duration 10 --path /template            # fixed path, uniform
  python -m bench.openloop --port P --rate 700 --duration 10 --path /spin \\
      --mix 0.95:0.5,0.05:10 --poisson --close                                            # the tail-close cell
  python -m bench.openloop --port P --closed 16 --duration 5 --path /spin --mix 0.95:0.5,0.05:10 --close

Options (all passed to the binary):
  --rate R --duration S     requests per second for S seconds (open loop); --poisson: exponential gaps
                            (default: evenly spaced), drawn from --seed (default 12345), as the mix is
  --closed N --duration S   closed loop instead: N requests always in flight (a capacity measurement)
  --path P                  the request target; with --mix, P?ms=<ms> (a handler's CPU milliseconds)
  --mix SHARE:MS,...        e.g. 0.95:0.5,0.05:10; or lognormal:MEDIAN_MS:SIGMA (capped at 1000 ms)
  --short-ms X              requests of at most X ms are "short" (default: the shortest class; lognormal: the
                            95th percentile of the distribution)
  --close                   a new connection per request, with Connection: close
  --conns N                 keep-alive: connections opened before the run (default 0)
  --pool N                  keep-alive: idle connections kept (default 16); a request takes an idle one (the most
                            recently used, as nginx's upstream keepalive does; --fifo: the longest idle) and opens
                            a new one only when none is idle; past N idle, the one idle longest is closed
  --max-conns N             most connections open at once (default 256); past it requests wait for one
  --timeout S               per-request timeout (default 5)

Prints one line `BENCH_JSON {...}` on stdout: requests, sent, errors, latency_us and short_latency_us
({count, p50, p90, p99, p999, max, mean}), late_us (how late the generator itself sent requests).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "openloop.c"
BUILD_DIR = HERE / "results" / "tmp"


def binary() -> Path:
    """The built generator, compiled now if its source changed since the last build."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    path = BUILD_DIR / f"openloop-{digest}"
    if path.exists():
        return path
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("bench/openloop.c needs a C compiler (apt-get install gcc)")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}")
    built = subprocess.run([compiler, "-O2", "-Wall", "-o", str(partial), str(SOURCE), "-lm"], capture_output=True,
                           text=True)
    if built.returncode != 0:
        raise RuntimeError(f"building bench/openloop.c failed:\n{built.stderr[-2000:]}")
    os.replace(partial, path)  # whole or not at all, when two runs build at once
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return subprocess.run([str(binary()), *args]).returncode


if __name__ == "__main__":
    raise SystemExit(main())
