"""The master's /metrics, /healthz and /readyz: format, per-slot folding, backend metrics, kill -9."""

from __future__ import annotations

import asyncio
import collections
import http.client
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from prometheus_client import Counter as PromCounter
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from balancer import wire
from balancer.process import Phase
from balancer.metrics import MetricsServer
from tests.harness import Balancer
from balancer_workers.stats import BUCKETS, RequestStats

pytestmark = pytest.mark.timeout(60)
COUNTER_TYPES = ("counter", "histogram", "summary")


# ---- helpers shared with test_dashboard -------------------------------------------------------------

def http_get(url: str, accept: str = "", timeout: float = 5) -> tuple[int, str, str]:
    """(status, content type, body) of one GET; 4xx/5xx are answers, not errors."""
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def samples(text: str, counters_only: bool = False) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} from the Prometheus text format."""
    out = {}
    for family in text_string_to_metric_families(text):
        if counters_only and family.type not in COUNTER_TYPES:
            continue
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float | None:
    """The value of one sample, None when absent."""
    return found.get((name, tuple(sorted(labels.items()))))


def wait_until(cond, timeout: float, what: str, step: float = 0.05):
    """Poll cond until it returns something truthy; fail with what after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(step)


class Load:
    """Background HTTP clients, bounded by a request count and a time limit (or stop(), whichever first)."""

    def __init__(self, base: str, paths: list[str], clients: int = 8, max_requests: int = 50_000,
                 max_seconds: float = 40.0, close_every: int = 4) -> None:
        self.base, self.paths, self.clients = base, paths, clients
        self.max_requests, self.max_seconds, self.close_every = max_requests, max_seconds, close_every
        self.sent = 0
        self.statuses: collections.Counter = collections.Counter()
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    async def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds

        async def client(i: int) -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
                n = i
                while not self._stop.is_set() and self.sent < self.max_requests and time.monotonic() < deadline:
                    self.sent += 1
                    n += 1
                    # Every few requests on a new connection, so connections keep being dispatched.
                    headers = {"Connection": "close"} if n % self.close_every == 0 else {}
                    try:
                        async with s.get(self.base + self.paths[n % len(self.paths)], headers=headers) as r:
                            await r.read()
                            self.statuses[r.status] += 1
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        self.failures += 1

        await asyncio.gather(*(client(i) for i in range(self.clients)))


def slot_pid(b: Balancer, slot: str) -> int:
    """The pid serving slot, asked over HTTP (the backend names itself in headers)."""
    def ask():
        with urllib.request.urlopen(b.url + "/", timeout=5) as r:
            return int(r.headers["X-Worker-Pid"]) if r.headers["X-Worker-Slot"] == slot else 0
    return wait_until(ask, 10, f"a response from slot {slot}", step=0)


# ---- against the real CLI --------------------------------------------------------------------------

def test_endpoints_and_promtool_accepts_the_exposition():
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (tests/run.sh does)"
    with Balancer("--workers", "2", "--backend", "testapp:create_app") as b:
        assert b.metrics_address, "no 'metrics on http://HOST:PORT/metrics' log line"
        base = f"http://{b.metrics_address}"
        assert http_get(base + "/healthz")[0] == 200
        assert http_get(base + "/readyz")[0] == 200
        for path in ("/", "/crash", "/missing", "/nap?s=0.001"):
            http_get(b.url + path)
        # the worker's figures arrive with its next heartbeat (once a second)
        wait_until(lambda: "code=\"500\"" in http_get(base + "/metrics")[2], 10, "the 500 to be counted")
        status, ctype, text = http_get(base + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                               timeout=20)
        assert check.returncode == 0, check.stdout + check.stderr
        found = samples(text)
        assert value(found, "balancer_worker_requests_total", worker="0", method="GET", code="200") is not None or \
            value(found, "balancer_worker_requests_total", worker="1", method="GET", code="200") is not None
        assert value(found, "balancer_worker_up", worker="1") == 1
        assert value(found, "balancer_worker_restarts_total", worker="0", reason="crash") == 0
        assert value(found, "balancer_connections_accepted_total") >= 4
        names = {name for name, _ in found}
        for name in ("balancer_worker_cpu_seconds_total", "balancer_worker_resident_memory_bytes",
                     "balancer_worker_open_fds", "balancer_worker_start_time_seconds",
                     "balancer_worker_request_duration_seconds_bucket", "balancer_accept_paused_seconds_total",
                     "balancer_accept_coalesced_total",
                     "balancer_accept_errors_total", "balancer_connections_redispatched_total",
                     "balancer_build_info", "balancer_worker_open_connections", "balancer_worker_requests_in_flight",
                     "balancer_worker_connections_dispatched_total"):
            assert name in names, name
        assert not any("pid" in dict(labels) for _, labels in found)
        status, ctype, om = http_get(base + "/metrics", accept="application/openmetrics-text;version=1.0.0")
        assert ctype.startswith("application/openmetrics-text") and om.endswith("# EOF\n")


