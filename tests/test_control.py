"""`balancer reload|scale|stop|status` against a real master over its 0600 control socket."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading

import pytest

from balancer.config import COALESCE_BUSY
from tests.harness import Balancer, unix_request
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
        r = ctl("status", "--control-socket", str(sock), "--json", "--interval", "0")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["pid"] == b.pid and status["target"] == 2
        assert sorted(w["pid"] for w in status["workers"]) == sorted(b.worker_pids())
        assert {w["state"] for w in status["workers"]} == {"ready"}
        table = ctl("status", "--control-socket", str(sock), "--interval", "0").stdout
        assert f"master pid {b.pid}" in table and "ready" in table

        r = ctl("scale", "3", "--control-socket", str(sock))
        assert r.returncode == 0 and "scaling to 3" in r.stdout
        wait_until(lambda: len(b.worker_pids()) == 3, 20, "the third worker")
        b.wait_for(r"worker slot=2 pid=\d+ ready", 20)

        before = set(b.worker_pids())
        r = ctl("reload", "--wait", "--control-socket", str(sock))  # returns when the rolling reload is done
        assert r.returncode == 0 and r.stdout.strip() == "reloaded (generation 1)", r.stderr
        assert "rolling reload done (generation 1)" in b.log()
        wait_until(lambda: not before & set(b.worker_pids()), 30, "old workers to exit")
        assert fetch(b).status == 200

        r = ctl("scale", "0", "--control-socket", str(sock))
        assert r.returncode == 2 and "at least 1" in r.stderr

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


def ctl_status(sock) -> dict:
    """The master's status as JSON, without the rate sampling wait."""
    return json.loads(ctl("status", "--control-socket", str(sock), "--json", "--interval", "0").stdout)


def make_workers_busy(b: Balancer, sock) -> list[http.client.HTTPConnection]:
    """Idle keep-alive connections, dealt alternately: COALESCE_BUSY per worker; returned once both count them."""
    held = []
    for _ in range(2 * COALESCE_BUSY):
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().read()
        held.append(conn)
    wait_until(lambda: all(w["open"] >= COALESCE_BUSY for w in ctl_status(sock)["workers"]), 10, "busy workers")
    return held


@pytest.mark.parametrize("wait", ["0.05", "0"])
def test_accept_coalesces_only_while_every_worker_is_busy(tmp_path, wait):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "2", "--accept-coalesce", wait, "--keepalive-timeout", "60",
                  "--control-socket", str(sock), *APP) as b:
        for _ in range(4):
            assert fetch(b).status == 200
        assert ctl_status(sock)["coalesced"] == 0  # workers with few connections: every accept goes straight out
        held = make_workers_busy(b, sock)
        slots = [fetch(b).getheader("X-Worker-Slot") for _ in range(4)]  # still served, still round robin
        assert sorted(set(slots)) == ["0", "1"]
        assert (ctl_status(sock)["coalesced"] >= 1) == (wait != "0")
        for conn in held:
            conn.close()


