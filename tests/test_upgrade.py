"""`balancer upgrade` and SIGUSR2 on real processes: the master re-execs in place under load and loses nothing."""

from __future__ import annotations

import array
import json
import os
import re
import signal
import socket
import urllib.request

import pytest

from tests.harness import Balancer
from tests.test_control import ctl
from tests.test_integration import APP, fetch, run_load, wait_until
from tests.test_systemd import NotifySocket

pytestmark = pytest.mark.timeout(240)
PAUSED = re.compile(r"upgrade: master re-executed in place \(pid (\d+), upgrade (\d+)\); accepting paused "
                    r"([\d.]+) ms; the exec took ([\d.]+) ms \(([\d.]+) ms of CPU\), (\d+) connections handed out")
# The pause is the fork of the bridge, and its stop once the new image has imported everything (the exec's
# start-up and imports are not in it: the bridge accepts meanwhile): at most MAX_PAUSE, unless the machine is
# overloaded (load average above its cores), when it may take LOADED_PAUSE.
MAX_PAUSE, LOADED_PAUSE = 0.150, 2.0


def scrape(b: Balancer) -> dict[str, float]:
    """Every sample of the metrics endpoint: 'name{labels}' -> value."""
    with urllib.request.urlopen(f"http://{b.metrics_address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def counters(sample: dict[str, float]) -> dict[str, float]:
    """The samples that must never go back: every *_total, every histogram count and sum."""
    return {k: v for k, v in sample.items() if re.match(r"\w+(_total|_count|_sum|_bucket)\b", k)
            and not k.startswith(("process_", "balancer_worker_cpu_seconds"))}


def upgrade(sock, *extra: str):
    return ctl("upgrade", "--control-socket", str(sock), "--json", *extra)


def pause_allowed() -> float:
    return MAX_PAUSE if os.getloadavg()[0] < (os.cpu_count() or 1) else LOADED_PAUSE


def test_ten_upgrades_under_load_lose_nothing(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "2", "--control-socket", str(sock), "--pid-file", str(tmp_path / "pid"), *APP) as b:
        pids = sorted(b.worker_pids())
        stop_keep, kept, t_keep = run_load(b.url + "/", 16, new_conn=False)
        stop_new, fresh, t_new = run_load(b.url + "/", 4, new_conn=True)
        wait_until(lambda: len(kept) > 200 and len(fresh) > 50, 30, "load to start")
        before = scrape(b)
        started = before["balancer_start_time_seconds"]
        exec_started = before["balancer_master_start_time_seconds"]
        pauses, execs, cpu, bridged = [], [], [], []
        for i in range(1, 11):
            mark, seen = b.mark(), len(kept) + len(fresh)
            r = upgrade(sock, "--wait")
            assert r.returncode == 0, r.stderr + b.log()
            reply = json.loads(r.stdout)
            assert reply["pid"] == b.pid and reply["upgrades"] == i
            m = b.wait_for(PAUSED.pattern, 30, start=mark)
            assert int(m.group(1)) == b.pid and int(m.group(2)) == i
            pauses.append(float(m.group(3)) / 1000)
            execs.append(float(m.group(4)) / 1000)
            cpu.append(float(m.group(5)) / 1000)
            bridged.append(int(m.group(6)))
            wait_until(lambda: len(kept) + len(fresh) > seen + 100, 30, "requests after an upgrade")
            after = scrape(b)
            assert after["balancer_master_upgrades_total"] == i
            assert after["balancer_start_time_seconds"] == started  # the master's start: unchanged
            assert after["balancer_master_start_time_seconds"] > exec_started  # this image's exec
            exec_started = after["balancer_master_start_time_seconds"]
            went_back = {k: (before[k], v) for k, v in counters(after).items() if k in before and v < before[k]}
            assert not went_back, went_back
            assert set(counters(before)) <= set(counters(after))
            before = after
        stop_keep.set()
        stop_new.set()
        t_keep.join(30)
        t_new.join(30)
        assert sorted(b.worker_pids()) == pids  # the same workers, still the master's children
        assert all(ok for ok, _ in kept), f"{sum(not ok for ok, _ in kept)} keep-alive requests failed"
        assert all(ok for ok, _ in fresh), f"{sum(not ok for ok, _ in fresh)} new-connection requests failed"
        assert not [k for k, v in before.items() if k.startswith("balancer_worker_restarts_total") and v]
        assert before["balancer_connections_accepted_total"] >= len(fresh)
        print(f"accepting paused per upgrade (s): {pauses}; exec (s): {execs}, its CPU (s): {cpu}; connections "
              f"the bridge handed out: {bridged}; load average {os.getloadavg()[0]:.1f}")
        assert max(pauses) <= pause_allowed(), pauses
        # The bridge served while the exec ran: with 4 clients opening a connection per request, it handed
        # some out in most upgrades (the new-connection client may be between requests for a short exec).
        assert sum(bridged) > 0, bridged
        assert ctl("status", "--control-socket", str(sock), "--json", "--interval", "0").returncode == 0
        b.signal(signal.SIGTERM)
        assert b.wait(30) == 0
    assert not sock.exists() and not (tmp_path / "pid").exists()  # removed at the exit, not at an exec


def test_sigusr2_upgrades_and_keeps_the_control_socket_and_metrics_address(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "1", "--control-socket", str(sock), *APP) as b:
        pid = fetch(b).getheader("X-Worker-Pid")
        mark = b.mark()
        b.signal(signal.SIGUSR2)
        b.wait_for(PAUSED.pattern, 30, start=mark)
        assert fetch(b).getheader("X-Worker-Pid") == pid
        assert scrape(b)["balancer_master_upgrades_total"] == 1  # same metrics address
        status = json.loads(ctl("status", "--control-socket", str(sock), "--json", "--interval", "0").stdout)
        assert status["pid"] == b.pid and status["upgrades"] == 1 and status["exec_started"] > status["started"]
        assert "upgraded 1 times" in ctl("status", "--control-socket", str(sock), "--interval", "0").stdout
        assert "ignored" not in b.log()


def test_upgrade_to_code_whose_import_fails_changes_nothing(tmp_path):
    shadow = tmp_path / "release"
    shadow.mkdir()
    sock = tmp_path / "ctl.sock"
    # The master's directory is not the checkout: a `balancer` package on PYTHONPATH is what a new image imports.
    with Balancer("--workers", "2", "--control-socket", str(sock), *APP, env={"PYTHONPATH": str(shadow)},
                  preexec=lambda: os.chdir(tmp_path)) as b:
        pids = sorted(b.worker_pids())
        (shadow / "balancer").mkdir()
        (shadow / "balancer" / "__init__.py").write_text("raise ImportError('this release is broken')\n")
        before = scrape(b)
        mark = b.mark()
        r = upgrade(sock)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "this release is broken" in json.loads(r.stdout)["error"]
        line = b.wait_for("upgrade failed, nothing changed", 30, start=mark).string
        assert "ImportError: this release is broken" in line
        mark = b.mark()
        b.signal(signal.SIGUSR2)  # the signal takes the same path: one line, nothing changes
        b.wait_for("upgrade failed, nothing changed", 30, start=mark)
        assert sorted(b.worker_pids()) == pids
        assert fetch(b).status == 200
        after = scrape(b)
        assert after["balancer_master_upgrades_total"] == 0
        assert after["balancer_master_start_time_seconds"] == before["balancer_master_start_time_seconds"]
        assert "re-executed" not in b.log()


def test_failed_exec_keeps_the_old_image_serving(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "2", "--control-socket", str(sock), *APP,
                  env={"BALANCER_UPGRADE_EXECUTABLE": str(tmp_path / "no-such-python")}) as b:
        pids = sorted(b.worker_pids())
        stop, results, t = run_load(b.url + "/", 4, new_conn=True)
        wait_until(lambda: len(results) > 50, 30, "load to start")
        r = upgrade(sock, "--wait")
        assert r.returncode == 1 and "No such file" in json.loads(r.stdout)["error"], r.stdout + r.stderr
        b.wait_for("upgrade failed, the old image serves on", 10)
        seen = len(results)
        wait_until(lambda: len(results) > seen + 50, 30, "requests after the failed exec")
        stop.set()
        t.join(30)
        assert all(ok for ok, _ in results)
        assert sorted(b.worker_pids()) == pids and scrape(b)["balancer_master_upgrades_total"] == 0
        # What the bridge accepted while the exec was tried is counted by the old image too.
        assert scrape(b)["balancer_connections_accepted_total"] >= len(results)
        assert upgrade(sock, "--wait").returncode == 1  # and again: nothing was left half-done
        b.signal(signal.SIGTERM)
        assert b.wait(30) == 0
    assert not sock.exists()


def test_state_of_another_version_rolls_the_workers_and_loses_nothing(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "2", "--control-socket", str(sock), *APP,
                  env={"BALANCER_UPGRADE_WRITE_VERSION": "999"}) as b:
        old = set(b.worker_pids())
        stop, results, t = run_load(b.url + "/", 4, new_conn=True)
        wait_until(lambda: len(results) > 50, 30, "load to start")
        mark = b.mark()
        r = upgrade(sock, "--wait")
        assert r.returncode == 0, r.stderr + b.log()
        b.wait_for("state version 999 from the previous image", 10, start=mark)
        wait_until(lambda: len(set(b.worker_pids())) == 2 and not old & set(b.worker_pids()), 60,
                   "the old workers to be rolled")
        seen = len(results)
        wait_until(lambda: len(results) > seen + 50, 30, "requests after the roll")
        stop.set()
        t.join(30)
        assert all(ok for ok, _ in results), f"{sum(not ok for ok, _ in results)} requests failed"
        assert "died" not in b.log()


def test_systemd_hears_reloading_then_ready_from_the_same_pid_and_gets_the_listener_stored(tmp_path):
    notify = NotifySocket()
    try:
        with Balancer("--workers", "1", "--control-socket", str(tmp_path / "ctl.sock"), *APP,
                      env={"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "400000"}) as b:
            stored, fds = notify_with_fds(notify)
            try:
                assert stored["FDSTORE"] == "1" and stored["FDNAME"] == "listener" and len(fds) == 1
                kept = socket.socket(fileno=os.dup(fds[0]))
                assert kept.getsockname()[1] == b.port  # the very listener: systemd would hand it back
                kept.close()
            finally:
                for fd in fds:
                    os.close(fd)
            assert notify.wait_for("READY")["MAINPID"] == str(b.pid)
            assert upgrade(tmp_path / "ctl.sock", "--wait").returncode == 0
            assert notify.wait_for("RELOADING")["RELOADING"] == "1"
            ready = notify.wait_for("READY")
            assert ready["MAINPID"] == str(b.pid) and ready["STATUS"].startswith("1 workers serving on")
            notify.messages.clear()
            notify.wait_for("WATCHDOG", 2)  # the new image pings the watchdog on: it kept NOTIFY_SOCKET
            assert not [m for m in notify.messages if "FDSTORE" in m]  # stored once, not at every upgrade
    finally:
        notify.sock.close()


def notify_with_fds(notify: NotifySocket) -> tuple[dict[str, str], list[int]]:
    """The first datagram, with the fds it carries (FDSTORE=1 comes before READY=1)."""
    notify.sock.settimeout(20)
    data, ancdata, _, _ = notify.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return dict(line.split("=", 1) for line in data.decode().splitlines()), list(fds)


def test_preload_refuses_with_its_reason(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "1", "--preload", "--control-socket", str(sock), *APP) as b:
        r = upgrade(sock, "--wait")
        assert r.returncode == 1 and "not with --preload" in json.loads(r.stdout)["error"], r.stdout + r.stderr
        assert fetch(b).status == 200 and "re-executed" not in b.log()