def test_backend_metrics_appear_labelled_by_slot():
    with Balancer("--workers", "2", "--backend", "metricsapp:create_app") as b:
        for i in range(10):
            http_get(b.url + f"/?kind={'toy' if i % 2 else 'book'}&items=7")
        base = f"http://{b.metrics_address}/metrics"

        def all_counted():
            found = samples(http_get(base)[2])
            n = sum(v for (name, _), v in found.items() if name == "shop_orders_total")
            return found if n == 10 else None

        found = wait_until(all_counted, 10, "10 orders in the master's /metrics")
        for slot in ("0", "1"):
            assert value(found, "shop_worker_slot", worker=slot) == float(slot)  # each slot's own worker
        assert sum(v for (name, labels), v in found.items()
                   if name == "shop_basket_items_bucket" and ("le", "5.0") in labels) == 0
        assert sum(v for (name, labels), v in found.items()
                   if name == "shop_basket_items_bucket" and ("le", "10.0") in labels) == 10
        assert not any(name.startswith(("python_gc", "python_info")) for name, _ in found)


def test_kill_9_under_load_counters_never_go_back_and_crash_is_counted():
    with Balancer("--workers", "2", "--backend", "metricsapp:create_app") as b:
        base = f"http://{b.metrics_address}/metrics"
        victim = slot_pid(b, "0")
        history: list[dict] = []

        def scrape() -> dict:
            history.append(samples(http_get(base)[2], counters_only=True))
            return history[-1]

        with Load(b.url, ["/?kind=a", "/?kind=b"], clients=8, max_seconds=30) as load:
            wait_until(lambda: (value(scrape(), "shop_orders_total", kind="a", worker="0") or 0) > 20, 15,
                       "slot 0 to serve under load")
            before = value(history[-1], "balancer_worker_requests_total", worker="0", method="GET", code="200")
            mark = b.mark()
            os.kill(victim, signal.SIGKILL)
            b.wait_for(r"worker slot=0 pid=\d+ ready", 20, start=mark)

            def recovered():
                found = scrape()
                after = value(found, "balancer_worker_requests_total", worker="0", method="GET", code="200")
                return (after or 0) > before and value(found, "balancer_worker_restarts_total", worker="0",
                                                reason="crash") == 1
            wait_until(recovered, 15, "slot 0 to count requests again after the respawn")
        assert load.sent > 0 and slot_pid(b, "0") != victim
        # Every counter, histogram bucket and backend counter of every slot, scrape after scrape.
        for prev, cur in zip(history, history[1:]):
            for key, v in prev.items():
                assert key in cur, f"{key} vanished"
                assert cur[key] >= v, f"{key} went back from {v} to {cur[key]}"


# ---- against a fake master: folding and readiness, no processes needed ---------------------------

class FakeWorker:
    def __init__(self, slot: int, pid: int, requests: int, dispatched: int, metrics=None) -> None:
        self.slot, self.pid, self.exited, self.started_wall = slot, pid, False, time.time()
        self.link = type("Link", (), {})()
        self.phase, self.link.open_conns, self.link.dispatched = Phase.READY, 2, dispatched
        self.link.returned = self.link.resumed = 0
        buckets = [0] * (len(BUCKETS) + 1)
        buckets[0] = requests
        self.stats = {"requests": [["GET", 200, requests]], "buckets": buckets, "sum": 0.001 * requests,
                      "count": requests, "inflight": 1, "header_timeouts": 0, "metrics": metrics or []}


class FakeMaster:
    def __init__(self) -> None:
        self.config = type("Config", (), {"metrics_bind": "127.0.0.1:0"})()
        self.accepted, self.accept_errors, self.stopping, self.started = 0, {}, False, time.time()
        self.coalesced, self.draining = 0, False
        self.upgrader = type("Upgrader", (), {"upgrades": 0, "exec_started": self.started,
                                              "carried_service": staticmethod(lambda name: None)})()
        self.dispatcher = type("Dispatcher", (), {"redispatched": 0})()
        sup = self.supervisor = type("Supervisor", (), {})()
        sup.slots, sup.target, sup.live, sup.restarts = [None, None], 2, [], collections.Counter()
        sup.on_exit_hooks = []
        sup.records = lambda: list(sup.live)

    def paused_total(self) -> float:
        return 0.0


