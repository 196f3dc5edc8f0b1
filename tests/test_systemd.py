"""systemd: socket activation through systemd-socket-activate, sd_notify to a stand-in NOTIFY_SOCKET, the units."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from balancer.cli import parse_config
from tests.harness import HERE, Balancer
from tests.test_integration import APP, fetch

pytestmark = pytest.mark.timeout(60)

UNITS = HERE.parent / "deploy" / "systemd"
# The backend shows what it sees of systemd's variables: only the master may speak for the service.
ENV_APP = """import os
from aiohttp import web


async def handler(request):
    return web.Response(text=" ".join(f"{k}={os.environ.get(k, '-')}" for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC")))
"""
KILL_GRACE = 2.0  # seconds the master gives a worker past --graceful-timeout before SIGKILL


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET, on an abstract name as systemd's own."""

    def __init__(self) -> None:
        self.name = f"@balancer-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float = 20) -> dict[str, str]:
        """The next datagram (after those already returned) that sets key."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                raise AssertionError(f"no {key} in {timeout}s; got {self.messages}") from None
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if key in message:
                return message


def test_socket_activated_master_serves_and_tells_systemd_each_state(tmp_path):
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (apt package systemd; tests/run.sh installs it)")
    notify = NotifySocket()
    path = tmp_path / "http.sock"
    (tmp_path / "envapp.py").write_text(ENV_APP)
    cmd = [activate, "-l", str(path), "-E", f"NOTIFY_SOCKET={notify.name}", "-E", "WATCHDOG_USEC=300000",
           sys.executable, "-m", "balancer", "--workers", "2", "--metrics-bind", "127.0.0.1:0",
           "--control-socket", str(tmp_path / "control.sock"), "--app-dir", str(tmp_path),
           "--backend", "envapp:handler"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert "Listening on" in proc.stderr.readline()
        # systemd-socket-activate starts the master on the first connection, with the socket as fd 3.
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(20)
            client.connect(str(path))
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            response = client.makefile("rb").read()
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"\r\n\r\nNOTIFY_SOCKET=- WATCHDOG_USEC=-")
        ready = notify.wait_for("READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"] == f"2 workers serving on unix:{path} (systemd fd 3)"  # its address, and whence
        assert notify.wait_for("WATCHDOG", 2)["WATCHDOG"] == "1"  # every 0.15 s asked; the master ticks at 0.25 s

        os.kill(proc.pid, signal.SIGHUP)
        reloading = notify.wait_for("RELOADING")
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading["RELOADING"] == "1" and 0 <= usec - int(reloading["MONOTONIC_USEC"]) < 10_000_000
        assert notify.wait_for("READY")["STATUS"] == f"2 workers serving on unix:{path} (systemd fd 3)"  # reloaded

        os.kill(proc.pid, signal.SIGTERM)
        assert notify.wait_for("STOPPING")["STOPPING"] == "1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: only what this test started
            proc.wait(5)
        proc.stderr.close()
        notify.sock.close()


def test_a_notify_socket_nobody_reads_is_one_warning_and_serving_goes_on():
    gone = f"@balancer-test-nobody-{uuid.uuid4().hex}"
    with Balancer("--workers", "1", *APP, env={"NOTIFY_SOCKET": gone, "WATCHDOG_USEC": "100000"}) as b:
        mark = b.mark()
        b.signal(signal.SIGHUP)  # RELOADING=1 and READY=1 fail too, and every tick's WATCHDOG=1
        b.wait_for("rolling reload done", 30, start=mark)
        assert fetch(b).status == 200
        warned = [line for line in b.lines if "systemd notify" in line]
        # the first datagram is FDSTORE=1 (its TCP listener for systemd's fd store), then READY=1
        assert len(warned) == 1 and "FDSTORE=1 failed" in warned[0], b.log()


def test_a_sighup_during_a_reload_delays_ready_until_every_slot_serves_the_newest_code(tmp_path):
    from tests.test_faults import deploy, status

    notify = NotifySocket()
    deploy(tmp_path, "v1")
    try:
        with Balancer("--workers", "2", "--app-dir", str(tmp_path), "--backend", "editable:handler",
                      "--control-socket", str(tmp_path / "ctl.sock"), env={"NOTIFY_SOCKET": notify.name}) as b:
            notify.wait_for("READY")
            deploy(tmp_path, "v2", "sleep 1")  # each new worker takes a second to import the new code
            mark = b.mark()
            b.signal(signal.SIGHUP)
            notify.wait_for("RELOADING")
            # Slot 0 runs generation 1 and slot 1's replacement boots: a second SIGHUP now raises the generation.
            b.wait_for(r"worker slot=0 pid=\d+ exited \(reload\)", 30, start=mark)
            deploy(tmp_path, "v3", "sleep 1")
            b.signal(signal.SIGHUP)
            notify.wait_for("RELOADING")
            ready = notify.wait_for("READY", 30)
            now = status(tmp_path)  # right after READY=1: what serves then
            assert ready["STATUS"].startswith("2 workers serving on"), ready
            assert (now["generation"], now["serving_generation"]) == (2, 2), now["workers"]
            assert {fetch(b).body for _ in range(4)} == {b"v3"}
            done = re.findall(r"rolling reload done \(generation (\d+)\)", b.log())
            assert done == ["2"], done  # one line, for the generation asked for last
            with pytest.raises(AssertionError, match="no READY"):  # and one READY=1 for both SIGHUPs
                notify.wait_for("READY", 1)
    finally:
        notify.sock.close()


def test_no_watchdog_pings_for_another_pid(tmp_path):
    from balancer.systemd import watchdog_interval

    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}, 42) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "42"}, 42) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "43"}, 42) == 0.0
    assert watchdog_interval({}, 42) == 0.0


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNITS / name)
    return parser


def test_the_service_unit_runs_options_the_cli_takes_and_stops_within_its_timeout(tmp_path):
    service = unit("balancer.service")["Service"]
    assert service["Type"] in ("notify", "notify-reload") and service["KillMode"] == "mixed"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID" and "WatchdogSec" in service
    # The real CLI parser and validation; --app-dir must exist, and the unit's is the WorkingDirectory.
    assert service["WorkingDirectory"] in service["ExecStart"]
    argv = shlex.split(service["ExecStart"].replace(service["WorkingDirectory"], str(tmp_path)))[1:]
    config = parse_config(argv)
    stop_within = float(re.fullmatch(r"(\d+)s?", service["TimeoutStopSec"]).group(1))
    assert stop_within >= config.graceful_timeout + config.shutdown_delay + KILL_GRACE
    assert unit("balancer.socket")["Socket"]["ListenStream"]


def test_systemd_analyze_verifies_both_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's program exists: point it at the balancer this test runs.
    program = shutil.which("balancer") or sys.executable
    text = (UNITS / "balancer.service").read_text()
    (tmp_path / "balancer.service").write_text(re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={program}", text))
    shutil.copy(UNITS / "balancer.socket", tmp_path / "balancer.socket")
    proc = subprocess.run([analyze, "verify", str(tmp_path / "balancer.socket"), str(tmp_path / "balancer.service")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr  # an unknown key is only a warning


@pytest.mark.parametrize("kind", ["file", "udp", "not listening"])
def test_an_inherited_fd_that_is_no_listening_stream_socket_is_one_line_and_exit_2(tmp_path, kind):
    from tests.test_startup import assert_one_error_line

    if kind == "file":
        held = open(tmp_path / "plain", "w+")
    else:
        held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
        held.bind(("127.0.0.1", 0))
    with held:
        fd = held.fileno()
        script = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&"$FD" {FD}<&-'
        r = subprocess.run(["bash", "-c", script, "bash", sys.executable, "-m", "balancer", "--metrics-bind",
                            "none", "--control-socket", str(tmp_path / "control.sock")],
                           pass_fds=(fd,), env={**os.environ, "FD": str(fd)}, capture_output=True, text=True,
                           timeout=30, start_new_session=True)
    expected = "is not a socket" if kind == "file" else "is not a listening TCP or unix stream socket"
    assert_one_error_line(r, 2, f"systemd fd 3 {expected}")
    assert sorted(os.listdir(tmp_path)) == (["plain"] if kind == "file" else [])
