"""Real-process tests: the `balancer` CLI, real workers, real sockets and HTTP clients."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import aiohttp
import pytest

from tests.harness import HERE, Balancer, pid_alive

pytestmark = pytest.mark.timeout(90)
APP = ("--backend", "testapp:create_app")


def fetch(b: Balancer, path: str = "/", close: bool = True, timeout: float = 10) -> http.client.HTTPResponse:
    """One request on a new connection; returns the response with its body read."""
    conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=timeout)
    conn.request("GET", path, headers={"Connection": "close"} if close else {})
    resp = conn.getresponse()
    resp.body = resp.read()
    conn.close()
    return resp


def open_connections(b: Balancer) -> float:
    """Connections the master counts open on all workers, from a real scrape."""
    with urllib.request.urlopen(f"http://{b.metrics_address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("balancer_worker_open_connections{"))


@pytest.mark.parametrize("impl", ["C", "Python"])
def test_default_backend_names_the_worker_and_round_robins_exactly(impl):
    # Both hand-off paths serve: the C accelerator and the Python fallback it replaces.
    with Balancer("--workers", "2", env={"BALANCER_NO_EXTENSIONS": "1" if impl == "Python" else ""}) as b:
        assert b.wait_for(r"hand-off in (\w+)").group(1) == impl
        slots = []
        for _ in range(20):
            slots.append(fetch(b).getheader("X-Worker-Slot"))
            # Least-loaded first: a worker whose close the master has not seen yet is not idle. Idle ones alternate.
            wait_until(lambda: open_connections(b) == 0, 5, "the worker to report its connection closed")
        assert sorted(set(slots)) == ["0", "1"]
        assert all(slots[i] != slots[i + 1] for i in range(19)), slots  # strictly alternating
        body = fetch(b).body.decode()
        assert body.startswith("Hello from balancer worker slot ") and "pid" in body


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_each_event_loop_serves_new_and_kept_alive_connections(loop):
    with Balancer("--workers", "2", "--loop", loop, *APP) as b:
        slots = [fetch(b).getheader("X-Worker-Slot") for _ in range(20)]
        assert sorted(set(slots)) == ["0", "1"]
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
        for _ in range(5):
            conn.request("GET", "/")
            assert conn.getresponse().read()
        conn.close()


def test_keep_alive_reuses_one_connection():
    with Balancer("--workers", "2", *APP) as b:
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
        pids = set()
        for _ in range(20):
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200 and resp.getheader("Connection") != "close"
            pids.add(resp.getheader("X-Worker-Pid"))
        sock = conn.sock
        assert sock is not None and len(pids) == 1  # one connection, one worker, 20 requests
        conn.close()


@pytest.mark.parametrize("backend", ["testapp:create_app", "testapp:app", "testapp:async_factory",
                                     "testapp:whoami", "balancer_workers.examples.template:handler",
                                     "balancer_workers.examples.template:create_app",
                                     "testapp:init_func", "testapp:ainit_func", "testapp:init_any",  # (argv)
                                     "testapp:create_app()", "testapp:async_factory()"])  # gunicorn's spelling
def test_backend_kinds(backend):
    with Balancer("--workers", "1", "--backend", backend) as b:
        resp = fetch(b)
        assert resp.status == 200 and resp.getheader("X-Worker-Slot") == "0"


def test_a_factory_called_with_literal_arguments():
    with Balancer("--workers", "1", "--backend", "testapp:configured('shop', shout=True)") as b:
        assert fetch(b, "/name").body == b"SHOP"


def test_bare_handler_gets_a_full_request_for_every_method_and_path_and_100_continue():
    # A bare handler is served without aiohttp's router (workers/backend.py skip_router): it must still get
    # a web.Request with app and match_info, every method and path, and Expect handled as aiohttp does.
    with Balancer("--workers", "1", "--backend", "testapp:request_info") as b:
        for method, path in [("GET", "/"), ("DELETE", "/a/b?c=d"), ("PATCH", "/x"), ("GET", "/y")]:
            conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
            conn.request(method, path)
            resp = conn.getresponse()
            info = json.loads(resp.read())
            conn.close()
            assert resp.status == 200, (method, path)
            assert info["method"] == method and info["path"] == path.split("?")[0]
            assert info["request_class"] == "Request" and info["app"] == "Application"
            assert info["config_dict"] == 0 and info["route_method"] == "*"
            assert info["match_info"] == [info["path"]]  # only this request's own write
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            reader = s.makefile("rb")
            assert reader.readline() == b"HTTP/1.1 100 Continue\r\n"  # before any body byte is sent
            assert reader.readline() == b"\r\n"
            s.sendall(b"hello")
            assert reader.readline().startswith(b"HTTP/1.1 200")
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            assert json.loads(reader.read(length))["body"] == 5
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: sometime\r\n\r\nhello")
            assert s.makefile("rb").readline().startswith(b"HTTP/1.1 417")


def test_crashing_handler_costs_one_request_not_the_worker():
    with Balancer("--workers", "1", *APP) as b:
        pid = fetch(b).getheader("X-Worker-Pid")
        for how in ("error", "sys.exit", "exit", "interrupt", "generator-exit", "base"):
            # A request of another client in flight on the same worker meanwhile is served to the end.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                mark = b.mark()
                slow = pool.submit(fetch, b, "/slow?s=0.5")
                b.wait_for("slow request started", 10, start=mark)
                assert fetch(b, f"/crash?how={how}").status == 500, how
                assert slow.result(timeout=10).status == 200, how
            assert fetch(b).getheader("X-Worker-Pid") == pid, how


async def _load(url: str, clients: int, stop: threading.Event, results: list, new_conn: bool) -> None:
    """Closed-loop clients until stop is set; each appends (ok, slot) per request."""
    async def client() -> None:
        conn = aiohttp.TCPConnector(force_close=new_conn, limit=1)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=10)) as s:
            # aiohttp silently retries an idempotent request once when the server disconnects; these
            # tests count every failure a client could see, so switch that off (as aiohttp's test_utils does).
            s._retry_connection = False
            while not stop.is_set():
                try:
                    async with s.get(url) as r:
                        await r.read()
                        results.append((r.status == 200, r.headers.get("X-Worker-Slot")))
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    results.append((False, None))
    await asyncio.gather(*(client() for _ in range(clients)))


def run_load(url: str, clients: int, new_conn: bool = True):
    """Start background load; returns (stop event, results list, thread)."""
    stop, results = threading.Event(), []
    t = threading.Thread(target=lambda: asyncio.run(_load(url, clients, stop, results, new_conn)), daemon=True)
    t.start()
    return stop, results, t


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _tcp_sockets(pid: int) -> int:
    """How many TCP sockets pid holds (client connections, for a worker)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    tcp = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            tcp.update(line.split()[9] for line in list(f)[1:])
    return len(inodes & tcp)


