"""Start the real `balancer` CLI in its own process group and talk to it; shared by integration tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
SERVING = re.compile(r"workers serving on (\S+?)[, ]")
METRICS = re.compile(r"metrics on http://(\S+?)/metrics")


class Balancer:
    """A running `balancer` master: its pid, its log lines, the address it serves."""

    def __init__(self, *args: str, ready: bool = True, timeout: float = 30.0, env: dict | None = None,
                 preexec=None) -> None:
        cmd = [sys.executable, "-m", "balancer", "--bind", "127.0.0.1:0", "--metrics-bind", "127.0.0.1:0",
               "--app-dir", str(HERE / "apps"), *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, **(env or {})}, preexec_fn=preexec,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = ""
        self.metrics_address = ""
        if ready:
            self.wait_ready(timeout)

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        """Block until a log line (from index start on) matches pattern; return the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    if m:
                        return m
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no log line matching {pattern!r} in {timeout}s; log:\n" + self.log())
                self._cond.wait(min(left, 0.5))

    def mark(self) -> int:
        """The index of the next log line, to wait for lines after this point."""
        with self._cond:
            return len(self.lines)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the 'serving on' line and record the bound addresses."""
        self.address = self.wait_for(SERVING.pattern, timeout).group(1)
        for line in self.lines:
            m = METRICS.search(line)
            if m:
                self.metrics_address = m.group(1)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def worker_pids(self) -> list[int]:
        """Pids of the master's live children (its workers), from /proc."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def stop(self) -> None:
        """Tear down: SIGTERM, then SIGKILL the whole process group we created, by its id."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # our own session: only processes this test started
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._reader.join(5)

    def __enter__(self) -> "Balancer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def fd_count(pid: int) -> int:
    """Open fds of pid."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def unix_request(path: str, target: str = "/", headers: dict | None = None) -> bytes:
    """One raw GET over a unix socket, Connection: close; the whole answer as sent."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: sock\r\nConnection: close\r\n{lines}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data
