"""Limits on real processes through the real CLI: body size per backend kind, header and body deadlines,
bad-request logging and counting, Connection: close while draining."""

from __future__ import annotations

import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.harness import Balancer
from tests.test_abuse import GOOD, chunked, exchange, metric_sum, status_of
from tests.test_integration import APP
from tests.test_metrics import wait_until

pytestmark = pytest.mark.timeout(120)
LIMITS_APP = ("--backend", "limitsapp:create_app")
KEEP = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"  # keep-alive


def read_response(f) -> tuple[int, dict, bytes]:
    """One HTTP response from a socket's file: (status, lower-cased headers, body); status 0 on EOF."""
    line = f.readline()
    if not line:
        return 0, {}, b""
    status = int(line.split()[1])
    headers = {}
    while (h := f.readline()) not in (b"\r\n", b""):
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers.get("content-length", "0")))


def trickle(port: int, head: bytes, data: bytes, step: int, pace: float, give_up: float) -> tuple[float, bytes]:
    """Send head, then data step bytes per pace seconds until the server answers or closes.

    Returns (seconds from the first byte to the server's answer or close, what it sent); give_up bounds it.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        start = time.monotonic()
        s.sendall(head)
        sent = 0
        while time.monotonic() - start < give_up:
            if select.select([s], [], [], pace)[0]:
                got = b""
                try:
                    while chunk := s.recv(65536):  # the answer, if any, then the server's close
                        got += chunk
                except (ConnectionResetError, socket.timeout):
                    pass
                return time.monotonic() - start, got
            if sent < len(data):
                try:
                    s.send(data[sent:sent + step])
                except OSError:
                    continue  # cut off: the next select sees the EOF
                sent += step
        raise AssertionError(f"the server neither answered nor closed in {give_up} s")


def post(path: str, length: int | None = None, close: bool = False) -> bytes:
    """A POST head with a declared length, or chunked when length is None."""
    framing = b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n"
    return b"POST %s HTTP/1.1\r\nHost: t\r\n%s%s\r\n" % (path.encode(), b"Connection: close\r\n" if close else b"",
                                                         framing)


# ---- body size: every backend kind ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["limitsapp:app", "limitsapp:create_app"])
def test_client_max_size_governs_application_and_factory_backends(backend):
    limit = 4_000_000
    with Balancer("--workers", "1", "--client-max-size", str(limit), "--backend", backend) as b:
        body = b"x" * 2_000_000  # past aiohttp's own 1 MiB default, which request.read() enforces
        reply = exchange(b.port, post("/read", len(body), close=True) + body)
        assert status_of(reply) == 200 and reply.endswith(b"\r\n\r\n2000000\n"), reply[:200]
        streamed = exchange(b.port, post("/read", close=True) + chunked(body, 65536))
        assert status_of(streamed) == 200 and streamed.endswith(b"\r\n\r\n2000000\n"), streamed[:200]
        # The limit itself, exactly: at it 200, one byte past it 413, declared or streamed. (At it through /echo:
        # aiohttp before 3.14 has request.read() refuse a body of exactly client_max_size.)
        body = b"x" * limit
        assert status_of(exchange(b.port, post("/echo", limit, close=True) + body)) == 200
        assert status_of(exchange(b.port, post("/echo", close=True) + chunked(body, 65536))) == 200
        assert status_of(exchange(b.port, post("/read", limit + 1, close=True) + body + b"x")) == 413
        assert status_of(exchange(b.port, post("/read", close=True) + chunked(body + b"x", 65536))) == 413


MiB = 1024 ** 2


def read_all_of(port: int, size: int, chunk: int | None = None) -> bytes:
    """POST /read with a body of size bytes, declared, or chunked in pieces of chunk bytes; the whole answer."""
    body = b"x" * size
    return exchange(port, post("/read", size, close=True) + body if chunk is None else
                    post("/read", close=True) + chunked(body, chunk), timeout=30)


@pytest.mark.parametrize("backend", ["limitsapp:big_app", "limitsapp:create_big_app"])
def test_an_application_keeps_its_own_client_max_size_when_the_option_is_not_given(backend):
    """As under run_app and gunicorn: Application(client_max_size=5 MiB) takes a 2 MiB body."""
    with Balancer("--workers", "1", "--backend", backend) as b:
        for chunk in (None, 65536):  # declared, then streamed
            reply = read_all_of(b.port, 2 * MiB, chunk)
            assert status_of(reply) == 200 and reply.endswith(b"\r\n\r\n%d\n" % (2 * MiB)), reply[:300]
            reply = read_all_of(b.port, 5 * MiB + 1, chunk)
            assert status_of(reply) == 413, reply[:300]
            assert b"size 5242880 exceeded" in reply and b"(the limit is the Application's client_max_size)" in reply


def test_an_application_asking_for_no_body_limit_gets_none():
    """client_max_size=0 is aiohttp's "no limit": the worker enforces none either (the body deadline holds)."""
    with Balancer("--workers", "1", "--backend", "limitsapp:no_limit_app") as b:
        for chunk in (None, 65536):
            reply = read_all_of(b.port, 3 * MiB, chunk)
            assert status_of(reply) == 200 and reply.endswith(b"\r\n\r\n%d\n" % (3 * MiB)), reply[:300]


