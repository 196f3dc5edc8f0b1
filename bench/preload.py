"""--preload measured: memory, rolling reload and crash recovery with a heavy app, against spawn mode and gunicorn.

    python -m bench.preload                  # 4 workers, 10,000 requests, 4 crashes, one round of each system
    python -m bench.preload --rounds 3 --systems balancer-preload balancer-spawn

The app (bench/heavy_app.py) takes 1 s to import and holds ~100 MB of small objects. For each system:
PSS and USS (from /proc/PID/smaps_rollup) of the workers, and of the processes that preloaded the app (the
zygote and its spare workers, or gunicorn's arbiter with --preload), just after every worker is up and after
10,000 keep-alive requests; the time from SIGHUP until every worker serves the new code (a version file the app reads at
import), with requests from a real client running throughout and every failed one counted; and the time
from kill -9 of a worker until its replacement answers. PASS/MISS lines for the issue-27 targets go to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from balancer.control_client import request as control_request

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SYSTEMS = ("balancer-preload", "balancer-spawn", "gunicorn-preload", "gunicorn")
RELOAD_LIMIT = 30.0  # seconds: past this a reload "never" serves the new code (gunicorn --preload's HUP)
BACKOFF = 0.1  # balancer's first respawn delay (balancer/backoff.py)


def command(system: str, port: int, workers: int, sock: str) -> list[str]:
    """The command line that runs system on port with the heavy app."""
    py = sys.executable
    if system.startswith("balancer"):
        return [py, "-m", "balancer", "--backend", "bench.heavy_app:app", "--app-dir", str(REPO), "--workers",
                str(workers), "--bind", f"{HOST}:{port}", "--metrics-bind", f"{HOST}:0", "--control-socket", sock,
                "--graceful-timeout", "10", *(["--preload"] if system == "balancer-preload" else [])]
    return [py, "-m", "gunicorn", "bench.heavy_app:app", "--bind", f"{HOST}:{port}", "--workers", str(workers),
            "--worker-class", "aiohttp.GunicornUVLoopWebWorker", "--log-level", "warning", "--graceful-timeout",
            "10", *(["--preload"] if system == "gunicorn-preload" else [])]


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def memory(pid: int) -> tuple[int, int]:
    """(PSS, USS) of pid in bytes."""
    pss = uss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "Pss":
                    pss = int(rest.split()[0]) * 1024
                elif key in ("Private_Clean", "Private_Dirty"):
                    uss += int(rest.split()[0]) * 1024
    except OSError:
        pass
    return pss, uss


class System:
    """One running system under test."""

    def __init__(self, name: str, port: int, workers: int, env: dict, tmp: str) -> None:
        self.name, self.port, self.workers = name, port, workers
        self.sock = os.path.join(tmp, f"{name}.sock")
        self.proc = subprocess.Popen(command(name, port, workers, self.sock), cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def status(self) -> dict | None:
        if not self.name.startswith("balancer"):
            return None
        try:
            return control_request(self.sock, {"cmd": "status", "interval": 0}, 5)
        except (OSError, ValueError):
            return None

    def holders(self) -> list[int]:
        """The processes that preloaded the app: the zygote and its spare, or gunicorn's arbiter with --preload."""
        if self.name == "gunicorn-preload":
            return [self.proc.pid]
        if self.name == "balancer-preload":
            workers = set(self.worker_pids())
            return [pid for pid in children(self.proc.pid) if pid not in workers]
        return []

    def worker_pids(self) -> list[int]:
        if self.name.startswith("balancer"):
            st = self.status()
            return [w["pid"] for w in st["workers"]] if st else []
        return children(self.proc.pid)

    def wait_up(self, timeout: float = 60.0) -> None:
        """Until N workers answer and their memory has stopped growing (each has imported and booted)."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if len(pids) == self.workers and probe(self.port) is not None:
                total = sum(memory(pid)[0] for pid in pids)
                if abs(total - last) < 2 ** 20:  # PSS moves a little as other processes map the same libraries
                    return
                last = total
            time.sleep(0.3)
        raise TimeoutError(f"{self.name}: {self.workers} workers not up within {timeout:g}s")

    def memory(self) -> dict:
        pids = self.worker_pids()
        figures = [memory(pid) for pid in pids]
        held = [memory(pid) for pid in self.holders()]
        return {"workers_pss": sum(p for p, _ in figures), "workers_uss": sum(u for _, u in figures),
                "holder_pss": sum(p for p, _ in held), "holder_uss": sum(u for _, u in held), "n": len(pids)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what this run started
        except ProcessLookupError:
            pass
        self.proc.wait()


# ---- the client ------------------------------------------------------------------------------

def probe(port: int, timeout: float = 2.0) -> tuple[str, int] | None:
    """One request on a new connection: (version, worker pid), None if it failed."""
    import http.client

    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        conn.request("GET", "/probe", headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status != 200:
            return None
        return resp.getheader("X-Version"), int(resp.getheader("X-Worker-Pid"))
    except (OSError, http.client.HTTPException, ValueError, TypeError):
        return None


async def _one(reader, writer, versions: list | None) -> bool:
    """One keep-alive request on an open connection; False if the server closed it. Appends (time, version)."""
    writer.write(b"GET /load HTTP/1.1\r\nHost: bench\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length, close, version, pid = 0, False, "", 0
    status = int(head.split(b" ", 2)[1])
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
        elif name.lower() == b"connection" and value.strip().lower() == b"close":
            close = True
        elif versions is not None and name.lower() == b"x-version":
            version = value.strip().decode()
        elif versions is not None and name.lower() == b"x-worker-pid":
            pid = int(value)
    if versions is not None:
        versions.append((time.monotonic(), version, pid))
    await reader.readexactly(length)
    if status != 200:
        raise ConnectionError(f"status {status}")
    return not close


async def client_load(port: int, conns: int, total: int | None, stop: asyncio.Event | None,
                      versions: list | None = None) -> dict:
    """Keep-alive requests from conns connections until total are done or stop is set; ok and failed counts."""
    counts = {"ok": 0, "failed": 0}

    async def connection() -> None:
        reader = writer = None
        while (total is None or counts["ok"] + counts["failed"] < total) and not (stop and stop.is_set()):
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                keep = await _one(reader, writer, versions)
                counts["ok"] += 1
            except (OSError, asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
                counts["failed"] += 1
                keep = False
            if not keep and writer is not None:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(conns)))
    return counts


# ---- the measurements ----------------------------------------------------------------------------

async def measure_reload(system: System, version_file: Path, version: str) -> tuple[float | None, dict]:
    """Seconds from SIGHUP until N workers have answered with the new code and none with the old; None: never.

    The load's own answers tell: 8 keep-alive clients reconnect as draining workers close their connections.
    """
    stop, versions = asyncio.Event(), []
    load = asyncio.ensure_future(client_load(system.port, 8, None, stop, versions))
    await asyncio.sleep(0.5)
    version_file.write_text(version)
    started = time.monotonic()
    os.kill(system.proc.pid, signal.SIGHUP)
    took = None
    while time.monotonic() - started < RELOAD_LIMIT:
        await asyncio.sleep(0.05)
        old = [at for at, v, _ in versions if v != version]
        last_old = max(old) if old else started
        first_by_pid: dict[int, float] = {}
        for at, v, pid in versions:
            if v == version:
                first_by_pid.setdefault(pid, at)
        if len(first_by_pid) >= system.workers and time.monotonic() - last_old >= 1.0:
            took = max(last_old, sorted(first_by_pid.values())[system.workers - 1]) - started
            break
    stop.set()
    return took, await load


async def measure_crash(system: System) -> tuple[float, dict]:
    """Seconds from kill -9 of a worker until a worker that was not there before answers."""
    before = set(system.worker_pids())
    st = system.status()
    if st is not None:  # balancer: the slots in turn, so each crash is its slot's first (back-off 0.1 s)
        ready = sorted((w["slot"], w["pid"]) for w in st["workers"] if w["state"] == "ready")
        victim = ready[measure_crash.count % len(ready)][1]
    else:
        victim = sorted(before)[0]
    measure_crash.count += 1
    stop = asyncio.Event()
    load = asyncio.ensure_future(client_load(system.port, 4, None, stop))
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    took = None
    while time.monotonic() - started < 30:
        got = await loop.run_in_executor(None, probe, system.port, 0.5)
        if got is not None and got[1] not in before:
            took = time.monotonic() - started
            break
    stop.set()
    counts = await load
    return took, counts


measure_crash.count = 0


async def run_system(name: str, port: int, args, tmp: str) -> dict:
    version_file = Path(tmp) / f"{name}-version"
    version_file.write_text("v1")
    env = {**os.environ, "HEAVY_APP_VERSION_FILE": str(version_file), "PYTHONPATH": str(REPO)}
    system = System(name, port, args.workers, env, tmp)
    out: dict = {"system": name}
    try:
        t0 = time.monotonic()
        system.wait_up()
        out["up_seconds"] = time.monotonic() - t0
        out["after_ready"] = system.memory()
        out["load"] = await client_load(port, 16, args.requests, None)
        out["after_load"] = system.memory()
        out["reload_seconds"], out["reload_load"] = await measure_reload(system, version_file, "v2")
        st = system.status()
        forks_before_crashes = len(st["zygote"]["boot_seconds"]["fork"]) if st and st.get("zygote") else 0
        system.wait_up()
        crashes, lost = [], 0
        measure_crash.count = 0
        for _ in range(args.crashes):
            took, counts = await measure_crash(system)
            crashes.append(took)
            lost += counts["failed"]
            system.wait_up()
            await asyncio.sleep(0.3)
        out["crash_seconds"] = crashes
        out["crash_failed"] = lost
        st = system.status()
        if st and st.get("zygote"):  # boot: N at once; reload: one after another; crashes: one alone
            forks = st["zygote"]["boot_seconds"]["fork"]
            out["fork_to_ready"] = {"boot": forks[:args.workers], "reload": forks[args.workers:forks_before_crashes],
                                    "crash": forks[forks_before_crashes:]}
    finally:
        system.stop()
    return out


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.0f}"


def report(results: list[dict]) -> None:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["system"], []).append(r)
    print(f"{'system':<18}{'when':<12}{'workers PSS':>12}{'USS':>8}{'holder PSS':>11}{'total PSS':>10}  MiB")
    for name, rs in by.items():
        for when in ("after_ready", "after_load"):
            m = {k: statistics.median(r[when][k] for r in rs) for k in rs[0][when]}
            print(f"{name:<18}{when:<12}{mib(m['workers_pss']):>12}{mib(m['workers_uss']):>8}"
                  f"{mib(m['holder_pss']):>11}{mib(m['workers_pss'] + m['holder_pss']):>10}")
    print(f"\n{'system':<18}{'reload s':>9}{'lost':>6}{'crash s (each)':>34}{'lost':>6}{'10k failed':>11}")
    for name, rs in by.items():
        for r in rs:
            reload = "never" if r["reload_seconds"] is None else f"{r['reload_seconds']:.2f}"
            crashes = " ".join("-" if c is None else f"{c:.2f}" for c in r["crash_seconds"])
            print(f"{name:<18}{reload:>9}{r['reload_load']['failed']:>6}{crashes:>34}{r['crash_failed']:>6}"
                  f"{r['load']['failed']:>11}")
    targets(by)


def targets(by: dict[str, list[dict]]) -> None:
    """The issue's targets, PASS or MISS with the numbers."""
    pre, spawn = by.get("balancer-preload"), by.get("balancer-spawn")
    if not pre:
        return

    def total(r, when):
        return r[when]["workers_pss"] + r[when]["holder_pss"]

    def line(ok: bool, text: str) -> None:
        print(f"{'PASS' if ok else 'MISS'} {text}")

    print()
    if spawn:
        for when in ("after_ready", "after_load"):
            ratio = statistics.median(total(r, when) for r in pre) / statistics.median(total(r, when) for r in spawn)
            line(ratio <= 0.5, f"PSS zygote + {pre[0][when]['n']} workers / spawned workers ({when}): {ratio:.2f}x "
                               "(target <= 0.5x)")
        reloads = [r["reload_seconds"] for r in pre], [r["reload_seconds"] for r in spawn]
        if None not in reloads[0] and None not in reloads[1]:
            ratio = statistics.median(reloads[0]) / statistics.median(reloads[1])
            line(ratio <= 0.4, f"rolling reload: {statistics.median(reloads[0]):.2f}s vs spawn mode "
                               f"{statistics.median(reloads[1]):.2f}s = {ratio:.2f}x (target <= 0.4x)")
    for when in ("boot", "reload", "crash"):
        boots = [t for r in pre for t in r.get("fork_to_ready", {}).get(when, ())]
        if boots:
            p50 = statistics.median(boots)
            line(p50 <= 0.025, f"spawn request -> READY p50, forks at {when}: {p50 * 1000:.1f} ms of {len(boots)} "
                               f"(max {max(boots) * 1000:.1f} ms; target <= 25 ms)")
    crashes = [c for r in pre for c in r["crash_seconds"] if c is not None]
    if crashes:
        p50 = statistics.median(crashes)
        line(p50 <= 0.1 + BACKOFF, f"kill -9 -> replacement serves, median of {len(crashes)}: {p50:.3f}s "
                                   f"(target <= 0.1 s + {BACKOFF:g} s back-off; worst {max(crashes):.3f}s)")
    lost = sum(r["reload_load"]["failed"] + r["load"]["failed"] for r in pre)
    line(lost == 0, f"requests lost across reloads and the 10k run: {lost} (target 0)")
    crash_lost = sum(r["crash_failed"] for r in pre)
    print(f"note: requests failed across kill -9s: {crash_lost} (in flight on the killed worker: unavoidable)")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.preload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--crashes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--port", type=int, default=27100)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    args = parser.parse_args()
    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="balancer-preload-") as tmp:
        for rnd in range(args.rounds):
            for i, name in enumerate(args.systems):  # interleaved: a busy spell hits every system alike
                print(f"[round {rnd + 1}/{args.rounds}] {name}", file=sys.stderr, flush=True)
                results.append(asyncio.run(run_system(name, args.port + i, args, tmp)))
    report(results)
    # The targets are for a quiet machine: a busy one (other benchmarks, test suites) slows every fork and boot.
    print("load average (1, 5, 15 min): before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f} on {} CPUs".format(
        *load_before, *os.getloadavg(), os.cpu_count()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
