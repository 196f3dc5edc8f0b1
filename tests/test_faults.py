"""Supervisor fault paths on the real CLI: failed and hung replacements, reloads during reloads, scaling mid-reload."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from balancer import dispatch, wire
from balancer.config import Config
from balancer.dispatch import Dispatcher, Link
from tests.harness import Balancer, pid_alive
from tests.test_integration import fetch, wait_until

pytestmark = pytest.mark.timeout(120)

# The app reads its behaviour from files beside it at import, so a test changes "the deployed code" by writing
# them: version.txt is what it answers, boot.txt what its import does ("ok", "exit", "sleep S", "sleep-slot N S").
EDITABLE = '''
import os, time
from pathlib import Path
from aiohttp import web
HERE = Path(__file__).parent
VERSION = (HERE / "version.txt").read_text().strip()
BOOT = (HERE / "boot.txt").read_text().split()
SLOT = os.environ.get("BALANCER_WORKER_SLOT")
if BOOT[0] == "exit":
    os._exit(7)
if BOOT[0] == "sleep":
    time.sleep(float(BOOT[1]))
if BOOT[0] == "sleep-slot" and SLOT == BOOT[1]:
    time.sleep(float(BOOT[2]))
async def handler(request):
    return web.Response(text=VERSION, headers={"X-Worker-Pid": str(os.getpid()), "X-Worker-Slot": SLOT})
'''


def deploy(tmp_path: Path, version: str, boot: str = "ok") -> None:
    (tmp_path / "version.txt").write_text(version)
    (tmp_path / "boot.txt").write_text(boot)
    (tmp_path / "editable.py").write_text(EDITABLE)


def editable(tmp_path: Path, *args: str) -> Balancer:
    return Balancer("--app-dir", str(tmp_path), "--backend", "editable:handler",
                    "--control-socket", str(tmp_path / "ctl.sock"), "--pid-file", str(tmp_path / "master.pid"),
                    *args)


def status(tmp_path: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "balancer", "status", "--control-socket", str(tmp_path / "ctl.sock"),
                        "--json"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def stop_promptly(b: Balancer, tmp_path: Path, within: float) -> None:
    """SIGTERM: exit 0 within `within` seconds, leaving no worker, control socket or pid file behind."""
    workers = b.worker_pids()
    started = time.monotonic()
    b.signal(signal.SIGTERM)
    assert b.wait(within + 5) == 0, b.log()
    took = time.monotonic() - started
    assert took < within, f"shutdown took {took:.1f}s"
    assert not (tmp_path / "ctl.sock").exists() and not (tmp_path / "master.pid").exists()
    assert not [pid for pid in workers if pid_alive(pid)]
    assert "Traceback" not in b.log() and "never retrieved" not in b.log(), b.log()


def test_replacement_dying_at_import_leaves_no_phantom_and_shutdown_is_prompt(tmp_path):
    deploy(tmp_path, "v1")
    with editable(tmp_path, "--workers", "2") as b:
        old = sorted(b.worker_pids())
        deploy(tmp_path, "v2", "exit")  # os._exit at import: no BOOT_ERROR message, just a dead process
        mark = b.mark()
        b.signal(signal.SIGHUP)
        b.wait_for(r"replacement for slot=0 failed \(exit code 7\); reload stopped", 30, start=mark)
        wait_until(lambda: sorted(b.worker_pids()) == old, 10, "the failed replacement to be reaped")
        s = status(tmp_path)
        assert sorted((w["pid"], w["state"]) for w in s["workers"]) == [(pid, "ready") for pid in old]
        assert fetch(b).body == b"v1"
        stop_promptly(b, tmp_path, within=5)  # the phantom made this wait graceful + 5 s and exit 1


def test_scale_down_while_a_slot_is_being_replaced(tmp_path):
    deploy(tmp_path, "v1")
    with editable(tmp_path, "--workers", "2", "--log-level", "debug") as b:
        deploy(tmp_path, "v2", "sleep-slot 1 60")  # slot 0's replacement boots, slot 1's hangs at import
        mark = b.mark()
        b.signal(signal.SIGHUP)
        hung = int(b.wait_for(r"spawned worker slot=1 pid=(\d+) generation=1", 30, start=mark).group(1))
        mark = b.mark()
        b.signal(signal.SIGTTOU)
        b.wait_for(r"worker slot=1 pid=\d+ exited \(scale\)", 20, start=mark)
        wait_until(lambda: not pid_alive(hung), 10, "the booting replacement of slot 1 to be dismissed")
        wait_until(lambda: [w["slot"] for w in status(tmp_path)["workers"]] == [0], 10, "one worker left")
        assert {fetch(b).body for _ in range(3)} == {b"v2"}
        assert "IndexError" not in b.log()
        stop_promptly(b, tmp_path, within=5)


def test_reload_during_a_reload_ends_with_every_worker_on_the_newest_code(tmp_path):
    deploy(tmp_path, "v1")
    with editable(tmp_path, "--workers", "2", "--log-level", "debug") as b:
        deploy(tmp_path, "v2", "sleep 1")
        mark = b.mark()
        b.signal(signal.SIGHUP)
        b.wait_for(r"worker slot=0 pid=\d+ exited \(reload\)", 30, start=mark)  # slot 0 now runs v2
        deploy(tmp_path, "v3", "sleep 1")
        b.signal(signal.SIGHUP)  # during the first pass: it must not be dropped
        b.wait_for(r"rolling reload done \(generation 2\)", 60, start=mark)
        wait_until(lambda: len(b.worker_pids()) == 2, 20, "replaced workers to exit")
        s = status(tmp_path)
        assert [(w["slot"], w["generation"], w["state"]) for w in s["workers"]] == [(0, 2, "ready"), (1, 2, "ready")]
        assert {fetch(b).body for _ in range(6)} == {b"v3"}
        assert "already in progress" not in b.log()
        # One line, once every slot serves the generation asked for last: never one per SIGHUP
        done = re.findall(r"rolling reload done \(generation (\d+)\)", b.log())
        assert done == ["2"], done


def test_old_worker_serves_until_its_replacement_is_ready(tmp_path):
    deploy(tmp_path, "v1")
    with editable(tmp_path, "--workers", "1", "--log-level", "debug") as b:
        old = b.worker_pids()[0]
        deploy(tmp_path, "v2", "sleep 3")
        mark = b.mark()
        b.signal(signal.SIGHUP)
        new = int(b.wait_for(r"spawned worker slot=0 pid=(\d+) generation=1", 30, start=mark).group(1))
        started = time.monotonic()
        resp = fetch(b, timeout=10)  # while the replacement sleeps in its import
        assert resp.getheader("X-Worker-Pid") == str(old) and resp.body == b"v1"
        assert time.monotonic() - started < 2.5
        assert f"worker slot=0 pid={new} ready" not in b.log()
        b.wait_for(rf"worker slot=0 pid={new} ready", 30, start=mark)
        b.wait_for(rf"worker slot=0 pid={old} exited \(reload\)", 30, start=mark)
        assert fetch(b).body == b"v2"


def test_control_reload_during_a_reload_reports_done(tmp_path):
    deploy(tmp_path, "v1")
    with editable(tmp_path, "--workers", "2") as b:
        deploy(tmp_path, "v2", "sleep 1")
        cmd = [sys.executable, "-m", "balancer", "reload", "--wait", "--control-socket", str(tmp_path / "ctl.sock")]
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        b.wait_for(r"rolling reload of 2 workers \(generation 1\)", 30)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        out, err = first.communicate(timeout=60)
        assert (first.returncode, out.strip()) == (0, "reloaded (generation 2)"), err  # what now serves
        assert (second.returncode, second.stdout.strip()) == (0, "reloaded (generation 2)"), second.stderr
        assert {w["generation"] for w in status(tmp_path)["workers"]} == {2}


# ---- the master's side of send errors, and ticks that survive their own exceptions -----------------------


class FailingSend:
    def __init__(self, err: int) -> None:
        self.err = err

    def __call__(self, channel, ids, families, fds):
        raise OSError(self.err, os.strerror(self.err))


@pytest.mark.parametrize("err,lost", [(errno.ENOBUFS, False), (errno.ENOMEM, False), (errno.EPIPE, True),
                                      (errno.ECONNRESET, True)])
def test_send_error_rests_or_loses_a_worker_and_its_fds_go_to_another(monkeypatch, err, lost):
    d = Dispatcher(cap=10)
    links = []
    for slot in range(2):
        master_end, worker_end = wire.channel_pair()
        link = Link(slot, master_end)
        link.peer, link.ready = worker_end, True
        links.append(link)
    d.set_links(list(links))
    real = dispatch.handoff.send_handoff
    failing = FailingSend(err)
    monkeypatch.setattr(dispatch.handoff, "send_handoff",
                        lambda ch, *a: (failing if ch is links[0].channel else real)(ch, *a))
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        d.dispatch([(fd, socket.AF_INET)])
        assert not links[0].unacked and [f for f, _ in links[1].unacked.values()] == [fd]
        assert links[0].channel_lost is lost and links[0].resting is not lost
        assert links[0].ready  # the supervisor decides its fate, not a send
        d.mark_overdue(time.monotonic(), 0.5)  # the tick ends a rest, never a lost channel
        assert (d.snapshot()[1][0] > 0) is not lost  # may it take a connection again
    finally:
        d.evict(links[1])
        os.close(fd) if fd_open(fd) else None
        for link in links:
            link.channel.close()
            link.peer.close()


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_a_failing_tick_step_does_not_stop_the_ticks(caplog):
    from balancer.master import Master

    async def scenario():
        master = Master(Config(workers=1))
        calls = {"boom": 0, "after": 0}
        enough = asyncio.Event()

        def boom():
            calls["boom"] += 1
            raise RuntimeError("collect failed")

        def after():
            calls["after"] += 1
            if calls["after"] >= 3:
                enough.set()

        master._every_tick(boom, after)
        await asyncio.wait_for(enough.wait(), 5)
        master._tick.cancel()
        return calls

    calls = asyncio.run(scenario())
    assert calls["boom"] >= 3 and calls["after"] >= 3
    assert "periodic check" in caplog.text and "collect failed" in caplog.text


def test_sigstopped_worker_is_passed_over_then_aborted_and_its_connections_redispatched():
    """The master alone finds the stopped worker: ack overdue, no heartbeat for --timeout, abort, re-dispatch."""
    from tests.test_integration import APP

    timeout = 2.0
    with Balancer("--workers", "2", "--timeout", str(timeout), *APP) as b:
        victim, other = b.worker_pids()
        os.kill(victim, signal.SIGSTOP)  # this test never kills it: the master must
        stopped_at = time.monotonic()
        results: dict[int, object] = {}

        def one(i: int) -> None:
            try:
                resp = fetch(b, f"/?n={i}", timeout=30)
                results[i] = (resp.status, resp.getheader("X-Worker-Pid"), time.monotonic() - stopped_at)
            except OSError as exc:
                results[i] = repr(exc)

        mark = b.mark()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
        for th in threads:
            th.start()
        wait_until(lambda: len(results) >= 5, 20, "the live worker's half")
        assert len(results) < 10, "nothing went to the stopped worker"
        # Once its acks are overdue the stopped worker is passed over: new clients are served at once.
        time.sleep(0.6)
        quick = time.monotonic()
        resp = fetch(b, timeout=5)
        assert resp.status == 200 and resp.getheader("X-Worker-Pid") == str(other)
        assert time.monotonic() - quick < 1.0
        b.wait_for(rf"worker slot=\d pid={victim} sent no heartbeat for [\d.]+s \(--timeout 2\); aborting it",
                   timeout + 5, start=mark)
        b.wait_for(rf"worker slot=\d pid={victim} did not exit in time; SIGKILL", 10, start=mark)
        m = b.wait_for(rf"re-dispatched (\d+) unacknowledged connections of worker slot=\d pid={victim}", 10,
                       start=mark)
        for th in threads:
            th.join(20)
        assert sorted(results) == list(range(10))
        assert all(r[0] == 200 and r[1] != str(victim) for r in results.values()), results
        # The ones parked on the stopped worker waited for --timeout plus the SIGABRT grace, not for ever;
        # the others were answered long before: exactly the re-dispatched ones are late.
        late = {i: r for i, r in results.items() if r[2] >= timeout}
        assert len(late) == int(m.group(1)) >= 1
        assert all(r[2] < timeout + 2 + 3 for r in late.values()), late
        assert not pid_alive(victim)
        wait_until(lambda: len(b.worker_pids()) == 2, 20, "the slot to be refilled")


# ---- under uvloop: a wake-up due now, and every worker killed again and again ---------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_wake_ups_due_within_a_millisecond_neither_raise_nor_are_lost(loop):
    """Two slots backing off to just after now: uvloop's call_later(0) is a Handle without when()."""
    from balancer.supervisor import Supervisor

    factory = pytest.importorskip("uvloop").new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    now = [100.0]
    spawned = []

    def spawn(slot, generation):
        spawned.append(slot)
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")  # out of processes: back off again

    async def scenario():
        sup = Supervisor(Config(workers=2), Dispatcher(8), lambda: None, spawn=spawn, clock=lambda: now[0])
        sup.started_up = True
        sup.not_before = {0: 100.0001, 1: 100.0002}  # due within uvloop's 1 ms timer resolution: call_later(0)
        sup.changed()
        assert spawned == []
        now[0] = 100.001
        for _ in range(100):
            if len(spawned) == 2:
                break
            await asyncio.sleep(0.001)
        assert sorted(spawned) == [0, 1]  # the one wake-up kept for both slots came, and each was tried
        await sup.shutdown()  # no worker ever started: it only cancels the next wake-up

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())


