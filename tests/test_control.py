"""`balancer reload|scale|stop|status` against a real master over its 0600 control socket."""

from __future__ import annotations

import http.client
import json
import os
import stat
import subprocess
import sys

import pytest

from balancer.config import COALESCE_BUSY
from tests.harness import Balancer
from tests.test_integration import APP, fetch, run_cli, wait_until

pytestmark = pytest.mark.timeout(90)


def ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "balancer", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_status_scale_reload_stop(tmp_path):
    sock, pidfile = tmp_path / "ctl.sock", tmp_path / "master.pid"
    with Balancer("--workers", "2", "--control-socket", str(sock), "--pid-file", str(pidfile), *APP) as b:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert pidfile.read_text().strip() == str(b.pid)
        r = ctl("status", "--control-socket", str(sock), "--json")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["pid"] == b.pid and status["target"] == 2
        assert sorted(w["pid"] for w in status["workers"]) == sorted(b.worker_pids())
        assert {w["state"] for w in status["workers"]} == {"ready"}
        table = ctl("status", "--control-socket", str(sock)).stdout
        assert f"master pid {b.pid}" in table and "ready" in table

        r = ctl("scale", "3", "--control-socket", str(sock))
        assert r.returncode == 0 and "scaling to 3" in r.stdout
        wait_until(lambda: len(b.worker_pids()) == 3, 20, "the third worker")
        b.wait_for(r"worker slot=2 pid=\d+ ready", 20)

        before = set(b.worker_pids())
        r = ctl("reload", "--control-socket", str(sock))  # returns when the rolling reload is done
        assert r.returncode == 0 and r.stdout.strip() == "reloaded", r.stderr
        wait_until(lambda: not before & set(b.worker_pids()), 30, "old workers to exit")
        assert fetch(b).status == 200

        r = ctl("scale", "0", "--control-socket", str(sock))
        assert r.returncode == 1 and "at least 1" in r.stderr

        r = ctl("stop", "--control-socket", str(sock))
        assert r.returncode == 0
        assert b.wait(30) == 0
    assert not sock.exists() and not pidfile.exists()


def test_no_master_is_a_clear_error(tmp_path):
    r = ctl("status", "--control-socket", str(tmp_path / "nothing.sock"))
    assert r.returncode == 2
    assert f"no balancer master at {tmp_path / 'nothing.sock'}" in r.stderr


def test_second_master_on_the_same_control_socket_refuses(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "1", "--control-socket", str(sock)) as b:
        r = run_cli("--bind", "127.0.0.1:0", "--control-socket", str(sock))
        assert r.returncode == 2 and "belongs to a running master" in r.stderr
        assert fetch(b).status == 200  # the first master is untouched


@pytest.mark.parametrize("wait", ["0.05", "0"])
def test_accept_coalesces_only_while_every_worker_is_busy(tmp_path, wait):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "2", "--accept-coalesce", wait, "--keepalive-timeout", "60",
                  "--control-socket", str(sock), *APP) as b:
        def status() -> dict:
            return json.loads(ctl("status", "--control-socket", str(sock), "--json").stdout)

        for _ in range(4):
            assert fetch(b).status == 200
        assert status()["coalesced"] == 0  # workers with few connections: every accept goes straight out
        held = []  # idle keep-alive connections, dealt alternately: COALESCE_BUSY per worker
        for _ in range(2 * COALESCE_BUSY):
            conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
            conn.request("GET", "/")
            assert conn.getresponse().read()
            held.append(conn)
        wait_until(lambda: all(w["open"] >= COALESCE_BUSY for w in status()["workers"]), 10, "busy workers")
        slots = [fetch(b).getheader("X-Worker-Slot") for _ in range(4)]  # still served, still round robin
        assert sorted(set(slots)) == ["0", "1"]
        assert (status()["coalesced"] >= 1) == (wait != "0")
        for conn in held:
            conn.close()


def test_reload_and_scale_are_refused_while_the_first_workers_boot_and_status_answers(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "2", "--control-socket", str(sock), "--backend", "testapp:slow_boot",
                  ready=False, env={"SLOW_BOOT": "30"}) as b:
        wait_until(lambda: b.log().count("slow boot started") == 2, 20, "both workers to start booting")
        for args in (("reload",), ("scale", "3")):
            r = ctl(*args, "--control-socket", str(sock))
            assert r.returncode == 1 and "starting or stopping" in r.stderr, (args, r.stdout, r.stderr)
        status = json.loads(ctl("status", "--control-socket", str(sock), "--json").stdout)
        assert status["target"] == 2 and {w["state"] for w in status["workers"]} == {"booting"}, status
        assert b.log().count("slow boot started") == 2  # nothing was started beside the boot
