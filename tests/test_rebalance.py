"""Keep-alive rebalancing through the real CLI, on raw keep-alive sockets driven by threads.

Proves: under CPU-bound concurrent keep-alive load idle connections go back to the master and resume on a
worker, and every request gets exactly its own response, once, in order (also pipelined, split across two
writes, or written the instant the previous answer arrived); the returned/resumed/parked/expired/ended
counters balance exactly; cheap handlers, --no-keepalive-rebalance and TLS never move a connection; a PROXY
client's address travels with a moved connection; the master closes a parked connection idle past
--keepalive-timeout and one whose client closed it, and counts each; a request on a parked connection right
after SIGTERM is answered and the master exits 0, also when every worker is busy at that moment (the stop hands
parked connections to the workers; none is held for a free worker and then closed as homeless); after SIGHUP a
parked connection's next request reaches a new worker. Which connections are parked is read from /proc (the
master's socket inodes); connections move in waves (every client sends at once) that leave one worker with a
request in hand while the other is idle. The backend, tests/apps/rebalanceapp.py, spins ms of CPU and answers
"<id> <worker pid> <request.remote>".
"""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import threading
import time
from typing import Self

import pytest

from tests.harness import Balancer
from tests.test_metrics import http_get, samples, wait_until
from tests.tlscerts import make_ca, make_signed

pytestmark = pytest.mark.timeout(60)
APP = ("--backend", "rebalanceapp:handler", "--workers", "2")
CPU = (1, 1, 10)  # ms of CPU per request, drawn at random: mostly 1 ms, some 10 ms
CHEAP = (0,)


def request(ms: float, rid: str) -> bytes:
    return f"GET /?ms={ms}&id={rid} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


class Conn:
    """One raw keep-alive connection (plain, TLS, or after a PROXY v1 header); responses read one at a time."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None, proxy: bytes = b"") -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self.f = self.sock.makefile("rb")
        self.head = proxy  # goes with the first write
        self.port = self.sock.getsockname()[1]  # the server's end has it as its peer's port (/proc/net/tcp)

    def send(self, *parts: bytes, gap: float = 0.0) -> None:
        """Each part in its own send(), gap seconds apart."""
        for i, part in enumerate(parts):
            if i and gap:
                time.sleep(gap)  # the shape of the load (a slow writer), not a synchronisation
            self.sock.sendall(self.head + part)
            self.head = b""

    def read(self) -> tuple[str, dict, str]:
        """One response: (status line, headers, body); ("", {}, "") at EOF."""
        status = self.f.readline()
        if not status:
            return "", {}, ""
        headers = {}
        while (line := self.f.readline()) not in (b"\r\n", b""):
            name, _, val = line.decode().partition(":")
            headers[name.strip().lower()] = val.strip()
        return status.decode().strip(), headers, self.f.read(int(headers.get("content-length", 0))).decode()

    def expect(self, rid: str) -> list[str]:
        """The next response, which must be a 200 for rid: the app's fields [id, pid, remote]."""
        status, _, body = self.read()
        fields = body.split()
        assert status == "HTTP/1.1 200 OK" and fields[:1] == [rid], f"sent {rid}, got {status!r} {body!r}"
        return fields

    def call(self, ms: float, rid: str, split: bool = False) -> list[str]:
        req = request(ms, rid)
        # split: the request line cut in two, its rest a moment later (the first part read alone, if read)
        self.send(*((req[:20], req[20:]) if split else (req,)), gap=0.005)
        return self.expect(rid)

    def close(self) -> None:
        self.f.close()
        self.sock.close()