def user_counter(n: float, gauge: float) -> list:
    return [["jobs", "counter", "Jobs.", [["_total", {"queue": "q", "worker": "w"}, n]]],
            ["depth", "gauge", "Depth.", [["", {}, gauge]]]]


def test_slot_counters_fold_across_replacement_and_sum_during_reload():
    master = FakeMaster()
    server = MetricsServer(master)
    master.supervisor.on_exit_hooks.append(server.fold)  # what start() does
    sup = master.supervisor
    old = FakeWorker(0, os.getpid(), requests=10, dispatched=5, metrics=user_counter(4, 7))
    sup.live, sup.slots[0] = [old], old

    def scrape():
        return samples(generate_latest(server.registry).decode())

    first = scrape()
    assert value(first, "balancer_worker_requests_total", worker="0", method="GET", code="200") == 10
    assert value(first, "jobs_total", worker="0", queue="q", exported_worker="w") == 4
    cpu = value(first, "balancer_worker_cpu_seconds_total", worker="0")
    # Reload: the replacement is live next to the draining old worker; the slot is their sum.
    new = FakeWorker(0, os.getppid(), requests=3, dispatched=1, metrics=user_counter(1, 2))
    sup.live, sup.slots[0] = [old, new], new
    during = scrape()
    assert value(during, "balancer_worker_requests_total", worker="0", method="GET", code="200") == 13
    assert value(during, "balancer_worker_connections_dispatched_total", worker="0") == 6
    assert value(during, "balancer_worker_open_connections", worker="0") == 4
    assert value(during, "depth", worker="0") == 9
    # The old one is reaped: its totals move into the slot's base, gauges go with it.
    old.exited = True
    for hook in sup.on_exit_hooks:
        hook(old)
    sup.live = [new]
    after = scrape()
    assert value(after, "balancer_worker_requests_total", worker="0", method="GET", code="200") == 13
    assert value(after, "balancer_worker_request_duration_seconds_count", worker="0") == 13
    assert value(after, "jobs_total", worker="0", queue="q", exported_worker="w") == 5
    assert value(after, "depth", worker="0") == 2
    assert value(after, "balancer_worker_cpu_seconds_total", worker="0") >= cpu
    assert value(after, "balancer_worker_start_time_seconds", worker="0") == new.started_wall
    assert value(after, "balancer_worker_up", worker="1") == 0  # an empty slot is down, not missing
    assert len(server._cpu_seen) == 1  # nothing kept for the reaped pid


def test_readyz_healthz_and_the_log_line(caplog):
    async def run():
        master = FakeMaster()
        server = MetricsServer(master)
        with caplog.at_level(logging.INFO, logger="balancer"):
            await server.start()
        try:
            lines = [r.getMessage() for r in caplog.records if "metrics on http://" in r.getMessage()]
            assert len(lines) == 1
            port = server.address[1]
            assert lines[0].endswith(f"metrics on http://127.0.0.1:{port}/metrics") and port > 0
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as s:
                async def status(path):
                    async with s.get(base + path) as r:
                        return r.status

                async def readyz():
                    async with s.get(base + "/readyz") as r:
                        return r.status, await r.text()
                assert await status("/healthz") == 200
                assert await status("/readyz") == 503  # no worker at all
                w = FakeWorker(0, os.getpid(), 1, 1)
                w.phase = Phase.BOOTING
                master.supervisor.live = [w]
                assert await status("/readyz") == 503
                w.phase = Phase.READY
                assert await status("/readyz") == 200
                master.stopping = True  # a stop signal, still serving during --shutdown-delay
                assert await readyz() == (503, "not ready: shutting down\n")
                master.draining = True
                assert await readyz() == (503, "not ready: shutting down\n")
        finally:
            await server.close()

    asyncio.run(run())


def test_worker_snapshot_carries_user_metrics_but_not_default_collectors():
    counter = PromCounter("snapshot_probe", "A probe counter.", ["kind"])
    try:
        counter.labels("x").inc(3)
        stats = RequestStats()
        stats.observe("GET", 200, 0.002)
        snap = stats.snapshot()
        families = {name: (typ, samples) for name, typ, _, samples in snap["metrics"]}
        assert families["snapshot_probe"] == ("counter", [["_total", {"kind": "x"}, 3.0]])
        assert not any(name.startswith(("process_", "python_")) for name in families)
        assert snap["count"] == 1 and snap["buckets"][1] == 1
    finally:
        REGISTRY.unregister(counter)


