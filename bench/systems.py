"""The systems under test: how to start each one, know it is ready, account its processes, stop it.

Every system serves bench.apps (or its Node.js equivalent) on 127.0.0.1:<a free port, by default in
18000-18999 (--ports)>, runs in its own process group (start_new_session=True) and is stopped by signalling that
group only. `balancer-base` is balancer at another git revision (--baseline, default main), run from a
worktree of that revision with its own C module, serving this checkout's bench Application.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procstat import group_cpu

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
PORTS = range(18000, 19000)
BASELINE_TREE = "balancer-base"  # the worktree of the --baseline revision, under the run's work directory


@dataclass(frozen=True)
class Spec:
    """A kind of system: a name, what its first process is called, and its command line."""
    name: str
    leader: str                 # role of the process we start: master, arbiter, primary, launcher, server
    description: str
    ready_line: str = ""        # a log line that means "serving" (besides answering from every worker)
    tls: bool = False           # serves https with the run's certificate (bench/tls.py); runs the https workloads

    def command(self, port: int, workers: int, tls_files: tuple[Path, Path] | None = None) -> list[str]:
        py = sys.executable
        tls = ["--certfile", str(tls_files[0]), "--keyfile", str(tls_files[1])] if self.tls else []
        if self.name in ("balancer", "balancer-https", "balancer-bare", "balancer-base", "balancer-sticky"):
            # Like with like: the Application every Python peer serves, and balancer's defaults (metrics on,
            # on a port of its own so that runs side by side do not collide). balancer-bare is an extra row:
            # the bare handler (no router) and no metrics endpoint, never the basis of a target.
            app, metrics = ("handler", "none") if self.name == "balancer-bare" else ("create_app", "127.0.0.1:0")
            return [py, "-m", "balancer", "--backend", f"bench.apps:{app}", "--app-dir", str(REPO),
                    "--workers", str(workers), "--bind", f"{HOST}:{port}", "--metrics-bind", metrics,
                    "--control-socket", str(REPO / "bench" / "results" / "tmp" / f"balancer-{port}.sock"), *tls,
                    *(["--no-keepalive-rebalance"] if self.name == "balancer-sticky" else [])]
        if self.name == "single":
            return [py, "-m", "bench.aiohttp_server", "--host", HOST, "--port", str(port)]
        if self.name == "reuseport":
            return [py, "-m", "bench.aiohttp_server", "--host", HOST, "--port", str(port),
                    "--reuseport", str(workers)]
        if self.name in ("gunicorn", "gunicorn-uvloop", "gunicorn-https"):
            worker = "aiohttp.GunicornWebWorker" if self.name == "gunicorn" else "aiohttp.GunicornUVLoopWebWorker"
            return [py, "-m", "gunicorn", "bench.gunicorn_app:app", "--bind", f"{HOST}:{port}",
                    "--workers", str(workers), "--worker-class", worker, "--log-level", "warning", *tls]
        if self.name == "node-cluster":
            return ["node", str(HERE / "node_cluster.js"), "--host", HOST, "--port", str(port),
                    "--workers", str(workers)]
        raise ValueError(self.name)

    def worker_count(self, workers: int) -> int:
        return 1 if self.name == "single" else workers


SPECS = {s.name: s for s in [
    Spec("balancer", "master", "balancer on its defaults (metrics on), N aiohttp workers (uvloop) serving the "
         "same Application as every Python peer, fds handed over SCM_RIGHTS", ready_line="workers serving on"),
    Spec("balancer-bare", "master", "extra row, not a target basis: balancer serving the bare handler (no "
         "router) with --metrics-bind none", ready_line="workers serving on"),
    Spec("balancer-sticky", "master", "extra row, not a target basis: balancer on its defaults but "
         "--no-keepalive-rebalance (a kept-alive connection stays on its worker)", ready_line="workers serving on"),
    Spec("balancer-base", "master", "balancer at the --baseline revision (default main: least-connections "
         "dispatch), run like balancer", ready_line="workers serving on"),
    Spec("single", "server", "one aiohttp process (uvloop), web.run_app"),
    Spec("reuseport", "launcher", "N aiohttp processes (uvloop) on one port with SO_REUSEPORT"),
    Spec("gunicorn", "arbiter", "gunicorn, N x aiohttp.GunicornWebWorker (asyncio loop)"),
    Spec("gunicorn-uvloop", "arbiter", "gunicorn, N x aiohttp.GunicornUVLoopWebWorker"),
    Spec("node-cluster", "primary", "Node.js cluster (http, default round-robin scheduling), N workers",
         ready_line="workers serving on"),
    Spec("balancer-https", "master", "balancer on its defaults (metrics on) serving the same Application as "
         "gunicorn, with --certfile/--keyfile: TLS handshakes in the workers",
         ready_line="workers serving on", tls=True),
    Spec("gunicorn-https", "arbiter", "gunicorn-uvloop as above with --certfile/--keyfile", tls=True),
]}


def parse_ports(text: str) -> range:
    """'LO-HI' -> range(LO, HI + 1)."""
    lo, _, hi = text.partition("-")
    ports = range(int(lo), int(hi or lo) + 1)
    if not ports or ports.start < 1 or ports.stop > 65536:
        raise ValueError(f"bad port range {text!r}")
    return ports


def default_ports() -> range:
    """$BENCH_PORTS ('LO-HI') when set, else PORTS: machines shared by several runs give each its own range."""
    text = os.environ.get("BENCH_PORTS", "")
    return parse_ports(text) if text else PORTS


def free_port(avoid=(), ports: range = PORTS) -> int:
    """A port in ports nobody is listening on right now (checked by binding it), and not in avoid.

    avoid: ports already given to systems that are still starting (not bound yet, so they look free).
    """
    for port in random.sample(ports, len(ports)):
        if port in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def checkout(rev: str, tree: Path) -> str:
    """A detached worktree of rev at tree, with its C module built in place; returns rev's short hash.

    Started with cwd and PYTHONPATH = tree, `python -m balancer` and its workers (`-m balancer_workers`, a link
    to workers/ made here) import that revision's code, not the installed one.
    """
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(tree), sha], cwd=REPO, check=True,
                       capture_output=True)
        if not (tree / "balancer_workers").exists():
            (tree / "balancer_workers").symlink_to("workers")
        if (tree / "setup.py").exists():  # revisions with the C accelerator: build it beside the code
            built = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                                   capture_output=True, text=True)
            if built.returncode != 0:
                remove_checkout(tree)
                raise RuntimeError(f"building {rev}'s C module failed:\n{built.stderr[-1500:]}")
    return sha


def remove_checkout(tree: Path) -> None:
    """Remove a worktree checkout() made."""
    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)


def http_get(port: int, path: str = "/", timeout: float = 1.0,
             tls: ssl.SSLContext | None = None) -> tuple[int, dict[str, str]]:
    """One GET on a fresh connection (TLS with tls): (status, lower-cased headers)."""
    with socket.create_connection((HOST, port), timeout=timeout) as raw, \
            (tls.wrap_socket(raw, server_hostname=HOST) if tls else raw) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    if not head or len(head[0].split()) < 2:
        raise ConnectionError("no HTTP response")
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(head[0].split()[1]), headers


@dataclass
class Running:
    """One started system."""
    spec: Spec
    workers: int
    logdir: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    log: Path | None = None
    note: str = ""
    worker_pids: set[int] = field(default_factory=set)
    tls_files: tuple[Path, Path] | None = None  # (certificate, key) for a spec with tls
    ports: range = PORTS
    tree: Path | None = None  # balancer-base: the worktree of the revision it runs

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the leader's pid is the group id

    def start(self, avoid=()) -> None:
        self.port = free_port(avoid, self.ports)
        self.log = self.logdir / f"{self.name}-{self.port}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.tree is not None:  # another revision's balancer, serving this checkout's Application
            env["PYTHONPATH"] = str(self.tree)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.spec.command(self.port, self.workers, self.tls_files), stdout=out,
                                         stderr=subprocess.STDOUT, cwd=self.tree or REPO, start_new_session=True,
                                         env=env)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Ready = the ready log line (if the system has one) and an answer from each of its workers.

        Kernel-balanced systems may keep answering from the same worker for a while; after 3 s of answers
        we settle for the worker processes existing and note it."""
        deadline = time.monotonic() + timeout
        want = self.spec.worker_count(self.workers)
        first_answer = None
        tls = ssl.create_default_context(cafile=str(self.tls_files[0])) if self.spec.tls else None
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting:\n"
                                   + self.log_tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s (answers from "
                                   f"{len(self.worker_pids)}/{want} workers):\n" + self.log_tail())
            if self.spec.ready_line and self.spec.ready_line not in self.log_tail(100_000):
                time.sleep(0.05)
                continue
            try:
                status, headers = http_get(self.port, tls=tls)
            except OSError:  # ssl.SSLError too
                time.sleep(0.05)
                continue
            if status == 200 and headers.get("x-worker-pid", "").isdigit():
                self.worker_pids.add(int(headers["x-worker-pid"]))
                first_answer = first_answer or time.monotonic()
            if len(self.worker_pids) >= want:
                return
            if first_answer and time.monotonic() - first_answer > 3.0:
                if len(self.processes()) >= want + (0 if self.name == "single" else 1):
                    self.note = f"only {len(self.worker_pids)}/{want} workers answered the readiness probe"
                    return
            time.sleep(0.01)

    def processes(self) -> dict[int, tuple[float, str]]:
        """CPU seconds so far of every process in the system's group."""
        return group_cpu(self.pgid)

    def role(self, pid: int) -> str:
        return self.spec.leader if pid == self.pgid else "worker"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, wait for the leader, SIGKILL the group if anything is left."""
        if self.proc is not None:
            stop_group(self.proc, timeout)


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group proc leads (start_new_session), wait for it, SIGKILL what is left."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 2.0
    while group_cpu(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_cpu(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(5)