@pytest.mark.parametrize("source", ["cli", "env", "file"])
def test_client_max_size_given_anywhere_replaces_the_applications_own(source, tmp_path):
    """--client-max-size, BALANCER_CLIENT_MAX_SIZE or the config file's key: given, it wins, and the 413 says so."""
    args, env = {"cli": (("--client-max-size", str(MiB)), {}),
                 "env": ((), {"BALANCER_CLIENT_MAX_SIZE": str(MiB)}),
                 "file": (("--config", str(tmp_path / "balancer.toml")), {})}[source]
    (tmp_path / "balancer.toml").write_text(f"client_max_size = {MiB}\n")
    with Balancer("--workers", "1", "--backend", "limitsapp:big_app", *args, env=env) as b:
        for chunk in (None, 65536):
            assert status_of(read_all_of(b.port, MiB, chunk)) == 200
            reply = read_all_of(b.port, 2 * MiB, chunk)  # under the Application's own 5 MiB, past the option's
            assert status_of(reply) == 413, reply[:300]
            assert b"size 1048576 exceeded" in reply and b"(the limit is --client-max-size)" in reply, reply[:300]


def test_a_bare_handler_gets_1_mib_unless_the_option_says_otherwise():
    body = b"x" * (2 * MiB)
    with Balancer("--workers", "1", "--backend", "testapp:request_info") as b:
        reply = exchange(b.port, post("/", len(body), close=True) + body, timeout=30)
        assert status_of(reply) == 413 and b"size 1048576 exceeded" in reply, reply[:300]
        assert b"balancer's default for a bare handler; --client-max-size sets another" in reply, reply[:300]
    with Balancer("--workers", "1", "--backend", "testapp:request_info", "--client-max-size", str(3 * MiB)) as b:
        reply = exchange(b.port, post("/", len(body), close=True) + body, timeout=30)
        assert status_of(reply) == 200 and b'"body": 2097152' in reply, reply[:300]


# ---- body size: no second reader ------------------------------------------------------------------

def test_handler_answering_before_reading_a_chunked_body_keeps_the_connection():
    with Balancer("--workers", "1", "--client-max-size", "100000", *LIMITS_APP) as b:
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
            f = s.makefile("rb")
            pieces = chunked(b"y" * 3000, 1000)
            s.sendall(post("/reject") + pieces[:500])  # the handler answers while the body is still coming
            status, headers, _ = read_response(f)
            assert status == 401 and headers.get("connection") != "close", (status, headers)
            s.sendall(pieces[500:] + KEEP)  # aiohttp reads and drops the rest; the connection stays usable
            status, _, body = read_response(f)
            assert status == 200, f"the keep-alive connection was dropped after the early answer ({status})"
            # Within the limit a chunked body reaches the handler intact, on the same connection: sent whole,
            # or (after 100 Continue, once the handler runs) counted as it arrives, a part having come first.
            body = chunked(b"z" * 99_999, 7000)
            s.sendall(post("/echo") + body)
            status, _, answer = read_response(f)
            assert status == 200 and answer == b"99999\n", (status, answer)
            s.sendall(post("/echo")[:-2] + b"Expect: 100-continue\r\n\r\n" + body[:30_000])
            assert read_response(f)[0] == 100
            s.sendall(body[30_000:])
            status, _, answer = read_response(f)
            assert status == 200 and answer == b"99999\n", (status, answer)
            # Past it: 413, and the connection closes (the rest of that body is never read).
            body = chunked(b"z" * 100_001, 7000)
            s.sendall(post("/echo")[:-2] + b"Expect: 100-continue\r\n\r\n" + body[:30_000])
            assert read_response(f)[0] == 100
            s.sendall(body[30_000:])
            status, headers, _ = read_response(f)
            assert status == 413 and headers.get("connection") == "close", (status, headers)
            assert f.read() == b""
        # A streamed body past the limit that arrives whole before the handler runs: 413 all the same.
        assert status_of(exchange(b.port, post("/echo", close=True) + chunked(b"z" * 100_001, 7000))) == 413
        assert status_of(exchange(b.port, GOOD)) == 200
        log = b.log()
        assert "readany" not in log and "Unhandled exception" not in log and "Traceback" not in log, log