def test_a_broken_collector_does_not_stop_the_heartbeat(caplog):
    class Broken:
        def describe(self):
            return []  # so that registering does not already call collect()

        def collect(self):
            raise RuntimeError("collector bug")

    broken = Broken()
    REGISTRY.register(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="balancer.worker"):
            snap = RequestStats().snapshot()
        assert "metrics" not in snap and snap["count"] == 0
        assert any("prometheus_client metrics failed" in r.getMessage() for r in caplog.records)
    finally:
        REGISTRY.unregister(broken)


def test_worker_snapshot_stays_one_datagram_however_many_user_series(caplog):
    small = PromCounter("snapshot_small", "Fits.", ["kind"])
    huge = PromCounter("snapshot_huge", "Does not fit.", ["id", "note"])
    try:
        small.labels("a").inc()
        for i in range(20_000):
            huge.labels(str(i), "\u00e9\"\x01" * 3).inc()
        with caplog.at_level(logging.WARNING, logger="balancer.worker"):
            snap = RequestStats().snapshot()
        names = [family[0] for family in snap["metrics"]]
        assert "snapshot_small" in names and "snapshot_huge" not in names
        assert len(wire.encode_json(wire.BEAT, snap)) < wire.MAX_MSG_BYTES // 2
        assert any("the master sees only the first" in r.getMessage() for r in caplog.records)
    finally:
        REGISTRY.unregister(small)
        REGISTRY.unregister(huge)


def test_a_slot_removed_by_scale_down_keeps_its_counters_but_not_its_up_gauge():
    with Balancer("--workers", "2", "--backend", "testapp:create_app") as b:
        base = f"http://{b.metrics_address}"
        for _ in range(6):
            http_get(b.url + "/")

        def counted() -> bool:
            found = samples(http_get(base + "/metrics")[2])
            return sum(value(found, "balancer_worker_requests_total", worker=w, method="GET", code="200") or 0
                       for w in ("0", "1")) == 6
        wait_until(counted, 10, "six requests counted")
        before = samples(http_get(base + "/metrics")[2])
        served_by_1 = value(before, "balancer_worker_requests_total", worker="1", method="GET", code="200")
        assert served_by_1 and value(before, "balancer_worker_up", worker="1") == 1
        mark = b.mark()
        b.signal(signal.SIGTTOU)
        b.wait_for(r"worker slot=1 pid=\d+ exited \(scale\)", 20, start=mark)
        after = samples(http_get(base + "/metrics")[2])
        assert value(after, "balancer_worker_up", worker="1") is None  # not "down": not wanted any more
        assert value(after, "balancer_worker_up", worker="0") == 1
        assert value(after, "balancer_worker_requests_total", worker="1", method="GET", code="200") == served_by_1
        assert value(after, "balancer_workers_desired") == 1
        # the retirement is counted, under its own reason: the dashboard's Restarts annotation shows it
        assert value(after, "balancer_worker_restarts_total", worker="1", reason="scale") == 1
        assert value(after, "balancer_worker_restarts_total", worker="0", reason="scale") == 0


def test_accept_paused_counts_backpressure_not_a_boot_or_an_empty_pool():
    """balancer_accept_paused_seconds_total grows while every ready worker is full, not while none is ready."""
    with Balancer("--workers", "1", "--worker-connections", "1", "--backend", "testapp:slow_boot",
                  env={"SLOW_BOOT": "1.5"}) as b:
        base = f"http://{b.metrics_address}/metrics"

        def paused() -> float:
            return value(samples(http_get(base)[2]), "balancer_accept_paused_seconds_total")

        assert paused() < 0.5, "the 1.5 s boot counted as backpressure"
        host, port = b.address.rsplit(":", 1)
        hold = socket.create_connection((host, int(port)), timeout=10)  # takes the worker's only connection
        hold.sendall(b"GET /slow?s=30 HTTP/1.1\r\nHost: t\r\n\r\n")
        b.wait_for(r"slow request started in pid \d+", 10)
        waiting = socket.create_connection((host, int(port)), timeout=15)  # left in the backlog meanwhile
        waiting.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        wait_until(lambda: paused() >= 1.0, 10, "a second of backpressure counted")
        # The only worker killed: accepting stays paused until its replacement has booted (1.5 s and more),
        # and that outage is not backpressure.
        mark = b.mark()
        os.kill(b.worker_pids()[0], signal.SIGKILL)
        b.wait_for(r"worker slot=0 pid=\d+ died", 10, start=mark)
        at_death = paused()
        b.wait_for(r"worker slot=0 pid=\d+ ready", 20, start=mark)
        reply = waiting.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert paused() - at_death < 0.5, "the time with no worker ready counted as backpressure"
        hold.close()
        waiting.close()


