"""Run one load cell: wrk (closed loop) or bench/openloop.c (fixed rate), each in its own process.

Returns a dict: requests, rps, errors (socket errors + non-2xx), latency_us {p50, p90, p99, p999, max},
loadgen_cpu_s, and for wrk also wrk_latency_us (wrk's own, coordinated-omission-"corrected" figures).

Latency from wrk: wrk 4 "corrects" its histogram after the run (stats_correct: for every sample longer
than the mean per-connection interval it adds synthetic samples value - k*interval). In the skewed mix that
turns each 50-100 ms sleep into dozens of synthetic samples, so its p90/p99 describe the sleeps, not the
server, and grow with throughput. bench/report.lua therefore dumps wrk's histogram and we undo the
correction here (it is exactly invertible: orig[m] = corrected[m] - corrected[m + interval] for
m > interval), reporting per-request latency. wrk's own figures are kept alongside in the raw JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MARK = "BENCH_JSON "


def _wait_rusage(proc: subprocess.Popen, timeout: float) -> float:
    """Wait for proc (killing it past timeout) and return the CPU seconds it used."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return ru.ru_utime + ru.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            _, status, ru = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            raise TimeoutError(f"load generator still running after {timeout:.0f}s; killed")
        time.sleep(0.02)


def _run(cmd: list[str], timeout: float, log: Path) -> tuple[dict, float]:
    """Run a load generator to completion; parse its BENCH_JSON line; return (result, its CPU seconds)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        cpu = _wait_rusage(proc, timeout)
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):]), cpu
    raise RuntimeError(f"{cmd[0]} exited {proc.returncode} without a result; see {log}:\n{text[-800:]}")


def _percentiles(hist: list[tuple[int, int]]) -> dict[str, int]:
    """p50/p90/p99/p99.9/max (us) of a sorted [(value_us, count)] histogram, wrk's rounding rule."""
    total = sum(c for _, c in hist)
    out = {}
    for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9)):
        rank = p / 100 * total
        seen, value = 0, 0
        for v, c in hist:
            seen += c
            value = v
            if seen >= rank:
                break
        out[name] = value
    out["max"] = hist[-1][0] if hist else 0
    out["mean"] = round(sum(v * c for v, c in hist) / total, 1) if total else 0.0
    return out


def uncorrect(hist: dict[int, int], interval: int) -> list[tuple[int, int]]:
    """Undo wrk's stats_correct(interval) on a {value_us: count} histogram."""
    if interval <= 0 or not hist:
        return sorted(hist.items())
    top = max(hist)
    orig = {}
    for m, c in hist.items():
        if m > interval:
            c -= hist.get(m + interval, 0) if m + interval <= top else 0
        if c > 0:
            orig[m] = c
    return sorted(orig.items())


def wrk_script(workdir: Path, name: str, body: str) -> tuple[Path, Path]:
    """Write a wrk script = body + bench/report.lua with its histogram path filled in."""
    hist = workdir / f"{name}.hist"
    report = (HERE / "report.lua").read_text().replace("@HISTOGRAM@", str(hist))
    script = workdir / f"{name}.lua"
    script.write_text(body + "\n" + report)
    return script, hist


def run_wrk(url: str, duration: int, connections: int, threads: int, workdir: Path, name: str,
            headers: tuple[str, ...] = (), lua: str = "", lua_args: tuple[str, ...] = (),
            timeout_s: int = 5) -> dict:
    """One closed-loop wrk run; latency per request (wrk's correction undone, see the module docstring)."""
    script, hist_path = wrk_script(workdir, name, lua)
    hist_path.unlink(missing_ok=True)
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--timeout", f"{timeout_s}s",
           "-s", str(script)]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    if lua_args:
        cmd += ["--", *lua_args]
    res, cpu = _run(cmd, duration + timeout_s + 30, workdir / f"{name}.out")
    corrected: dict[int, int] = {}
    for line in hist_path.read_text().splitlines():
        v, c = line.split()
        corrected[int(v)] = corrected.get(int(v), 0) + int(c)
    # wrk: interval = runtime_us / (complete / connections), integer arithmetic, only if the quotient > 0.
    per_conn = res["requests"] // connections
    interval = res["duration_us"] // per_conn if per_conn > 0 else 0
    raw = uncorrect(corrected, interval)
    e = res["errors"]
    return {
        "requests": res["requests"],
        "rps": res["requests"] / (res["duration_us"] / 1e6) if res["duration_us"] else 0.0,
        "errors": {"socket": e["connect"] + e["read"] + e["write"] + e["timeout"], "non2xx": e["status"],
                   **e},
        "latency_us": _percentiles(raw),
        "wrk_latency_us": res["latency_us"],
        "recorded": sum(c for _, c in raw),
        "loadgen_cpu_s": cpu,
        "duration_s": res["duration_us"] / 1e6,
    }


def run_openloop(host: str, port: int, path: str, rate: float, duration: float, workdir: Path, name: str,
                 conns: int = 32, max_conns: int = 256, timeout_s: float = 5.0, *, pool: int = 0, fifo: bool = True,
                 mix: str = "", poisson: bool = False, close: bool = False, closed: int = 0, seed: int = 12345) -> dict:
    """One run of the open-loop generator (bench/openloop.c) in its own process: rate req/s for duration s.

    closed=N runs it closed-loop instead (N requests always in flight), to measure a capacity. pool: idle
    keep-alive connections kept (default max_conns); fifo: reuse the one idle longest, else the most recent.
    """
    from bench import openloop

    cmd = [str(openloop.binary()), "--host", host, "--port", str(port), "--path", path, "--duration", str(duration),
           "--conns", str(0 if close else conns), "--max-conns", str(max_conns), "--pool", str(pool or max_conns),
           "--timeout", str(timeout_s), "--seed", str(seed)]
    cmd += ["--closed", str(closed)] if closed else ["--rate", str(rate)]
    cmd += ["--mix", mix] if mix else []
    cmd += ["--poisson"] if poisson else []
    cmd += ["--close"] if close else []
    cmd += ["--fifo"] if fifo else []
    res, cpu = _run(cmd, duration + timeout_s + 30, workdir / f"{name}.out")
    e = res["errors"]
    short = {"short_latency_us": res["short_latency_us"], "short_ms": res["short_ms"]} if mix else {}
    return {
        "requests": res["requests"],
        "rps": res["requests"] / (res["duration_us"] / 1e6) if res["duration_us"] else 0.0,
        "errors": {"socket": e["connect"] + e["read"] + e["write"] + e["timeout"], "non2xx": e["status"], **e},
        "latency_us": res["latency_us"],
        **short,
        "late_us": res["late_us"],
        "sent": res["sent"], "rate": rate, "closed": closed, "connections": res["connections"],
        "max_late_us": res["max_late_us"],
        "loadgen_cpu_s": cpu,
        "duration_s": res["duration_us"] / 1e6,
    }