def test_kill_9_worker_under_load_only_its_inflight_requests_fail():
    clients = 16
    with Balancer("--workers", "2", *APP) as b:
        # 50 ms requests: each worker always has several in flight when the kill lands
        stop, results, t = run_load(b.url + "/nap?s=0.05", clients, new_conn=True)
        wait_until(lambda: len(results) > 100, 20, "load to start")
        victim = b.worker_pids()[0]
        mark = b.mark()
        held = _tcp_sockets(victim)  # the client connections the victim holds right now
        before_kill = len(results)
        os.kill(victim, signal.SIGKILL)
        b.wait_for(r"worker slot=\d pid=\d+ ready", 20, start=mark)  # the slot comes back
        after_ready = len(results)
        wait_until(lambda: len(results) > after_ready + 200, 20, "load after respawn")
        stop.set()
        t.join(20)
        failed = [r for r in results[before_kill:] if not r[0]]
        print(f"kill -9: {len(failed)} requests failed; the victim held {held} client connections")
        # each client had at most one request in flight on the victim when it died
        assert len(failed) <= clients, f"{len(failed)} failures"
        assert not [r for r in results[:before_kill] if not r[0]]
        tail = results[after_ready:]
        assert all(ok for ok, _ in tail[-100:])
        assert {slot for _, slot in tail} == {"0", "1"}  # both slots serve again
        assert victim not in b.worker_pids() and len(b.worker_pids()) == 2


def test_sigterm_lets_slow_request_finish_and_exits_zero():
    with Balancer("--workers", "2", "--graceful-timeout", "10", *APP) as b:
        out = {}
        th = threading.Thread(target=lambda: out.update(resp=fetch(b, "/slow?s=2", timeout=20)))
        th.start()
        b.wait_for("slow request started", 10)
        started = time.monotonic()
        b.signal(signal.SIGTERM)
        assert b.wait(15) == 0
        th.join(10)
        assert out["resp"].status == 200 and out["resp"].body == b"slow done\n"
        assert time.monotonic() - started < 10
        with pytest.raises(OSError):  # the listener is gone
            socket.create_connection(("127.0.0.1", b.port), timeout=2)


