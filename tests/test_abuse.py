"""Abuse, on real processes: slowloris, malformed HTTP, body limits, running out of fds, 100k connections."""

from __future__ import annotations

import asyncio
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import time

import aiohttp
import pytest

from balancer.metrics import read_proc
from tests.harness import Balancer, fd_count
from tests.test_integration import APP, _tcp_sockets
from tests.test_metrics import http_get, samples, slot_pid, wait_until

pytestmark = pytest.mark.timeout(180)
GOOD = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def metric_sum(b: Balancer, name: str, **labels) -> float:
    """Sum of every sample called name whose labels include labels, from the live endpoint."""
    status, _, text = http_get(f"http://{b.metrics_address}/metrics")
    assert status == 200
    want = set(labels.items())
    return sum(v for (n, lab), v in samples(text).items() if n == name and want <= set(lab))


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a new connection; return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except OSError:
            pass  # the server may close on the first bad byte; what it answered is still readable
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP response, 0 for no response at all."""
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0


def starve_fds(pid: int) -> tuple[int, int]:
    """Leave pid no fd to open (existing ones keep working); returns the limits to restore."""
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # The limit bounds fd *numbers*, and a process's table has gaps: only a limit at the first free
    # number is sure to refuse the next fd. 3 is below every fd anything here opens.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, limits[1]))
    return limits


# ---- slowloris ------------------------------------------------------------------------------------

async def slowloris(port: int, clients: int, good_url: str, give_up: float) -> tuple[list, list]:
    """clients connections dribble headers at one byte a second; meanwhile ordinary requests run.

    Returns (seconds each slow connection lived before the server closed it, None if it never did;
    statuses of the ordinary requests).
    """
    async def slow() -> float | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        header = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 1000

        async def dribble() -> None:
            for byte in header:
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except OSError:
                    return
                await asyncio.sleep(1.0)  # the attack's pace, not a synchronisation

        dribbler = asyncio.create_task(dribble())
        try:
            got = await asyncio.wait_for(reader.read(), give_up)  # EOF (or a reset) is the server's cut
            lived = time.monotonic() - start
            assert not got.startswith(b"HTTP/1.1 200"), got
            return lived
        except ConnectionResetError:
            return time.monotonic() - start
        except asyncio.TimeoutError:
            return None
        finally:
            dribbler.cancel()
            writer.close()

    async def ordinary() -> list[int]:
        statuses = []
        conn = aiohttp.TCPConnector(force_close=True)  # a new connection each: through the dispatcher
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=5)) as s:
            for _ in range(20):
                async with s.get(good_url) as r:
                    statuses.append(r.status)
        return statuses

    slow_tasks = [asyncio.create_task(slow()) for _ in range(clients)]
    await asyncio.sleep(0)  # let the slow connections open first
    statuses = await ordinary()
    return await asyncio.gather(*slow_tasks), statuses


def test_slowloris_is_cut_off_at_the_header_deadline_while_others_are_served():
    deadline, clients = 3.0, 200
    with Balancer("--workers", "2", "--header-timeout", str(deadline), *APP) as b:
        pids = set(b.worker_pids())
        lived, statuses = asyncio.run(slowloris(b.port, clients, b.url + "/", give_up=deadline + 10))
        assert statuses == [200] * 20, statuses
        cut = [t for t in lived if t is not None]
        print(f"slowloris: {len(cut)}/{clients} cut off after {min(cut):.2f}-{max(cut):.2f} s "
              f"(deadline {deadline} s)")
        assert len(cut) == clients, f"{clients - len(cut)} slow connections were never closed"
        # uvloop reads its clock once per loop iteration, so a deadline may start a little early
        assert min(cut) >= deadline - 0.25, "a slow client was cut off before its deadline"
        assert max(cut) <= deadline + 2.0, "a slow client outlived its deadline by more than 2 s"
        assert set(b.worker_pids()) == pids
        wait_until(lambda: metric_sum(b, "balancer_worker_header_timeouts_total") == clients, 10,
                   "every cut-off to be counted")


# ---- malformed requests ---------------------------------------------------------------------------

POST = b"POST /echo HTTP/1.1\r\nHost: t\r\n"
MALFORMED = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "request line without target": b"GET\r\n\r\n",
    "unknown HTTP version": b"GET / HTTP/9.9\r\nHost: t\r\n\r\n",
    "space in target": b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n",
    "duplicate Content-Length": POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "Content-Length and Transfer-Encoding": POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "signed Content-Length": POST + b"Content-Length: +5\r\n\r\nhello",
    "hex Content-Length": POST + b"Content-Length: 0x5\r\n\r\nhello",
    "chunk size not hex": POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk size overflow": POST + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "negative chunk size": POST + b"Transfer-Encoding: chunked\r\n\r\n-1\r\nhello\r\n0\r\n\r\n",
    "chunk without its CRLF": POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    "chunked not the final coding": POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "oversized header": b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    "oversized request line": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
    "20000 headers": b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20000)) + b"\r\n",
    "NUL in a header value": b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",
    "NUL in the target": b"GET /\x00 HTTP/1.1\r\nHost: t\r\n\r\n",
    "bare LF line ends": b"GET / HTTP/1.1\nHost: t\n\n",
    "bare CR line ends": b"GET / HTTP/1.1\rHost: t\r\r",
    "space before the colon": b"GET / HTTP/1.1\r\nHost : t\r\n\r\n",
    "obsolete line folding": b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n",
    "bad header name": b"GET / HTTP/1.1\r\nHost: t\r\nX(A): b\r\n\r\n",
    "header without a colon": b"GET / HTTP/1.1\r\nHost: t\r\nJunk\r\n\r\n",
    "binary noise": bytes(range(256)) * 4,
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


def test_malformed_requests_get_400_or_a_close_and_the_worker_lives_on():
    with Balancer("--workers", "1", *APP) as b:
        pid = b.worker_pids()[0]
        answers = {}
        for name, raw in MALFORMED.items():
            answers[name] = status_of(exchange(b.port, raw))
            good = exchange(b.port, GOOD)
            assert status_of(good) == 200, f"after {name}: the next good request failed: {good[:80]!r}"
            assert f"X-Worker-Pid: {pid}".encode() in good, f"after {name}: a different worker answered"
        wrong = {name: status for name, status in answers.items() if status not in (0, 400)}
        assert not wrong, f"expected 400 or a close: {wrong}"
        assert b.worker_pids() == [pid]
        assert metric_sum(b, "balancer_worker_restarts_total") == 0


# ---- body size limit ------------------------------------------------------------------------------

def chunked(body: bytes, piece: int) -> bytes:
    """body in chunked transfer coding, piece bytes per chunk."""
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece]) for i in range(0, len(body), piece))
    return out + b"0\r\n\r\n"


def test_body_limit_holds_for_declared_and_streamed_bodies():
    limit = 1000
    with Balancer("--workers", "1", "--client-max-size", str(limit), *APP) as b:
        pid = b.worker_pids()[0]
        close = b"Connection: close\r\n"
        for size, expect in ((limit, 200), (limit + 1, 413)):
            body = b"x" * size
            declared = exchange(b.port, POST + close + b"Content-Length: %d\r\n\r\n" % size + body)
            assert status_of(declared) == expect, (size, declared[:120])
            for piece in (size, 100, 7):  # one chunk, or many small ones: the count is what matters
                streamed = exchange(b.port, POST + close + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, piece))
                assert status_of(streamed) == expect, (size, piece, streamed[:120])
                if expect == 200:
                    assert streamed.endswith(b"\r\n\r\n%d\n" % size)  # the handler saw every byte
        # 20 MB streamed: the handler never gets it. A reply, if the client sees one before the server's
        # close resets the upload, is the 413.
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
            s.sendall(POST + b"Transfer-Encoding: chunked\r\n\r\n")
            piece = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
            try:
                for _ in range(320):
                    s.sendall(piece)
            except OSError:
                pass
            try:
                reply = s.recv(65536)
            except OSError:
                reply = b""
            assert status_of(reply) in (0, 413), reply[:120]
        assert status_of(exchange(b.port, GOOD)) == 200
        assert b.worker_pids() == [pid]


# ---- EMFILE on accept -----------------------------------------------------------------------------

def read_responses(socks: list[socket.socket], timeout: float) -> list[bytes]:
    """Read each socket until the server closes it; bounded by timeout overall."""
    sel = selectors.DefaultSelector()
    got = {s: b"" for s in socks}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    open_ = len(socks)
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            try:
                chunk = key.fileobj.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                chunk = b""
            if chunk:
                got[key.fileobj] += chunk
            else:
                sel.unregister(key.fileobj)
                open_ -= 1
    sel.close()
    return [got[s] for s in socks]


def test_emfile_on_accept_backs_off_without_spinning_and_recovers():
    burst = 200
    with Balancer("--workers", "2", *APP) as b:
        assert status_of(exchange(b.port, GOOD)) == 200
        # No fd to spare: every accept() in the master fails with EMFILE until the limit is raised again.
        limits = starve_fds(b.pid)
        mark = b.mark()
        socks = [socket.create_connection(("127.0.0.1", b.port), timeout=10) for _ in range(burst)]
        try:
            for s in socks:
                s.sendall(GOOD)  # the kernel holds these in the backlog until the master can accept
            b.wait_for(r"accept: Too many open files \(1 so far\)", 10, start=mark)
            cpu0, t0 = read_proc(b.pid)[0], time.monotonic()
            b.wait_for(r"accept: Too many open files \(10 so far\)", 20, start=mark)
            cpu1, t1 = read_proc(b.pid)[0], time.monotonic()
            share = (cpu1 - cpu0) / (t1 - t0)
            print(f"EMFILE: master used {share:.1%} of a core over {t1 - t0:.1f} s of failing accepts")
            assert share < 0.1, f"the master spins on EMFILE: {share:.0%} of a core"
            assert b.proc.poll() is None
            # seconds of ticks without an fd: the accept warnings above are all the log says of it
            assert not [line for line in b.lines[mark:] if "Traceback" in line or "failed" in line], b.log()
            resource.prlimit(b.pid, resource.RLIMIT_NOFILE, limits)
            replies = read_responses(socks, 20)
        finally:
            for s in socks:
                s.close()
        served = sum(status_of(r) == 200 for r in replies)
        assert served == burst, f"only {served} of {burst} connections waiting out the EMFILE were served"
        assert metric_sum(b, "balancer_accept_errors_total", errno="EMFILE") >= 10
        assert status_of(exchange(b.port, GOOD)) == 200


# ---- many connections -----------------------------------------------------------------------------

COUNT_SCRIPT = """
-- Stop after WRK_REQUESTS responses: the run is bounded by count as well as by -d.
local limit = tonumber(os.getenv("WRK_REQUESTS"))
local seen = 0
response = function(status, headers, body)
  seen = seen + 1
  if seen >= limit then wrk.thread:stop() end