def test_coalescing_waits_chain_while_busy_and_both_listeners_are_read_again_after(tmp_path):
    """Busy workers: the master accepts on the wait's timer alone, for every listener; then it watches them again."""
    sock, path = tmp_path / "ctl.sock", tmp_path / "b.sock"
    with Balancer("--workers", "2", "--accept-coalesce", "0.02", "--keepalive-timeout", "60",
                  "--control-socket", str(sock), "--bind", f"unix:{path}", *APP) as b:
        held = make_workers_busy(b, sock)
        answers: list[bool] = []

        def client(over_unix: bool) -> None:
            for _ in range(15):  # connections keep arriving during the waits: each wait's batch finds some
                if over_unix:
                    answers.append(unix_request(str(path)).startswith(b"HTTP/1.1 200"))
                else:
                    answers.append(fetch(b).status == 200)

        threads = [threading.Thread(target=client, args=(i % 2 == 1,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 8 * 15 and all(answers)
        assert ctl_status(sock)["coalesced"] >= 2
        for conn in held:
            conn.close()
        wait_until(lambda: all(w["open"] < COALESCE_BUSY for w in ctl_status(sock)["workers"]), 10, "idle workers")
        coalesced = ctl_status(sock)["coalesced"]
        for _ in range(3):  # not busy: each one is taken as its listener turns readable, without a wait
            assert fetch(b).status == 200
            assert unix_request(str(path)).startswith(b"HTTP/1.1 200")
        assert ctl_status(sock)["coalesced"] == coalesced


def test_reload_and_scale_are_refused_while_the_first_workers_boot_and_status_answers(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "2", "--control-socket", str(sock), "--backend", "testapp:slow_boot",
                  ready=False, env={"SLOW_BOOT": "30"}) as b:
        wait_until(lambda: b.log().count("slow boot started") == 2, 20, "both workers to start booting")
        for args in (("reload",), ("scale", "3")):
            r = ctl(*args, "--control-socket", str(sock))
            assert r.returncode == 1 and "starting or stopping" in r.stderr, (args, r.stdout, r.stderr)
        status = json.loads(ctl("status", "--control-socket", str(sock), "--json", "--interval", "0").stdout)
        assert status["target"] == 2 and {w["state"] for w in status["workers"]} == {"booting"}, status
        assert b.log().count("slow boot started") == 2  # nothing was started beside the boot
        # a stop acts at once, as SIGTERM does, and stop --wait returns once the master has exited
        r = ctl("stop", "--wait", "--timeout", "20", "--control-socket", str(sock))
        assert (r.returncode, r.stdout.strip()) == (0, "stopped"), r.stderr
        assert b.wait(5) == 0


def test_stop_wait_on_a_master_already_stopping_waits_for_its_exit(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "1", "--control-socket", str(sock), *APP) as b:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            mark = b.mark()
            slow = pool.submit(fetch, b, "/slow?s=2")
            b.wait_for("slow request started", 10, start=mark)
            b.signal(signal.SIGTERM)  # draining: the slow request holds the master for about 2 s
            b.wait_for("graceful shutdown", 10, start=mark)
            r = ctl("stop", "--wait", "--timeout", "20", "--control-socket", str(sock))
            assert (r.returncode, r.stdout.strip()) == (0, "stopped"), r.stderr
            assert b.proc.poll() == 0 and slow.result(10).status == 200


def test_scale_below_one_is_a_usage_error_and_a_closed_pipe_is_not_an_error(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "1", "--control-socket", str(sock), *APP):
        for n in ("0", "-1", "abc"):
            r = ctl("scale", n, "--control-socket", str(sock))
            expect = "whole number" if n == "abc" else "at least 1"
            assert r.returncode == 2 and expect in r.stderr and r.stderr.count("\n") == 1, (n, r.stderr)
        for args in (("status", "--interval", "0"), ("status", "--json", "--interval", "0"), ("scale", "1")):
            read_end, write_end = os.pipe()
            os.close(read_end)  # the reader left before a byte was written (`| head -0`): every write fails
            try:
                r = subprocess.run([sys.executable, "-m", "balancer", *args, "--control-socket", str(sock)],
                                   stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30)
            finally:
                os.close(write_end)
            assert r.returncode == 0 and r.stderr == "", (args, r.stderr)


# ---- the default control-socket directory and the client's trust in what answers there -------------------

NOBODY = 65534  # a uid that is not ours (the tests run as root; setuid needs no user entry)


def private_env(tmp_path) -> dict:
    """No XDG_RUNTIME_DIR: the default control sockets go to $TMPDIR/balancer-<uid>, here under tmp_path."""
    return {**os.environ, "XDG_RUNTIME_DIR": "", "TMPDIR": str(tmp_path)}


def run_env(env: dict, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "balancer", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, start_new_session=True)


def error_lines(stderr: str) -> list[str]:
    """stderr without the master's INFO/WARNING log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not re.search(r"\] (INFO|WARNING) ", line)]


def test_default_directory_is_made_0700_and_the_client_finds_the_master_there(tmp_path):
    runtime = tmp_path / f"balancer-{os.getuid()}"
    with Balancer("--workers", "1", env={"XDG_RUNTIME_DIR": "", "TMPDIR": str(tmp_path)}) as b:
        assert stat.S_IMODE(os.lstat(runtime).st_mode) == 0o700
        assert os.listdir(runtime) == [b.address.replace(":", "-") + ".sock"]
        r = run_env(private_env(tmp_path), "status", "--bind", b.address, "--json", "--interval", "0")
        assert r.returncode == 0 and json.loads(r.stdout)["pid"] == b.pid, r.stderr
    assert os.listdir(runtime) == []


@pytest.mark.parametrize("owner,mode", [("us", 0o777), ("us", 0o750), ("nobody", 0o700)],
                         ids=["ours-0777", "ours-0750", "nobodys-0700"])
def test_a_default_directory_others_could_write_to_is_refused(tmp_path, owner, mode):
    runtime = tmp_path / f"balancer-{os.getuid()}"
    runtime.mkdir()
    os.chmod(runtime, mode)
    if owner == "nobody":
        os.chown(runtime, NOBODY, NOBODY)
    env = private_env(tmp_path)
    r = run_env(env, "--bind", "127.0.0.1:0", "--metrics-bind", "none", "--workers", "1")
    assert r.returncode == 2, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"balancer: error: control socket directory {runtime} "), lines
    assert (f"belongs to uid {NOBODY}" if owner == "nobody" else f"has mode {mode:04o}") in lines[0]
    assert os.listdir(runtime) == [] and stat.S_IMODE(os.lstat(runtime).st_mode) == mode  # nothing made there
    r = run_env(env, "stop")  # the client does not trust it either
    assert r.returncode == 2 and f"control socket directory {runtime}" in r.stderr and not r.stdout, r


def serve_as_another_user(path: str, uid: int) -> int:
    """Fork a fake master that listens on path as uid and answers every request with ok; its pid."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(ready_r)
            os.setgid(uid)
            os.setuid(uid)
            listener.listen(4)  # a listener's peer credentials are those in effect at listen()
            os.write(ready_w, b"x")
            listener.settimeout(30)
            while True:
                conn, _ = listener.accept()
                try:
                    conn.settimeout(5)
                    conn.recv(4096)
                    conn.sendall(b'{"ok": true, "target": 9}\n')
                except OSError:
                    pass
                conn.close()
        finally:
            os._exit(0)
    listener.close()
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"  # listening: a refused connect would not test the check
    os.close(ready_r)
    return pid


def test_the_client_refuses_a_fake_master_run_by_another_user(tmp_path):
    runtime = tmp_path / f"balancer-{os.getuid()}"
    runtime.mkdir(mode=0o700)
    fake = str(runtime / "127.0.0.1-8000.sock")  # where `balancer stop` looks by default
    pid = serve_as_another_user(fake, NOBODY)
    try:
        with socket.socket(socket.AF_UNIX) as probe:  # the fake really answers
            probe.connect(fake)
            probe.sendall(b"{}\n")
            assert probe.recv(100).startswith(b'{"ok": true')
        for args in (("stop",), ("scale", "9"), ("status",), ("stop", "--control-socket", fake)):
            r = run_env(private_env(tmp_path), *args)
            assert r.returncode == 2, (args, r)
            assert "stopping" not in r.stdout and "scaling" not in r.stdout and not r.stdout, (args, r)
            assert r.stderr.strip() == (f"balancer: error: {fake} is served by a process of uid {NOBODY}, not by us "
                                        f"(uid {os.getuid()}): not our master; nothing was sent"), (args, r)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