def test_a_client_gone_while_its_body_is_read_is_one_499_not_also_a_500():
    """The handler's body read fails when the client leaves; aiohttp answers that 500 to nobody."""
    with Balancer("--workers", "1", "--backend", "testapp:create_app") as b:
        base = f"http://{b.metrics_address}/metrics"
        host, port = b.address.rsplit(":", 1)
        for n in range(1, 4):
            with socket.create_connection((host, int(port)), timeout=10) as c:
                c.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + b"a" * 100)
                wait_until(lambda: value(samples(http_get(base)[2]), "balancer_worker_requests_in_flight",
                                         worker="0") == 1, 10, "the upload in flight")
            wait_until(lambda: value(samples(http_get(base)[2]), "balancer_worker_requests_total", worker="0",
                                     method="POST", code="499") == n, 10, f"{n} uploads cut off")
        assert fetch_status(b.url + "/") == 200  # and the next request is counted as usual
        found = samples(http_get(base)[2])
        assert value(found, "balancer_worker_requests_total", worker="0", method="POST", code="500") is None
        assert value(found, "balancer_worker_requests_total", worker="0", method="GET", code="200") == 1
        wait_until(lambda: value(samples(http_get(base)[2]), "balancer_worker_requests_in_flight", worker="0") == 0,
                   10, "the in-flight gauge back to 0 (it comes with the heartbeat)")
        assert "Error handling request" not in b.log()  # a client leaving is not a server error


def fetch_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status


def test_requests_cut_off_count_499_and_leave_the_in_flight_gauge():
    """A client gone mid-request, and a request cut at the graceful deadline, are each counted once as 499."""
    with Balancer("--workers", "2", "--backend", "testapp:create_app", "--graceful-timeout", "1") as b:
        base = f"http://{b.metrics_address}"

        def scrape() -> dict:
            return samples(http_get(base + "/metrics")[2])

        def in_flight() -> float:
            return sum(value(scrape(), "balancer_worker_requests_in_flight", worker=w) or 0 for w in ("0", "1"))

        def cut(found: dict, worker: str) -> float:
            return value(found, "balancer_worker_requests_total", worker=worker, method="GET", code="499") or 0

        host, port = b.address.rsplit(":", 1)
        clients = []
        for _ in range(2):  # one slow request on each worker: the master hands them to different ones
            c = socket.create_connection((host, int(port)), timeout=10)
            c.sendall(b"GET /slow?s=30 HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(c)
        wait_until(lambda: in_flight() == 2, 10, "two requests in flight")
        clients[0].close()  # its client goes away: the handler is cancelled, no response is written
        wait_until(lambda: in_flight() == 1, 10, "the abandoned request out of the in-flight gauge")
        found = scrape()
        assert cut(found, "0") + cut(found, "1") == 1
        mark = b.mark()
        b.signal(signal.SIGTTOU)  # slot 1 drains; its request outlives --graceful-timeout and is cut off
        b.wait_for(r"worker slot=1 pid=\d+ exited \(scale\)", 20, start=mark)
        found = scrape()
        assert cut(found, "0") + cut(found, "1") == 2, found
        assert sum(value(found, "balancer_worker_requests_total", worker=w, method="GET", code="200") or 0
                   for w in ("0", "1")) == 0
        clients[1].close()


def test_a_worker_killed_outright_right_after_answering_still_has_every_request_counted():
    # 200 requests answered on one keep-alive connection, then kill -9 before any heartbeat could carry them:
    # the worker counted each on its board, which the master reads after the worker is gone.
    with Balancer("--workers", "1", "--backend", "testapp:create_app") as b:
        base = f"http://{b.metrics_address}/metrics"
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
        for _ in range(200):
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        victim = int(resp.getheader("X-Worker-Pid"))
        os.kill(victim, signal.SIGKILL)
        conn.close()
        mark = b.mark()
        b.wait_for(rf"worker slot=0 pid={victim} died", 10)
        b.wait_for(r"worker slot=0 pid=\d+ ready", 20, start=mark)
        found = samples(http_get(base)[2])
        assert value(found, "balancer_worker_requests_total", worker="0", method="GET", code="200") == 200
        assert value(found, "balancer_worker_request_duration_seconds_count", worker="0") == 200