class Load:
    """Clients driven by threads, one per keep-alive connection, in waves: every connection sends at once, then
    waits for its answers (a worker left with a long request and one behind it while the other is idle is when a
    connection moves). Each request carries its own id; per connection and wave, by mode: "one" request; "two",
    the second written the instant the first is answered; "split", the same with the second in two writes;
    "pipeline", three requests in one write; "partial", a request with the start of the next, the rest once
    the first is answered."""

    def __init__(self, port: int, conns: int = 8, spin=CPU, modes=("one",), tls=None, proxied=False):
        self.conns = [Conn(port, tls, f"PROXY TCP4 10.9.0.{i} 127.0.0.1 {4000 + i} {port}\r\n".encode()
                           if proxied else b"") for i in range(conns)]
        self.spin, self.modes = spin, [modes[i % len(modes)] for i in range(conns)]
        self.seen: list[list[list[str]]] = [[] for _ in self.conns]  # per connection: each answer's fields
        self.raced = [0] * conns  # waves whose second request, written at once, another worker answered
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.barrier = threading.Barrier(conns)

    def total(self) -> int:
        return sum(len(s) for s in self.seen)

    def _wave(self, c: Conn, mode: str, ms: float, rid: str) -> list[list[str]]:
        if mode == "pipeline":
            rids = [f"{rid}.{j}" for j in range(3)]
            c.send(b"".join(request(ms, r) for r in rids))
            return [c.expect(r) for r in rids]
        if mode == "partial":
            first, second = request(ms, rid + ".0"), request(ms, rid + ".1")
            c.send(first + second[:9])  # "GET /?ms=": in the parser, not yet a request
            got = [c.expect(rid + ".0")]
            c.send(second[9:])
            return got + [c.expect(rid + ".1")]
        if mode in ("two", "split"):
            return [c.call(ms, rid + ".0"), c.call(1, rid + ".1", mode == "split")]
        return [c.call(ms, rid)]

    def _client(self, i: int) -> None:
        c, mode, k, rng = self.conns[i], self.modes[i], len(self.seen[i]), random.Random(i)
        try:
            while not self.stop.is_set():
                self.barrier.wait()
                got = self._wave(c, mode, rng.choice(self.spin), f"c{i}-{k}")
                if mode in ("pipeline", "partial"):  # read with the first request: never moved in between
                    assert len({fields[1] for fields in got}) == 1, f"answered by several workers: {got}"
                self.raced[i] += len({fields[1] for fields in got}) > 1
                self.seen[i] += got
                k += 1
        except threading.BrokenBarrierError:
            pass  # stopped
        except Exception as exc:  # noqa: BLE001 - reported by run()
            self.errors.append(f"connection {i} ({mode}) wave {k}: {exc!r}")
            self.barrier.abort()

    def run(self, until, what: str, timeout: float = 25.0) -> None:
        """Drive every connection until until() is true (polled), then stop after their current requests."""
        self.stop.clear()
        self.barrier.reset()
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(len(self.conns))]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: self.errors or until(), timeout, what, step=0.1)
        finally:
            self.stop.set()
            self.barrier.abort()
            for t in threads:
                t.join(15)
        assert not self.errors, self.errors[:5]
        assert not any(t.is_alive() for t in threads), "a client is stuck"

    def moved(self) -> int:
        """Connections answered by more than one worker (the app names its pid)."""
        return sum(len({fields[1] for fields in answers}) > 1 for answers in self.seen)

    def last_pid(self, conn: Conn) -> int:
        """The worker that answered conn last."""
        return int(self.seen[self.conns.index(conn)][-1][1])

    def raced_in(self, mode: str) -> int:
        """Waves of mode's connections whose two answers came from two workers."""
        return sum(n for n, m in zip(self.raced, self.modes) if m == mode)

    def check_clean(self) -> None:
        """One more request on each connection: its answer comes next, so nothing was answered twice or late."""
        for i, c in enumerate(self.conns):
            c.call(0, f"c{i}-end")

    def close(self) -> None:
        for c in self.conns:
            c.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def counts(b: Balancer) -> dict[str, float]:
    """The rebalancing figures (per-worker counters summed) and the requests answered."""
    found = samples(http_get(f"http://{b.metrics_address}/metrics")[2])
    names = {"returned": "balancer_worker_connections_returned_total",
             "resumed": "balancer_worker_connections_resumed_total", "parked": "balancer_parked_connections",
             "expired": "balancer_parked_connections_expired_total",
             "ended": "balancer_parked_connections_ended_total", "requests": "balancer_worker_requests_total"}
    return {key: sum(v for (n, _), v in found.items() if n == name) for key, name in names.items()}


