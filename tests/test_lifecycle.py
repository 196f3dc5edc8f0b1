"""Reloads, timeouts, recycling, scaling and the connection cap, on real processes under real load."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time

import pytest

from tests.harness import Balancer
from tests.test_control import ctl
from tests.test_integration import APP, fetch, run_load, wait_until

pytestmark = pytest.mark.timeout(120)


def slots_pids(b: Balancer) -> set[int]:
    return set(b.worker_pids())


def test_five_rolling_reloads_under_keepalive_load_lose_nothing():
    with Balancer("--workers", "2", "--graceful-timeout", "10", *APP) as b:
        first = slots_pids(b)
        stop, results, t = run_load(b.url + "/", 32, new_conn=False)
        wait_until(lambda: len(results) > 500, 20, "load to start")
        for i in range(5):
            before = slots_pids(b)
            mark = b.mark()
            b.signal(signal.SIGHUP)
            b.wait_for("rolling reload done", 30, start=mark)
            wait_until(lambda: not before & slots_pids(b), 20, "the old workers to drain and exit")
            seen = len(results)
            wait_until(lambda: len(results) > seen + 200, 20, "requests after a reload")
            # the traffic moved: the kept-alive clients reconnected to the new workers, over both of them (which
            # worker a new connection goes to depends on what each is doing: balancer/holding.py)
            served_by = {fetch(b).getheader("X-Worker-Pid") for _ in range(4)}
            assert served_by <= {str(pid) for pid in slots_pids(b)}
            assert {slot for _, slot in results[seen:]} == {"0", "1"}
        stop.set()
        t.join(20)
        failed = [r for r in results if not r[0]]
        print(f"5 reloads: {len(results)} requests, {len(failed)} failed")
        assert not failed, f"{len(failed)} of {len(results)} requests failed across 5 reloads"
        wait_until(lambda: len(b.worker_pids()) == 2, 20, "old workers to exit")
        assert not first & slots_pids(b), "every worker pid changed"
        # one ack board per live worker: the ten workers' boards do not pile up in the master
        wait_until(lambda: board_maps(b.pid) == 2, 10, "the retired workers' boards to be unmapped")


def board_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum("balancer-board" in line for line in f)


def test_reload_to_broken_code_keeps_old_workers(tmp_path):
    app = tmp_path / "editable.py"
    app.write_text("from aiohttp import web\nasync def handler(request):\n    return web.Response(text='v1')\n")
    sock = str(tmp_path / "ctl.sock")
    with Balancer("--workers", "2", "--app-dir", str(tmp_path), "--backend", "editable:handler",
                  "--control-socket", sock) as b:
        pids = slots_pids(b)
        app.write_text("raise ImportError('half-deployed release')\n")
        for _ in range(3):  # three failed reloads in a row: the slot that serves on is not crash-looping
            mark = b.mark()
            b.signal(signal.SIGHUP)
            b.wait_for("reload stopped at slot=0; old workers keep serving", 30, start=mark)
        assert "half-deployed release" in b.log()
        assert fetch(b).body == b"v1" and b.proc.poll() is None
        wait_until(lambda: slots_pids(b) == pids, 10, "the failed replacement to be reaped")
        # status tells what serves (the old code) and that the reload failed, not the generation it wanted
        status = ctl("status", "--control-socket", sock, "--interval", "0")
        assert "2/2 workers ready, generation 0 (reload to generation 3 failed" in status.stdout, status
        assert "CRASH-LOOPING" not in status.stdout, status.stdout
        brief = json.loads(ctl("status", "--control-socket", sock, "--json", "--interval", "0").stdout)
        assert (brief["generation"], brief["serving_generation"], brief["reload_failed"]) == (3, 0, True)
        assert not any(s["crash_looping"] for s in brief["slots"]), brief["slots"]
        # fixed code on disk: the next reload picks it up
        app.write_text("from aiohttp import web\nasync def handler(request):\n    return web.Response(text='v2')\n")
        mark = b.mark()
        b.signal(signal.SIGHUP)
        b.wait_for("rolling reload done", 30, start=mark)
        assert {fetch(b).body for _ in range(4)} == {b"v2"}
        status = ctl("status", "--control-socket", sock, "--interval", "0").stdout
        assert "2/2 workers ready, generation 4, listening" in status, status


def test_blocked_loop_is_replaced_within_timeout_and_others_keep_serving():
    with Balancer("--workers", "2", "--timeout", "2", *APP) as b:
        out = {}
        th = threading.Thread(target=lambda: out.update(r=_try_fetch(b, "/block?s=60")))
        th.start()
        m = b.wait_for(r"blocking pid (\d+)", 10)
        blocked_pid = int(m.group(1))
        started = time.monotonic()
        served = 0
        while blocked_pid in b.worker_pids():
            assert time.monotonic() - started < 2 + 2 + 1, "hung worker not replaced within --timeout + 2 s"
            resp = fetch(b, timeout=5)
            assert resp.status == 200 and resp.getheader("X-Worker-Pid") != str(blocked_pid)
            served += 1
        replaced_after = time.monotonic() - started
        assert served > 0
        b.wait_for(r"sent no heartbeat for [\d.]+s \(--timeout 2\); aborting it", 5)
        wait_until(lambda: len(b.worker_pids()) == 2, 10, "the replacement")
        th.join(10)
        assert out["r"] is None  # the blocked request itself is lost with its worker
        print(f"hung worker replaced after {replaced_after:.2f}s")


def _try_fetch(b, path):
    try:
        return fetch(b, path, timeout=20).status
    except OSError:
        return None


def test_max_requests_recycles_gracefully():
    with Balancer("--workers", "1", "--max-requests", "50", *APP) as b:
        first = slots_pids(b)
        mark = b.mark()
        statuses = [fetch(b).status for _ in range(60)]
        assert statuses == [200] * 60
        b.wait_for(r"worker slot=0 pid=\d+ exited \(recycle\)", 20, start=mark)
        assert not first & slots_pids(b)


def test_max_memory_recycles():
    with Balancer("--workers", "1", "--max-memory", "100", "--backend", "testapp:create_app_with_hog") as b:
        pid = b.worker_pids()[0]
        mark = b.mark()
        assert fetch(b, "/hog?mb=160").status == 200
        b.wait_for(rf"worker slot=0 pid={pid} passed --max-memory 100 MiB; recycling", 10, start=mark)
        b.wait_for(rf"worker slot=0 pid={pid} exited \(recycle\)", 20, start=mark)
        assert fetch(b).status == 200


def test_ttin_ttou_scale_at_runtime():
    with Balancer("--workers", "1", *APP) as b:
        mark = b.mark()
        b.signal(signal.SIGTTIN)
        b.wait_for(r"worker slot=1 pid=\d+ ready", 20, start=mark)
        assert {fetch(b).getheader("X-Worker-Slot") for _ in range(4)} == {"0", "1"}
        mark = b.mark()
        b.signal(signal.SIGTTOU)
        b.wait_for(r"worker slot=1 pid=\d+ exited \(scale\)", 20, start=mark)
        assert {fetch(b).getheader("X-Worker-Slot") for _ in range(4)} == {"0"}
        assert len(b.worker_pids()) == 1


def test_worker_connection_cap_pauses_accepting_until_one_frees():
    with Balancer("--workers", "1", "--worker-connections", "2", *APP) as b:
        held = []
        for _ in range(2):
            c = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
            c.request("GET", "/")
            assert c.getresponse().read()
            held.append(c)  # keep-alive: each holds one of the worker's 2 slots
        third = socket.create_connection(("127.0.0.1", b.port), timeout=10)  # the kernel backlog takes it
        third.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        third.settimeout(1.0)
        with pytest.raises(socket.timeout):
            third.recv(1)  # not served while the worker is at its cap
        held.pop().close()
        third.settimeout(10)
        data = b"".join(iter(lambda: third.recv(65536), b""))
        assert data.startswith(b"HTTP/1.1 200")
        third.close()
        for c in held:
            c.close()


def blocked_signals(pid: int) -> int:
    """The SigBlk mask of pid from /proc (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
    except (OSError, StopIteration):
        return 0


def test_a_sighup_while_the_master_starts_is_a_reload_once_it_serves():
    # Before its loop has handlers, a SIGHUP's default action would kill the master: it is held back instead.
    b = Balancer("--workers", "1", *APP, ready=False)
    try:
        wait_until(lambda: blocked_signals(b.pid) & (1 << (signal.SIGHUP - 1)), 10, "the CLI to hold SIGHUP back")
        b.signal(signal.SIGHUP)
        b.wait_ready()
        b.wait_for(r"rolling reload done \(generation 1\)", 30)
        assert fetch(b).status == 200
    finally:
        b.stop()


@pytest.mark.parametrize("late", [signal.SIGUSR1, signal.SIGHUP, signal.SIGTTIN])
def test_signals_during_the_end_of_a_stop_neither_kill_nor_freeze_the_master(late):
    # logrotate's SIGUSR1 (or a SIGHUP, a SIGTTIN) landing as the master finishes its stop: once its loop
    # closes, their default actions would kill the master (exit 138/129) or stop it (state T, never exiting).
    with Balancer("--workers", "1", *APP) as b:
        done = threading.Event()

        def pester():
            while not done.is_set():
                try:
                    os.kill(b.pid, late)
                except ProcessLookupError:
                    return
                time.sleep(0.001)

        b.signal(signal.SIGTERM)
        t = threading.Thread(target=pester, daemon=True)
        t.start()
        try:
            assert b.wait(30) == 0
        finally:
            done.set()
            t.join(5)
        # the master forwards SIGUSR1 to its workers: none may die of it on its way out either
        assert "exited (shutdown)" in b.log() and ", signal SIG" not in b.log(), b.log()


@pytest.mark.parametrize("how", ["reload", "stop"])
def test_requests_pipelined_behind_a_running_one_are_answered_through_a_drain(how):
    """Three requests sent at once, the first slow; the drain begins while it runs: all three are answered."""
    with Balancer("--workers", "1", *APP) as b:
        host, port = b.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=15) as c:
            c.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n"
                      b"GET /?n=2 HTTP/1.1\r\nHost: t\r\n\r\n"
                      b"GET /?n=3 HTTP/1.1\r\nHost: t\r\n\r\n")
            b.wait_for(r"slow request started in pid \d+", 10)
            mark = b.mark()
            b.signal(signal.SIGHUP if how == "reload" else signal.SIGTERM)
            b.wait_for("rolling reload of 1 workers" if how == "reload" else "graceful shutdown", 10, start=mark)
            replies = read_responses(c, 3)
        assert [status for status, _ in replies] == [200, 200, 200], replies
        # the connection ends after the last of them, not after the first
        assert [headers.get("connection") for _, headers in replies] == [None, None, "close"], replies
        if how == "stop":
            assert b.wait(30) == 0