# ---- header deadline against the keep-alive timeout -----------------------------------------------

SLOW_HEAD = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 1000  # never finished at this pace


def test_header_deadline_governs_first_headers_and_keepalive_the_idle_time_between_requests():
    with Balancer("--workers", "1", "--keepalive-timeout", "1", "--header-timeout", "3", *APP) as b:
        lived, got = trickle(b.port, b"", SLOW_HEAD, 1, pace=0.1, give_up=10)
        print(f"headers trickled: cut after {lived:.2f} s (keep-alive 1 s, header deadline 3 s)")
        assert got == b"", got[:100]
        assert lived >= 3 - 0.3, f"cut after {lived:.2f} s: before the header deadline (the keep-alive timer?)"
        assert lived <= 3 + 1.5, f"cut after {lived:.2f} s: long past the header deadline"
        wait_until(lambda: metric_sum(b, "balancer_worker_header_timeouts_total") == 1, 10,
                   "the cut-off to be counted")
        # After a request, idle time is the keep-alive timeout's: closed at ~1 s, and not a header timeout.
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
            f = s.makefile("rb")
            s.sendall(KEEP)
            assert read_response(f)[0] == 200
            start = time.monotonic()
            assert f.read() == b""
            idle = time.monotonic() - start
        assert 1 - 0.3 <= idle <= 1 + 1.5, f"an idle keep-alive connection was closed after {idle:.2f} s"
        time.sleep(1.5)  # two heartbeats: a wrongly counted close would show by now
        assert metric_sum(b, "balancer_worker_header_timeouts_total") == 1