def running(pids: list[int]) -> bool:
    """Every pid on a CPU or waiting for one (state R): each worker in a long CPU-bound request."""
    def state(pid: int) -> str:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    return all(state(pid) == "R" for pid in pids)


def poll(cond, timeout: float) -> bool:
    """cond() became true within timeout."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def none_parked(b: Balancer) -> dict | None:
    """The figures once no connection is parked."""
    c = counts(b)
    return c if c["parked"] == 0 else None


def balanced(c: dict) -> bool:
    """The accounting identity: every connection given back is resumed, parked, expired or ended."""
    return c["returned"] == c["resumed"] + c["parked"] + c["expired"] + c["ended"]


def settled(b: Balancer) -> dict:
    """The figures once the moves of the last answers are in: two scrapes alike and the identity holding."""
    last = [None]

    def same():
        now = counts(b)
        was, last[0] = last[0], now
        return now if now == was and balanced(now) else None
    return wait_until(same, 10, "the counters to settle and balance", step=0.2)


def held_by_master(b: Balancer, conns: list[Conn]) -> list[Conn]:
    """The connections whose server end is an fd of the master (parked, once hand-offs are acked): /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{b.pid}/fd"):
        try:
            link = os.readlink(f"/proc/{b.pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    server_end = {}  # client port -> the inode of the server's socket of that connection
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == b.port:
                server_end[int(fields[2].split(":")[1], 16)] = int(fields[9])
    return [c for c in conns if server_end.get(c.port) in inodes]


def park_some(b: Balancer, load: Load) -> tuple[dict, list[Conn]]:
    """Drive load until connections moved, stop it; once some stay parked, the settled figures and those."""
    for _ in range(8):
        want = counts(b)["resumed"] + 20
        load.run(lambda want=want: counts(b)["resumed"] >= want, "20 more connections resumed")
        c = settled(b)
        if c["parked"]:  # the master's copies of acked hand-offs close at its next tick
            def found(n=c["parked"]) -> list[Conn] | None:
                parked = held_by_master(b, load.conns)
                return parked if len(parked) == n else None
            return c, wait_until(found, 5, f"{c['parked']} connections held by the master alone")
    raise AssertionError(f"no connection stayed parked after 8 rounds: {c}")


def test_cpu_bound_connections_move_and_each_request_gets_its_own_answer_once_in_order():
    """Connections are returned and resumed; answers match, once, in order; the counters balance exactly."""
    with Balancer(*APP) as b, Load(b.port) as load:
        load.run(lambda: counts(b)["resumed"] >= 30, "30 resumed connections")
        load.check_clean()
        c = settled(b)
        assert c["returned"] >= 30 and c["resumed"] >= 30 and load.moved(), c
        c, parked = park_some(b, load)  # settled: balanced with connections parked
        load.close()
        after = wait_until(lambda: none_parked(b), 5, "no connection parked")
        assert balanced(after) and after["ended"] - c["ended"] == len(parked) and after["expired"] == 0, after


@pytest.mark.parametrize("spin, options", [(CHEAP, ()), (CPU, ("--no-keepalive-rebalance",))],
                         ids=["cheap-handler", "no-keepalive-rebalance"])
def test_no_connection_moves_for_a_cheap_handler_or_with_the_option_off(spin, options):
    """A hello-cheap handler, or --no-keepalive-rebalance under CPU-bound load: returned stays 0."""
    with Balancer(*APP, *options) as b, Load(b.port, spin=spin) as load:
        load.run(lambda: load.total() >= 800, "800 answers")
        load.check_clean()
        c = counts(b)
        assert c["requests"] >= 800 and c["returned"] == 0 and c["resumed"] == 0 and not load.moved(), c


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA's certificate, and a server certificate and key for localhost it signed."""
    where = tmp_path_factory.mktemp("certs")
    ca = make_ca(where)
    return ca[0], make_signed(where, "server", "localhost", ca)


def test_tls_connections_never_move(certs):
    """TLS under CPU-bound concurrent keep-alive load: every request answered, returned stays 0."""
    ca, (cert, key) = certs
    tls = ssl.create_default_context(cafile=str(ca))
    with Balancer(*APP, "--certfile", str(cert), "--keyfile", str(key)) as b, \
            Load(b.port, tls=tls) as load:
        load.run(lambda: load.total() >= 800, "800 answers over TLS")
        load.check_clean()
        c = counts(b)
        assert c["requests"] >= 800 and c["returned"] == 0 and not load.moved(), c


def test_a_moved_connection_keeps_its_proxy_client_address():
    """--proxy-protocol: after connections moved, every answer still names the PROXY header's client."""
    with Balancer(*APP, "--proxy-protocol") as b, Load(b.port, proxied=True) as load:
        load.run(lambda: counts(b)["resumed"] >= 30, "30 resumed connections")
        load.check_clean()
        assert load.moved()
        for i, answers in enumerate(load.seen):
            assert {fields[2] for fields in answers} == {f"10.9.0.{i}"}, (i, answers[:3])


@pytest.mark.parametrize("modes, racing", [(("one", "pipeline", "one", "partial"), None),
                                           (("one", "two", "one", "split"), ("two", "split"))],
                         ids=["pipelined", "written-at-once"])
def test_exactly_once_when_the_next_request_races_the_move(modes, racing):
    """Pipelined, half-sent, or written the instant the last answer came: each answer its request's, once, in order."""
    with Balancer(*APP) as b, Load(b.port, modes=modes) as load:
        load.run(lambda: min(map(len, load.seen)) >= 30 and counts(b)["resumed"] >= 10
                 and all(load.raced_in(mode) >= 5 for mode in racing or ()),
                 f"30 answers on each connection, 10 resumed, 5 waves of each of {racing} answered by two workers")
        load.check_clean()
        assert balanced(settled(b))


def test_the_master_closes_a_parked_connection_its_client_closed_or_left_idle_past_the_keepalive_timeout():
    """A client closing a parked connection is counted ended; one left idle reads EOF at the timeout, expired."""
    with Balancer(*APP, "--keepalive-timeout", "1") as b:
        with Load(b.port) as load:
            c, parked = park_some(b, load)
            for conn in parked:
                conn.close()
            after = wait_until(lambda: none_parked(b), 5, "no connection parked")
            assert after["ended"] - c["ended"] == len(parked) and after["expired"] == c["expired"], (c, after)
            assert balanced(after), after
        with Load(b.port) as load:
            c, parked = park_some(b, load)
            idle = time.monotonic()
            for conn in parked:
                assert conn.read() == ("", {}, ""), "a parked connection got something other than EOF"
            assert time.monotonic() - idle < 1 + 2
            after = wait_until(lambda: none_parked(b), 5, "no connection parked")
            assert after["expired"] - c["expired"] == len(parked) and after["ended"] == c["ended"], (c, after)
            assert balanced(after), after


def test_a_keepalive_timeout_changed_by_a_reload_applies_to_parked_connections(tmp_path):
    """SIGHUP re-reads --keepalive-timeout: the master's parking closes idle connections at the new value."""
    conf = tmp_path / "balancer.toml"
    conf.write_text('backend = "rebalanceapp:handler"\nworkers = 2\nkeepalive_timeout = 30\n')
    with Balancer("-c", str(conf)) as b:
        conf.write_text('backend = "rebalanceapp:handler"\nworkers = 2\nkeepalive_timeout = 1\n')
        mark = b.mark()
        b.signal(signal.SIGHUP)
        b.wait_for(r"reload applies from the config file: --keepalive-timeout", start=mark)
        b.wait_for(r"rolling reload done", start=mark)
        with Load(b.port) as load:
            c, parked = park_some(b, load)
            idle = time.monotonic()
            for conn in parked:
                assert conn.read() == ("", {}, ""), "a parked connection got something other than EOF"
            assert time.monotonic() - idle < 1 + 2, "parked connections kept the old 30 s timeout"
            after = wait_until(lambda: none_parked(b), 5, "no connection parked")
            assert after["expired"] - c["expired"] == len(parked), (c, after)


def test_a_request_on_a_parked_connection_right_after_sigterm_is_answered():
    """SIGTERM with connections parked: their next requests answered, idle ones closed, the master exits 0 in time."""
    with Balancer(*APP, "--keepalive-timeout", "2") as b, Load(b.port) as load:
        _, parked = park_some(b, load)
        b.signal(signal.SIGTERM)
        stopped = time.monotonic()
        for i, conn in enumerate(parked):
            conn.send(request(0, f"p{i}"))
        for i, conn in enumerate(parked):
            conn.expect(f"p{i}")
        for conn in load.conns:
            if conn not in parked:
                assert conn.read() == ("", {}, ""), "an idle connection got something other than EOF"
        assert b.wait(2 + 8) == 0
        assert time.monotonic() - stopped < 2 + 8


def test_sigterm_while_every_worker_is_busy_still_answers_a_parked_connections_next_request():
    """SIGTERM with connections parked and every worker busy: the parked ones' next requests answered, not reset."""
    with Balancer(*APP, "--keepalive-timeout", "2") as b, Load(b.port) as load:
        _, parked = park_some(b, load)
        workers = b.worker_pids()
        idle = [c for c in load.conns if c not in parked]
        busy = [next(c for c in idle if load.last_pid(c) == pid) for pid in workers
                if any(load.last_pid(c) == pid for c in idle)]
        for i, conn in enumerate(busy):  # one long request in each worker that has a connection ...
            conn.send(request(600, f"busy{i}"))
        while not poll(lambda: running(workers), 0.3):  # ... and on new connections until every worker runs one
            assert len(busy) < 5, "new connections keep going to a busy worker"
            busy.append(Conn(b.port))
            busy[-1].send(request(600, f"busy{len(busy) - 1}"))
        b.signal(signal.SIGTERM)
        wait_until(lambda: counts(b)["parked"] == 0, 5, "the stop to hand the parked connections over")
        for i, conn in enumerate(parked):
            conn.send(request(0, f"p{i}"))
        for i, conn in enumerate(parked):
            conn.expect(f"p{i}")
        for i, conn in enumerate(busy):
            conn.expect(f"busy{i}")
        load.close()
        assert b.wait(2 + 8) == 0


def test_after_sighup_a_parked_connections_next_request_reaches_a_new_worker():
    """SIGHUP (rolling reload) with connections parked: their next requests are answered by new workers."""
    with Balancer(*APP, "--keepalive-timeout", "30") as b, Load(b.port) as load:
        _, parked = park_some(b, load)
        old = set(b.worker_pids())
        mark = b.mark()
        b.signal(signal.SIGHUP)
        b.wait_for(r"rolling reload done", 30, start=mark)
        for i, conn in enumerate(load.conns):
            conn.send(request(0, f"c{i}-after"))
        for i, conn in enumerate(load.conns):
            pid = int(conn.expect(f"c{i}-after")[1])
            # a parked one goes to a new worker; the others were in the old ones, draining: answered there
            assert (pid not in old) == (conn in parked), (i, pid, old, conn in parked)