def read_responses(sock: socket.socket, n: int) -> list[tuple[int, dict]]:
    """n HTTP/1.1 responses with Content-Length bodies from sock: (status, lower-cased headers) each."""
    stream = sock.makefile("rb")
    out = []
    for _ in range(n):
        status_line = stream.readline()
        if not status_line:
            break
        headers = {}
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        stream.read(int(headers.get("content-length", 0)))
        out.append((int(status_line.split()[1]), headers))
    return out


@pytest.mark.parametrize("how", ["stop", "reload"])
def test_websockets_are_closed_by_the_apps_on_shutdown_as_a_drain_begins(tmp_path, how):
    """aiohttp's pattern: on_shutdown closes open websockets with 1001. It must run when the drain begins (as
    run_app and gunicorn run it), not after the graceful timeout has cut every socket (1006, no close frame)."""
    import asyncio

    import aiohttp

    events = tmp_path / "events"
    env = {"WSAPP_EVENTS": str(events), "WSAPP_CLEANUP": "1"}
    with Balancer("--workers", "1", "--graceful-timeout", "20", "--backend", "wsapp:create_app", env=env) as b:
        (old,) = b.worker_pids()

        async def client() -> tuple[int, float]:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"ws://{b.address}/ws") as sock:
                    await sock.send_str("ping")
                    assert (await sock.receive(10)).data == "ping"
                    began = time.monotonic()
                    b.signal(signal.SIGTERM if how == "stop" else signal.SIGHUP)
                    msg = await sock.receive(15)
                    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
                    return sock.close_code, time.monotonic() - began

        code, took = asyncio.run(client())
        assert code == 1001 and took < 5, (code, took, b.log())  # not 1006 after the 20 s graceful timeout
        if how == "stop":
            assert b.wait(30) == 0
        else:
            b.wait_for("rolling reload done", 30)
            wait_until_gone = time.monotonic() + 20
            while old in b.worker_pids():
                assert time.monotonic() < wait_until_gone, b.log()
                time.sleep(0.05)
    lines = [line.split() for line in events.read_text().splitlines()]
    mine = [line[0] for line in lines if int(line[-2]) == old]
    # the old worker: the socket opened, on_shutdown saw it, and the slow cleanup ran to its end
    assert mine == ["ws_open", "on_shutdown", "on_cleanup_done"], lines
    assert ["on_shutdown", "open=1"] in [line[:2] for line in lines if int(line[-2]) == old]


def test_a_request_pipelined_after_the_drain_began_is_answered_too():
    """The close is decided as the running handler returns, not when the drain began."""
    with Balancer("--workers", "1", "--log-level", "debug", *APP) as b:
        host, port = b.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=15) as c:
            c.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n")
            b.wait_for(r"slow request started in pid \d+", 10)
            mark = b.mark()
            b.signal(signal.SIGTERM)
            b.wait_for(r"draining \(master\)", 10, start=mark)  # the worker has begun its drain
            c.sendall(b"GET /?n=2 HTTP/1.1\r\nHost: t\r\n\r\n")  # while the slow one still runs
            replies = read_responses(c, 2)
        assert [status for status, _ in replies] == [200, 200], replies
        assert [headers.get("connection") for _, headers in replies] == [None, "close"], replies
        assert b.wait(30) == 0