def test_first_request_outliving_the_header_deadline_completes():
    with Balancer("--workers", "1", "--header-timeout", "1", "--body-timeout", "1", "--body-min-rate", "100",
                  *APP) as b:
        reply = exchange(b.port, b"GET /slow?s=2.5 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert status_of(reply) == 200 and reply.endswith(b"slow done\n"), reply[:200]
        # A body arriving for longer than the header deadline, fast enough for the body deadline.
        body = b"b" * 2500
        took, reply = trickle(b.port, post("/echo", len(body), close=True), body, 50, pace=0.05, give_up=8)
        assert status_of(reply) == 200 and reply.endswith(b"\r\n\r\n2500\n"), reply[:200]
        assert took > 1.5, took
        time.sleep(1.5)  # two heartbeats
        assert metric_sum(b, "balancer_worker_header_timeouts_total") == 0
        assert metric_sum(b, "balancer_worker_body_timeouts_total") == 0


# ---- body deadline ---------------------------------------------------------------------------------

def test_slow_body_gets_408_and_loses_its_connection_while_others_are_served():
    with Balancer("--workers", "1", "--body-timeout", "1", "--body-min-rate", "1000", *LIMITS_APP) as b:
        results = {}

        def slow(name: str, head: bytes, data: bytes) -> None:
            results[name] = trickle(b.port, head, data, 10, pace=0.1, give_up=8)  # 100 bytes/s: a tenth of the rate

        body = b"s" * 100_000
        clients = [threading.Thread(target=slow, args=("declared", post("/echo", len(body)), body[:800])),
                   threading.Thread(target=slow, args=("chunked", post("/read"), chunked(body, 10)[:800]))]
        for t in clients:
            t.start()
        served = [status_of(exchange(b.port, GOOD)) for _ in range(10)]
        for t in clients:
            t.join(15)
        assert served == [200] * 10
        for name, (took, reply) in results.items():
            print(f"{name} slow body: {status_of(reply)} after {took:.2f} s")
            assert status_of(reply) == 408 and b"Connection: close" in reply, (name, reply[:200])
            assert 1 - 0.3 <= took <= 1 + 2.0, (name, took)
        wait_until(lambda: metric_sum(b, "balancer_worker_body_timeouts_total") == 2, 10, "both to be counted")
        # Not cut: a body at three times the rate, over several windows ...
        body = b"f" * 9000
        took, reply = trickle(b.port, post("/echo", len(body), close=True), body, 300, pace=0.1, give_up=8)
        assert status_of(reply) == 200 and reply.endswith(b"\r\n\r\n9000\n"), reply[:200]
        # ... and a body sent at once to a handler that reads it two windows later: aiohttp stops reading at
        # its buffer's high-water mark meanwhile, which is not the client's doing.
        body = b"l" * 1_000_000
        reply = exchange(b.port, post("/lazy?s=2.5", len(body), close=True) + body, timeout=20)
        assert status_of(reply) == 200 and reply.endswith(b"\r\n\r\n1000000\n"), reply[:200]
        assert metric_sum(b, "balancer_worker_body_timeouts_total") == 2
        assert "Traceback" not in b.log()


# ---- bad requests -----------------------------------------------------------------------------------

BAD = [b"GARBAGE\r\n\r\n",  # a bad method on a connection's first request: aiohttp logs it at debug level
       b"GET / HTTP/9.9\r\nHost: t\r\n\r\n",
       b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n",
       b"GET / HTTP/1.1\r\nHost: t\r\nX(A): b\r\n\r\n",
       b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"]


def log_bytes(b: Balancer, start: int) -> int:
    with b._cond:
        return sum(len(line) + 1 for line in b.lines[start:])


def test_bad_requests_are_counted_exactly_and_logged_one_line_each_within_a_budget():
    n = 300
    with Balancer("--workers", "1", *APP) as b:
        first = mark = b.mark()
        answers = [status_of(exchange(b.port, BAD[i % len(BAD)])) for i in range(n)]
        assert answers == [400] * n, sorted(set(answers))
        wait_until(lambda: metric_sum(b, "balancer_worker_bad_requests_total") >= n, 10, f"{n} bad requests counted")
        assert metric_sum(b, "balancer_worker_bad_requests_total") == n
        written = log_bytes(b, mark)
        print(f"{n} bad requests: {written} bytes of log")
        lines = b.lines[mark:]
        # 5 lines per 10 s window: these 300 take well under one window, two at most on a crowded machine
        assert sum("bad request from" in line for line in lines) <= 10, "\n".join(lines)
        assert written < 3000, "\n".join(lines)
        assert "Traceback" not in b.log()
        # Handler errors: the first with its traceback, a few on one line, the rest summed up.
        mark = b.mark()
        crashes = [status_of(exchange(b.port, b"GET /crash HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
                   for _ in range(200)]
        assert crashes == [500] * 200
        assert status_of(exchange(b.port, GOOD)) == 200
        b.wait_for(r"\d+ more request errors in the last 10 s not logged", 15, start=mark)
        b.wait_for(r"\d+ more bad requests in the last 10 s not logged", 15, start=first)
        # Every bad request is in the log: on its own line or in a summary's count.
        lines = b.lines[first:]
        summed = sum(int(m.group(1)) for m in map(re.compile(r"(\d+) more bad requests").search, lines) if m)
        assert sum("bad request from" in line for line in lines) + summed == n, "\n".join(lines)
        lines = b.lines[mark:]
        print(f"200 handler errors: {log_bytes(b, mark)} bytes of log")
        assert sum("Traceback" in line for line in lines) == 1, "\n".join(lines)
        assert sum("handler crashed on purpose" in line for line in lines) <= 6, "\n".join(lines)
        assert log_bytes(b, mark) < 6000, "\n".join(lines)


# ---- draining ---------------------------------------------------------------------------------------

def test_keepalive_client_mid_drain_gets_connection_close_on_its_next_response():
    with Balancer("--workers", "1", "--graceful-timeout", "20", "--log-level", "debug", *APP) as b:
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
            f = s.makefile("rb")
            s.sendall(KEEP)
            status, headers, _ = read_response(f)
            assert status == 200 and headers.get("connection") != "close"
            mark = b.mark()
            started = time.monotonic()
            b.signal(signal.SIGTERM)
            b.wait_for(r"draining \(master\)", 10, start=mark)  # the worker has the master's DRAIN
            s.sendall(KEEP)
            status, headers, _ = read_response(f)
            assert status == 200 and headers.get("connection") == "close", (status, headers)
            assert f.read() == b""
        assert b.wait(15) == 0
        assert time.monotonic() - started < 10, "the drain waited for the kept-alive connection to time out"


def read_head(f) -> tuple[int, dict]:
    """A response's status and lower-cased headers, (0, {}) on EOF or reset."""
    try:
        line = f.readline()
    except ConnectionResetError:
        return 0, {}
    if not line:
        return 0, {}
    headers = {}
    while (h := f.readline()) not in (b"\r\n", b""):
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(line.split()[1]), headers


def read_chunk(f) -> bytes:
    """One chunk of a chunked body; b"" for the last (its trailer read too)."""
    size = int(f.readline().split(b";")[0], 16)
    data = f.read(size)
    f.readline()  # the CRLF after the chunk, or after the (empty) trailer
    return data


def streamed_response_straddling(b: Balancer, s: socket.socket, f, begin_drain) -> None:
    """GET /stream on s: its headers and first chunk arrive, then the drain begins, then the stream ends."""
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
    status, headers = read_head(f)
    assert status == 200 and headers.get("transfer-encoding") == "chunked", (status, headers)
    assert headers.get("connection") != "close", headers  # out keep-alive, before the drain began
    assert read_chunk(f) == b"first\n"
    begin_drain()
    assert read_chunk(f) == b"last\n"  # the handler saw the drain begin (its on_shutdown) and finished
    assert read_chunk(f) == b""


def connection_to_slot(b: Balancer, slot: str) -> tuple[socket.socket, object]:
    """A keep-alive connection served by the worker in slot, and its reader; the others opened are closed."""
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", b.port), timeout=30)
        f = s.makefile("rb")
        s.sendall(KEEP)
        status, headers, _ = read_response(f)
        assert status == 200, status
        if headers.get("x-worker-slot") == slot:
            return s, f
        f.close()
        s.close()
    raise AssertionError(f"no connection reached slot {slot}")


@pytest.mark.parametrize("drain", ["SIGHUP", "scale 1", "stop"])
def test_keepalive_request_after_a_stream_that_straddled_the_drain_is_answered(drain, tmp_path):
    """A streamed response's headers went out keep-alive before the drain: the next request on its connection
    is answered, with Connection: close, not dropped."""
    sock = str(tmp_path / "ctl.sock")
    workers = "2" if drain == "scale 1" else "1"
    with Balancer("--workers", workers, "--control-socket", sock, "--graceful-timeout", "20", *LIMITS_APP) as b:
        s, f = connection_to_slot(b, "1" if drain == "scale 1" else "0")  # scale 1 drains slot 1
        with s, f:
            def begin_drain() -> None:
                if drain == "SIGHUP":
                    b.signal(signal.SIGHUP)
                elif drain == "stop":
                    b.signal(signal.SIGTERM)
                else:
                    done = subprocess.run([sys.executable, "-m", "balancer", "scale", "1", "--control-socket", sock],
                                          capture_output=True, text=True, timeout=60)
                    assert done.returncode == 0, done.stderr

            streamed_response_straddling(b, s, f, begin_drain)
            s.sendall(KEEP)
            status, headers, body = read_response(f)
            assert status == 200 and body, "the request after the stream was dropped"
            assert headers.get("connection") == "close", headers
            assert f.read() == b""
        if drain == "stop":
            assert b.wait(30) == 0


def test_idle_connection_after_a_stream_that_straddled_the_drain_closes_at_the_keepalive_timeout():
    keepalive = 2.0
    with Balancer("--workers", "1", "--keepalive-timeout", str(keepalive), "--graceful-timeout", "20",
                  *LIMITS_APP) as b:
        with socket.create_connection(("127.0.0.1", b.port), timeout=30) as s, s.makefile("rb") as f:
            streamed_response_straddling(b, s, f, lambda: b.signal(signal.SIGTERM))
            ended = time.monotonic()
            assert f.read() == b""  # the server's close
            idle = time.monotonic() - ended
        assert keepalive - 0.5 <= idle < keepalive + 5, f"closed after {idle:.2f} s idle"
        assert b.wait(30) == 0
