"""`balancer status|reload|stop` with no options find this user's masters, however they were started."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from balancer.control_show import master_state
from tests.harness import HERE, Balancer
from tests.test_faults import EDITABLE, deploy
from tests.test_integration import wait_until

pytestmark = pytest.mark.timeout(90)

ONE = ("--workers", "1", "--metrics-bind", "none")


def isolated(tmp_path) -> dict:
    """No XDG_RUNTIME_DIR: control sockets go to $TMPDIR/balancer-<uid>, here under tmp_path, away from other tests."""
    return {"XDG_RUNTIME_DIR": "", "TMPDIR": str(tmp_path)}


def ctl(env: dict, *args: str, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "balancer", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, stdin=stdin)


def status(env: dict, *args: str) -> dict:
    r = ctl(env, "status", "--json", "--interval", "0", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class Activated(Balancer):
    """A master started as systemd socket activation starts it: the listening socket at fd 3, LISTEN_PID/FDS set."""

    def __init__(self, listener: socket.socket, *args: str, env: dict) -> None:
        fd = listener.fileno()
        script = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&"$FD" {FD}<&-'
        cmd = ["bash", "-c", script, "bash", sys.executable, "-m", "balancer", "--app-dir", str(HERE / "apps"), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, pass_fds=(fd,),
                                     env={**os.environ, **env, "FD": str(fd)})
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = self.metrics_address = ""
        self.wait_for(r"workers serving on 127\.0\.0\.1:\d+ \(systemd fd 3\)")


def plant_stale(runtime: str) -> list[str]:
    """What a SIGKILLed master leaves: a socket nobody listens on (not new) and a link to a socket gone."""
    os.makedirs(runtime, mode=0o700, exist_ok=True)
    dead = os.path.join(runtime, "127.0.0.1-1.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(dead)
    os.utime(dead, (time.time() - 60, time.time() - 60))
    link = os.path.join(runtime, "pid-999999999.sock")
    os.symlink(os.path.join(runtime, "gone.sock"), link)
    return [dead, link]


def test_status_finds_each_master_however_it_was_started(tmp_path):
    env = isolated(tmp_path)
    runtime = str(tmp_path / f"balancer-{os.getuid()}")
    stale = plant_stale(runtime)
    unix, elsewhere = str(tmp_path / "app.sock"), str(tmp_path / "elsewhere.sock")
    inherited = socket.create_server(("127.0.0.1", 0))
    with inherited, \
            Balancer(*ONE, "--bind", "localhost:0", env=env) as a, \
            Balancer(*ONE, "--bind", ":0", "--name", "beta", env=env) as b, \
            Balancer(*ONE, "--bind", f"unix:{unix}", "--control-socket", elsewhere, env=env) as c, \
            Activated(inherited, *ONE, "--name", "sd", env=env) as d:
        masters = {m.pid: m for m in (a, b, c, d)}
        # A command for one master, several masters and no tty to ask on: the list, and what to pass.
        r = ctl(env, "reload")
        assert r.returncode == 2 and not r.stdout, r
        assert "4 balancer masters are running" in r.stderr and "pass --name or --pid" in r.stderr, r.stderr
        for pid in masters:
            assert f"pid {pid}" in r.stderr
        assert all(not os.path.lexists(path) for path in stale)  # what dead masters left is cleaned on the way
        assert {m["pid"] for m in json.loads(ctl(env, "ls", "--json").stdout)} == set(masters)
        # Each one picked by what the operator knows about it.
        first = status(env, "--pid", str(a.pid))
        assert first["name"] == first["listening"][0] == f"127.0.0.1:{a.port}"  # the default name: the first bind
        localhost_port = int(first["listening"][1].rsplit(":", 1)[1])
        assert status(env, "--bind", f"localhost:{localhost_port}")["pid"] == a.pid
        second = status(env, "--name", "beta")
        assert second["pid"] == b.pid and second["name"] == "beta"
        wildcard_port = int(second["listening"][1].rsplit(":", 1)[1])
        assert second["listening"][1] == f"0.0.0.0:{wildcard_port}"  # what `--bind :PORT` binds
        assert status(env, "--bind", f":{wildcard_port}")["pid"] == b.pid
        assert status(env, "--bind", f"unix:{unix}")["pid"] == c.pid  # its control socket is elsewhere: a link
        activated = status(env, "--name", "sd")
        inherited_address = "127.0.0.1:%d" % inherited.getsockname()[1]
        assert activated["pid"] == d.pid and activated["listening"] == [inherited_address]
        assert status(env, "--bind", inherited_address)["pid"] == d.pid  # found by the address systemd bound
        r = ctl(env, "run", "--bind", "127.0.0.1:0", *ONE, "--name", "beta")  # names are unique per user
        assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
            f"balancer: error: a master named 'beta' is already running (control socket {runtime}/beta.sock); "
            "pass another --name"), r.stderr
        r = ctl(env, "status", "--name", "nobody")
        assert r.returncode == 2 and "no running balancer master matches --name nobody" in r.stderr
        # On a terminal it asks which one.
        primary, secondary = os.openpty()
        try:
            os.write(primary, b"beta\n")
            r = ctl(env, "reload", stdin=secondary)
        finally:
            os.close(primary)
            os.close(secondary)
        assert r.returncode == 0 and r.stdout.strip() == "reload started (generation 1)", r
        assert "which one?" in r.stderr and f"pid {d.pid}" in r.stderr
        assert {m["pid"]: m["generation"] for m in json.loads(ctl(env, "ls", "--json").stdout)} == {
            pid: int(pid == b.pid) for pid in masters}  # beta was the one picked
        # stop --wait returns once the master is gone: its exit status is there to collect at once.
        for m in (d, c, b, a):
            r = ctl(env, "stop", "--wait", "--pid", str(m.pid))
            assert r.returncode == 0 and r.stdout.strip() == "stopped", r
            assert m.proc.poll() == 0, m.log()
        assert os.listdir(runtime) == []  # sockets and the link removed by their masters
    r = ctl(env, "status")
    assert r.returncode == 2 and f"no balancer master of uid {os.getuid()} is running" in r.stderr


def test_ls_and_status_without_a_selector_list_every_master(tmp_path):
    env = isolated(tmp_path)
    r = ctl(env, "ls")
    assert r.returncode == 0 and not r.stdout, r  # none: nothing to list is no error
    assert r.stderr == f"balancer: no balancer master of uid {os.getuid()} is running\n"
    assert ctl(env, "ls", "--json").stdout == "[]\n"
    with Balancer(*ONE, "--name", "alpha", env=env) as a, \
            Balancer("--workers", "2", "--metrics-bind", "none", "--bind", f"unix:{tmp_path / 'b.sock'}", env=env) as b:
        r = ctl(env, "reload", "--wait", "--name", "alpha")  # one of them on a newer generation
        assert r.returncode == 0, r
        table = ctl(env, "ls")
        assert table.returncode == 0 and table.stderr == "", table
        header, *rows = table.stdout.splitlines()
        assert header.split() == ["NAME", "PID", "WORKERS", "GEN", "STATE", "UPTIME", "LISTENING"], header
        b_name = f"127.0.0.1:{b.port}"  # the default name: the first bind
        assert sorted(row.split()[:5] for row in rows) == sorted([
            [b_name, str(b.pid), "2/2", "0", "serving"], ["alpha", str(a.pid), "1/1", "1", "serving"]]), rows
        b_row = next(row for row in rows if row.startswith(b_name))
        assert b_row.endswith(f"{b_name}, unix:{tmp_path / 'b.sock'}") and re.search(r" \d+s ", b_row), b_row
        listed = {m["pid"]: m for m in json.loads(ctl(env, "ls", "--json").stdout)}
        assert set(listed) == {a.pid, b.pid}
        assert listed[a.pid]["name"] == "alpha" and listed[a.pid]["listening"] == [a.address]
        assert (listed[a.pid]["target"], listed[a.pid]["ready"], listed[a.pid]["generation"]) == (1, 1, 1)
        assert listed[b.pid]["listening"] == [b_name, f"unix:{tmp_path / 'b.sock'}"] and listed[b.pid]["target"] == 2
        assert all(m["uptime"] > 0 and os.path.exists(m["control_socket"]) for m in listed.values())
        # status with no selector: the same list, not an error; with a selector, that master's workers.
        r = ctl(env, "status", "--interval", "0")
        assert r.returncode == 0 and r.stdout.splitlines()[0] == header, r
        assert sorted(row.split()[:5] for row in r.stdout.splitlines()[1:]) == sorted(row.split()[:5] for row in rows)
        assert r.stderr == "balancer: several masters run: pass --name or --pid for one's workers\n", r.stderr
        r = ctl(env, "status", "--json", "--interval", "0")
        assert r.returncode == 0 and {m["pid"] for m in json.loads(r.stdout)} == {a.pid, b.pid}, r
        assert status(env, "--name", "alpha")["workers"][0]["generation"] == 1
        a.signal(signal.SIGTERM)
        assert a.wait(20) == 0
        only = status(env)  # one master left: status shows it, as before
        assert only["pid"] == b.pid and len(only["workers"]) == 2


@pytest.mark.parametrize("info,state", [
    ({"stopping": True, "booted": True, "generation": 0, "serving_generation": 0}, "stopping"),
    ({"stopping": False, "booted": False, "generation": 0, "serving_generation": None}, "starting"),
    ({"stopping": False, "booted": True, "generation": 0, "serving_generation": None}, "degraded"),
    ({"stopping": False, "booted": True, "generation": 2, "serving_generation": 2}, "serving"),
    ({"stopping": False, "booted": True, "generation": 2, "serving_generation": 1}, "reloading"),
    ({"stopping": False, "booted": True, "generation": 2, "serving_generation": 1, "reload_failed": True},
     "reload-failed"),
])
def test_ls_names_where_each_master_stands_in_one_word(info, state):
    assert master_state(info) == state


def load(url: str, seconds: float) -> int:
    """Send requests one after another for `seconds`; how many were answered."""
    done, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()
        done += 1
    return done


def test_status_shows_rates_restarts_and_empty_crash_looping_slots(tmp_path):
    env = isolated(tmp_path)
    (tmp_path / "editable.py").write_text(EDITABLE)
    deploy(tmp_path, "v1")
    with Balancer("--workers", "2", "--metrics-bind", "none", "--app-dir", str(tmp_path), "--backend",
                  "editable:handler", env=env) as b:
        answered = []
        driver = threading.Thread(target=lambda: answered.append(load(b.url + "/", 2.5)))
        driver.start()
        try:
            r = ctl(env, "status", "--json", "--interval", "1.5")
        finally:
            driver.join()
        assert r.returncode == 0, r.stderr
        now = json.loads(r.stdout)
        assert 1.4 < now["interval"] < 3 and now["uptime"] > 0 and now["master"]["rss"] > 1 << 20
        assert all(w["rss"] > 1 << 20 and w["cpu_percent"] is not None for w in now["workers"]), now
        assert sum(w["requests_per_second"] or 0 for w in now["workers"]) > 0, now  # measured, not lifetime totals
        assert sum(w["cpu_percent"] for w in now["workers"]) > 0, now
        assert answered[0] > 0
        # A crash is a restart of its slot.
        victim = next(w for w in now["workers"] if w["slot"] == 0)
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(lambda: status(env)["slots"][0]["serving"] not in (None, victim["pid"]), 20, "respawn")
        assert status(env)["slots"][0]["restarts"] == {"crash": 1}
        # A slot whose worker keeps dying at boot is empty and crash-looping, the other one serves on.
        deploy(tmp_path, "v1", boot="exit")
        os.kill(next(w["pid"] for w in now["workers"] if w["slot"] == 1), signal.SIGKILL)
        wait_until(lambda: status(env)["slots"][1]["crash_looping"], 30, "slot 1 to crash-loop")
        slots = status(env)["slots"]
        assert slots[1]["empty"] and slots[1]["failures_in_a_row"] >= 3 and slots[1]["serving"] is None
        assert not slots[0]["empty"] and not slots[0]["crash_looping"]
        table = ctl(env, "status", "--interval", "0").stdout
        assert "slot 1: EMPTY: no ready worker" in table and "CRASH-LOOPING" in table, table
        assert "slot 0: restarts: 1 crash" in table, table
        deploy(tmp_path, "v1")
        wait_until(lambda: not status(env)["slots"][1]["empty"], 30, "slot 1 to recover")


def test_reload_returns_once_started_and_with_wait_once_the_new_code_serves(tmp_path):
    env = isolated(tmp_path)
    (tmp_path / "editable.py").write_text(EDITABLE)
    deploy(tmp_path, "v1")
    with Balancer("--workers", "2", "--metrics-bind", "none", "--app-dir", str(tmp_path), "--backend",
                  "editable:handler", "--shutdown-delay", "2", env=env) as b:
        def versions() -> set[str]:
            return {urllib.request.urlopen(b.url + "/", timeout=10).read().decode() for _ in range(4)}

        # A shell with $XDG_RUNTIME_DIR still finds a master started without it (sudo -u, cron).
        xdg = tmp_path / "xdg"
        xdg.mkdir(mode=0o700)
        assert status({**env, "XDG_RUNTIME_DIR": str(xdg)})["pid"] == b.pid
        assert os.listdir(xdg) == []  # the client creates nothing
        deploy(tmp_path, "v2", boot="sleep 2")  # the new code takes a while to load
        started = time.monotonic()
        r = ctl(env, "reload")
        assert r.returncode == 0 and r.stdout.strip() == "reload started (generation 1)", r
        assert time.monotonic() - started < 2  # it did not wait for the replacements
        assert versions() == {"v1"}
        assert {w["generation"] for w in status(env)["workers"] if w["state"] == "ready"} == {0}

        deploy(tmp_path, "v3", boot="sleep 1")
        r = ctl(env, "reload", "--wait")
        assert r.returncode == 0 and r.stdout.strip() == "reloaded (generation 2)", r
        assert versions() == {"v3"}  # returned once the new code serves, in every slot
        workers = status(env)["workers"]
        assert {(w["generation"], w["state"]) for w in workers if w["state"] != "draining"} == {(2, "ready")}
        # stop --wait gives up after --timeout while the master still serves out its --shutdown-delay.
        r = ctl(env, "stop", "--wait", "--timeout", "0.5")
        assert r.returncode == 1 and r.stderr.strip() == f"balancer: error: master pid {b.pid} still running after 0.5s"
        assert b.proc.poll() is None
        assert b.wait(20) == 0