def test_a_reload_asked_while_stopping_is_answered_and_told_to_the_hooks_once():
    """systemd heard RELOADING=1 for it: READY=1 (the hook) must follow, as for any reload that is answered."""
    from balancer.supervisor import Supervisor

    async def scenario():
        sup = Supervisor(Config(workers=1), Dispatcher(8), lambda: None, spawn=lambda slot, generation: None)
        told = []
        sup.on_reload_hooks.append(told.append)
        await sup.shutdown()  # no worker ever started
        future = sup.request_reload()
        return future.result(), told, sup.generation

    assert asyncio.run(scenario()) == (False, [False], 0)


def test_every_worker_killed_again_and_again_under_uvloop_is_no_traceback():
    """kill -9 of all four workers, five times over, on the master's uvloop: each is respawned, nothing raises."""
    from tests.test_integration import APP

    with Balancer("--workers", "4", "--loop", "uvloop", *APP) as b:
        for _ in range(5):
            pids = b.worker_pids()
            assert len(pids) == 4
            mark = b.mark()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            for slot in range(4):
                b.wait_for(rf"worker slot={slot} pid=\d+ ready", 30, start=mark)
            wait_until(lambda: len(b.worker_pids()) == 4 and not set(pids) & set(b.worker_pids()), 10,
                       "the dead workers to be reaped")
        assert fetch(b).status == 200
        assert "Traceback" not in b.log() and "Error" not in b.log(), b.log()


