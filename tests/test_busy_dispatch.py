"""Real-process tests of dispatch that knows what a worker is doing (balancer/holding.py).

Real masters and workers; the workers run CPU-bound handlers (tests/apps/busyapp.py) so that "busy" is what the
board and the worker's CPU clock say, not something a test sets.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import time
import urllib.request

import pytest

from tests.harness import Balancer
from tests.test_integration import fetch, wait_until

pytestmark = pytest.mark.timeout(120)
# A worker spinning in a handler sends no heartbeat: on a loaded machine a few seconds of CPU take many more.
APP = ("--backend", "busyapp:create_app", "--workers", "2", "--timeout", "100")


def finished(b: Balancer) -> float:
    """Requests the workers finished, from a real scrape (counted from their boards)."""
    with urllib.request.urlopen(f"http://{b.metrics_address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("balancer_worker_requests_total{"))


def connect(b: Balancer) -> tuple[http.client.HTTPConnection, str]:
    """A kept-alive connection and the pid of the worker it landed on."""
    conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=60)
    conn.request("GET", "/")
    resp = conn.getresponse()
    resp.read()
    return conn, resp.getheader("X-Worker-Pid")


def one_on_each(b: Balancer) -> dict[str, http.client.HTTPConnection]:
    """A kept-alive connection on each of the two workers, by pid (others opened on the way are closed)."""
    found: dict[str, http.client.HTTPConnection] = {}
    extra = []
    for _ in range(20):
        conn, pid = connect(b)
        if pid in found:
            extra.append(conn)
        else:
            found[pid] = conn
        if len(found) == 2:
            break
    for conn in extra:
        conn.close()
    assert len(found) == 2, "the connections all landed on one worker"
    return found


def warm_up(b: Balancer, requests: int = 160) -> None:
    """CPU-bound requests of 2 ms on new connections, enough for each worker's board to show a full window of
    them (board.WINDOW): the master holds connections only for workers whose requests are long and on a CPU."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert all(r.status == 200 for r in pool.map(lambda _: fetch(b, "/spin?s=0.002"), range(requests)))


def spin(b: Balancer, conn: http.client.HTTPConnection, pid: str, seconds: float) -> None:
    """Start a handler spinning for `seconds` of CPU on conn's worker; return once it runs."""
    mark = b.mark()
    conn.request("GET", f"/spin?s={seconds}&say=1")
    b.wait_for(rf"spinning {seconds}s in pid {pid}\b", 30, start=mark)


def finish(conn: http.client.HTTPConnection) -> None:
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"spun\n"
    conn.close()


def test_a_new_connection_goes_to_the_worker_with_no_request_running():
    with Balancer(*APP) as b:
        conns = one_on_each(b)
        (x, stuck), (y, idle) = conns.items()
        second, pid = connect(b)  # free workers go by connections: this one goes to y... or x, then try again
        while pid != y:
            second.close()
            second, pid = connect(b)
        # x: one connection, in a long handler; y: two kept-alive connections, nothing running. Least
        # connections would pick x, and the request would wait out its handler.
        spin(b, stuck, x, 3.0)
        for _ in range(5):
            done = finished(b)
            started = time.monotonic()
            resp = fetch(b, "/", timeout=30)
            assert resp.status == 200 and resp.getheader("X-Worker-Pid") == y
            assert time.monotonic() - started < 2.0
            # Its end counted on the board before the next: a client can read the response before the worker
            # has done its bookkeeping after it, and until then the worker still looks busy.
            wait_until(lambda: finished(b) > done, 10, "the request counted")
        finish(stuck)
        idle.close()
        second.close()


@pytest.mark.parametrize("start", ["spawned", "forked"])
def test_while_every_worker_is_busy_new_connections_wait_for_the_first_to_finish(start):
    """The master as a central queue: each worker stuck in a handler, the new connections go to whichever ends
    first, none to the one that ends last (least connections splits them between the two). Workers a zygote
    forked (--preload) got their channel by another way: they say they are idle as spawned ones do."""
    with Balancer(*APP, *(("--preload",) if start == "forked" else ())) as b:
        warm_up(b)
        conns = one_on_each(b)
        (soon, short), (late, long) = conns.items()
        spin(b, long, late, 4.0)
        spin(b, short, soon, 0.1)  # well within the hold's cap (HOLD_CAP), also on a loaded machine
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: fetch(b, "/", timeout=60), range(3)))
        assert all(r.status == 200 for r in answers)
        assert [r.getheader("X-Worker-Pid") for r in answers] == [soon] * 3
        assert time.monotonic() - started < 4.0
        finish(short)
        finish(long)


def test_a_held_connection_is_never_lost_nor_held_past_the_cap():
    """Both workers stay busy longer than the hold's cap: the connection goes to a worker then, and is answered."""
    from balancer.holding import HOLD_CAP

    with Balancer(*APP, "--log-level", "debug") as b:
        warm_up(b)
        conns = one_on_each(b)
        for pid, conn in conns.items():
            spin(b, conn, pid, 2 * HOLD_CAP + 1)
        mark = b.mark()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(fetch, b, "/", timeout=60)
            b.wait_for(r"a connection held for [\d.]+s \(the most\) goes to the least-loaded worker", HOLD_CAP + 10,
                       start=mark)
            released = time.monotonic() - started
            assert HOLD_CAP - 0.1 <= released < HOLD_CAP + 5  # held while both were busy, then let go
            assert answer.result(60).status == 200
        for conn in conns.values():
            finish(conn)