end
"""


def wrk_connections(b: Balancer, n: int, tmp_path, max_seconds: int) -> str:
    """n requests, each on a new connection, from wrk (64 at a time); returns wrk's report."""
    wrk = shutil.which("wrk")
    assert wrk, "wrk is missing: apt-get install wrk (tests/run.sh does)"
    script = tmp_path / "count.lua"
    script.write_text(COUNT_SCRIPT)
    start = metric_sum(b, "balancer_connections_accepted_total")
    proc = subprocess.Popen([wrk, "-t1", "-c64", f"-d{max_seconds}s", "-s", str(script),
                             "-H", "Connection: close", b.url + "/"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "WRK_REQUESTS": str(n)})
    try:
        # wrk's thread stops at n, but its main thread sleeps out -d: end it (SIGINT prints the report)
        # once the master has accepted them all.
        wait_until(lambda: proc.poll() is not None or metric_sum(b, "balancer_connections_accepted_total") >= start + n,
                   max_seconds + 10, f"{n} connections", step=0.25)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def test_100k_connections_leave_master_and_worker_fds_at_baseline(tmp_path):
    n = int(os.environ.get("BALANCER_TEST_CONNECTIONS", "100000"))
    with Balancer("--workers", "2", *APP) as b:
        listeners = _tcp_sockets(b.pid)  # the binds and the metrics endpoint, before any connection
        wrk_connections(b, 2000, tmp_path, 30)  # warm up: whatever is opened lazily is open now
        pids = b.worker_pids()
        settled = lambda: {p: fd_count(p) for p in [b.pid, *pids]}
        # The master closes its copies once it reads the workers' acks: on a loaded machine that can lag the
        # workers' own closes, and a baseline taken before would hold them.
        wait_until(lambda: not any(_tcp_sockets(p) for p in pids) and _tcp_sockets(b.pid) == listeners, 15,
                   "warm-up connections to close")
        baseline = settled()
        t0 = time.monotonic()
        report = wrk_connections(b, n, tmp_path, 150)
        took = time.monotonic() - t0
        print(f"{n} connections in {took:.1f} s\n{report}")
        assert "Socket errors" not in report and "Non-2xx" not in report, report
        assert b.worker_pids() == pids, "no worker was lost on the way"
        wait_until(lambda: settled() == baseline, 15, f"fd counts back to {baseline}, now {settled()}")
        # wrk is stopped once the master has accepted n; the workers' counts follow on their next beat
        wait_until(lambda: metric_sum(b, "balancer_worker_requests_total", code="200") >= n, 10,
                   f"{n} requests counted as served")