def test_a_worker_that_crashes_after_ready_again_and_again_waits_longer_each_time_and_is_flagged(tmp_path):
    """Each young death after READY doubles the respawn delay, and status calls the slot crash-looping."""
    from tests.test_integration import APP

    with Balancer("--workers", "1", "--control-socket", str(tmp_path / "ctl.sock"), *APP) as b:
        delays = []
        for _ in range(4):
            mark = b.mark()
            with pytest.raises(OSError):  # http.client's RemoteDisconnected is one: the worker is gone
                fetch(b, "/exit")  # os._exit(1) in the handler: a crash of a worker that served
            delays.append(float(b.wait_for(r"worker slot=0 pid=\d+ died \(crash, exit code 1\); "
                                           r"respawning in ([\d.]+)s", 20, start=mark).group(1)))
            b.wait_for(r"worker slot=0 pid=\d+ ready", 30, start=mark)
        assert delays == [0.1, 0.2, 0.4, 0.8], delays
        slot = status(tmp_path)["slots"][0]
        assert slot["crash_looping"] and slot["failures_in_a_row"] == 4 and slot["restarts"] == {"crash": 4}, slot
        assert slot["serving"] is not None and not slot["empty"]  # it serves now, but has not yet stayed up
        text = subprocess.run([sys.executable, "-m", "balancer", "status", "--control-socket",
                               str(tmp_path / "ctl.sock"), "--interval", "0"], capture_output=True, text=True,
                              timeout=30).stdout
        assert "slot 0: CRASH-LOOPING: died 4 times in a row, each soon after starting" in text, text
        assert fetch(b).status == 200