def test_master_kill_9_leaves_no_worker_after_2s():
    with Balancer("--workers", "2") as b:
        pids = b.worker_pids()
        assert len(pids) == 2
        os.kill(b.pid, signal.SIGKILL)
        b.wait(5)
        deadline = time.monotonic() + 2
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if pid_alive(p)]


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    bind = () if "--bind" in args else ("--bind", "127.0.0.1:0")  # never a fixed port someone may hold
    return subprocess.run([sys.executable, "-m", "balancer", "--metrics-bind", "none", "--workers", "2",
                           "--app-dir", str(HERE / "apps"), *bind, *args],
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


@pytest.mark.parametrize("args,code,message", [
    (("--backend", "nosuchmodule:handler"), 3, "cannot import module 'nosuchmodule'"),
    (("--backend", "testapp:nosuchattr"), 3, "module 'testapp' has no attribute 'nosuchattr'"),
    (("--backend", "testapp:not_callable"), 3, "'testapp:not_callable' is an int; expected an async handler"),
    (("--backend", "testapp:two_args"), 3, "takes 2 arguments"),
    (("--backend", "testapp:configured(os.getcwd())"), 3, "literal arguments only (e.g. myapp:create_app() or "
                                                          "myapp:create_app('prod', debug=False)): os.getcwd() is "
                                                          "not a literal"),
    (("--backend", "testapp:sync_handler"), 3, "returned a Response; expected an aiohttp.web.Application; if it is "
                                               "a handler, it must be async"),
    (("--backend", "testapp:not_callable()"), 3, "'not_callable' is an int, which cannot be called"),
    (("--backend", "testapp:configured()"), 3, "factory 'testapp:configured()' raised: TypeError"),
    (("--backend", "broken_import:app"), 3, "raised at import: RuntimeError: database URL not configured"),
    (("--backend", "no_colon"), 2, "expected MODULE:ATTR"),
    (("--bind", "nonsense"), 2, "bad bind 'nonsense'"),
    (("--workers", "0"), 2, "--workers must be at least 1"),
    (("--loop", "nope"), 2, "invalid choice"),
])
def test_bad_input_clear_error_and_exit_code(args, code, message):
    r = run_cli(*args)
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert "serving on" not in r.stderr
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("balancer: error:") and message in last, last  # one clear line, last


def test_address_in_use_is_a_clear_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = run_cli("--bind", f"127.0.0.1:{port}")
    assert r.returncode == 2
    assert f"cannot bind 127.0.0.1:{port}: Address already in use" in r.stderr


def test_ipv6_and_unix_binds(tmp_path):
    path = tmp_path / "b.sock"
    with Balancer("--workers", "1", "--bind", "[::1]:0", "--bind", f"unix:{path}", *APP) as b:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b"".join(iter(lambda: sock.recv(65536), b""))
        sock.close()
        assert data.startswith(b"HTTP/1.1 200")
        v6 = [line for line in b.lines if "serving on" in line][0]
        port6 = int(v6.split("[::1]:")[1].split()[0].rstrip(","))
        conn = http.client.HTTPConnection("::1", port6, timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().status == 200
        conn.close()
    assert not path.exists()


def test_sigterm_while_workers_boot_exits_zero_cleanly():
    with Balancer("--workers", "2", "--backend", "testapp:slow_boot", ready=False) as b:
        wait_until(lambda: b.log().count("slow boot started") == 2, 20, "both workers to start booting")
        pids = b.worker_pids()
        b.signal(signal.SIGTERM)
        assert b.wait(15) == 0
        assert not [p for p in pids if pid_alive(p)]
        log = b.log()
        assert "never retrieved" not in log and "Traceback" not in log and "ERROR" not in log, log


def test_sighup_while_workers_boot_reloads_after_the_boot_not_instead_of_it():
    with Balancer("--workers", "2", "--backend", "testapp:slow_boot", ready=False, env={"SLOW_BOOT": "1"}) as b:
        wait_until(lambda: b.log().count("slow boot started") == 2, 20, "both workers to start booting")
        b.signal(signal.SIGHUP)
        b.wait_ready(20)
        b.wait_for("rolling reload done", 30)
        log = b.log()
        assert log.index("workers serving on") < log.index("rolling reload of 2 workers"), log
        assert log.count("slow boot started") == 4 and "ERROR" not in log, log
        assert fetch(b).status == 200


def test_second_sigint_during_the_drain_stops_at_once():
    with Balancer("--workers", "2", "--graceful-timeout", "60", *APP) as b:
        pids = b.worker_pids()
        out = {}

        def slow() -> None:
            try:
                out["resp"] = fetch(b, "/slow?s=50", timeout=60)
            except (OSError, http.client.HTTPException) as exc:
                out["error"] = exc

        th = threading.Thread(target=slow)
        th.start()
        b.wait_for("slow request started", 10)
        b.signal(signal.SIGINT)
        b.wait_for("SIGINT: graceful shutdown", 10)
        b.signal(signal.SIGINT)
        assert b.wait(15) == 0  # not the 50 s the request wants, nor the 60 s graceful timeout
        th.join(15)
        assert "error" in out, out  # its worker was killed: the one request in flight is cut off
        assert not [p for p in pids if pid_alive(p)]
        assert "SIGINT again: stopping now" in b.log()