def test_worker_dying_while_the_master_is_out_of_fds_is_respawned_once_it_can_be():
    with Balancer("--workers", "2", *APP) as b:
        victim, survivor = b.worker_pids()
        limits = starve_fds(b.pid)  # even the fds the victim's exit frees are over the limit
        mark = b.mark()
        os.kill(victim, signal.SIGKILL)
        b.wait_for(r"cannot start a worker for slot=\d \(\[Errno 24\] Too many open files\); retrying", 10,
                   start=mark)
        b.wait_for(r"cannot start a worker for slot=\d .*retrying", 10, start=b.mark())  # and again, later
        assert b.proc.poll() is None and b.worker_pids() == [survivor], "no half-made worker is left behind"
        resource.prlimit(b.pid, resource.RLIMIT_NOFILE, limits)
        b.wait_for(r"worker slot=\d pid=\d+ ready", 20, start=mark)
        wait_until(lambda: len(b.worker_pids()) == 2, 10, "both slots filled")
        assert status_of(exchange(b.port, GOOD)) == 200


def test_worker_out_of_fds_refuses_handoffs_and_the_other_worker_serves_them():
    with Balancer("--workers", "2", *APP) as b:
        slots = {slot_pid(b, slot): slot for slot in ("0", "1")}
        full, other = b.worker_pids()
        limits = starve_fds(full)  # the fds the master sends it do not fit: MSG_CTRUNC
        before = metric_sum(b, "balancer_connections_redispatched_total")
        served_by = [exchange(b.port, GOOD) for _ in range(40)]
        assert all(status_of(r) == 200 for r in served_by)
        assert all(f"X-Worker-Slot: {slots[other]}".encode() in r for r in served_by), "the full worker served"
        assert metric_sum(b, "balancer_connections_redispatched_total") > before
        assert sorted(b.worker_pids()) == sorted([full, other])
        resource.prlimit(full, resource.RLIMIT_NOFILE, limits)
        wait_until(lambda: f"X-Worker-Slot: {slots[full]}".encode() in exchange(b.port, GOOD), 10,
                   "the worker to serve again once it has fds")


def test_master_lifts_the_soft_fd_limit_for_itself_and_its_workers():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(1024, hard // 2)
    with Balancer("--workers", "2", *APP,
                  preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))) as b:
        assert [resource.prlimit(p, resource.RLIMIT_NOFILE) for p in [b.pid, *b.worker_pids()]] == [(hard, hard)] * 3
    with Balancer("--workers", "1", "--worker-connections", str(hard), *APP) as b:
        b.wait_for(rf"--worker-connections {hard} is more than a worker can open \(RLIMIT_NOFILE {hard}\)", 5)
