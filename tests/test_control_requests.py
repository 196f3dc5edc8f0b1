"""The control socket against bad, huge, deep and out-of-range requests, and a stop while a client waits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from balancer.config import MAX_WORKERS
from balancer.control import MAX_DEPTH, MAX_REQUEST
from tests.harness import Balancer
from tests.test_control import ctl
from tests.test_integration import wait_until

pytestmark = pytest.mark.timeout(90)


def raw_request(sock_path, data: bytes, timeout: float = 5.0) -> dict:
    """Send raw bytes to the control socket; the master's reply, which must come within timeout."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(data)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, f"the master closed without answering {data[:60]!r}"
            reply += chunk
    return json.loads(reply)


def served_connections(sock_path) -> int:
    """Connections the master has on its control socket: /proc/net/unix names the path on its side of each."""
    with open("/proc/net/unix") as f:
        return sum(1 for line in f if line.split()[-1] == str(sock_path) and line.split()[5] == "03")


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_stop_ends_a_waiting_status_client_with_one_line_and_no_traceback(tmp_path, as_json):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "1", "--control-socket", str(sock)) as b:
        client = subprocess.Popen([sys.executable, "-m", "balancer", "status", "--interval", "8",
                                   "--control-socket", str(sock), *(["--json"] if as_json else [])],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: served_connections(sock) == 1, 10, "the status client to connect")
            stopped_at = time.monotonic()
            b.signal(signal.SIGTERM)
            out, err = client.communicate(timeout=20)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        assert time.monotonic() - stopped_at < 6  # ended by the stop, not by its 8 s interval
        assert b.wait(20) == 0
        assert client.returncode == 2, (out, err)
        if as_json:
            reply = json.loads(out)
            assert reply == {"ok": False, "error": "master stopped", "stopped": True, "pid": b.pid}, reply
            assert err == ""
        else:
            assert out == "" and err == f"balancer: error: master stopped (pid {b.pid}) before answering\n", err
        assert "Traceback" not in b.log() and "CancelledError" not in b.log(), b.log()


STATUS_ONLY = "status needs an interval between 0 and 10 seconds"
SCALE_ONLY = f"scale needs a worker count between 1 and {MAX_WORKERS}"


@pytest.mark.parametrize("data,error", [
    (b"[" * 3000 + b"\n", f"bad request: nested deeper than {MAX_DEPTH} levels"),
    (b'{"cmd": "status", "x": ' + b"{" * 3000 + b"\n", f"bad request: nested deeper than {MAX_DEPTH} levels"),
    (b'{"cmd": "status", "x": "' + b"[" * 3000 + b'"}\n', None),  # brackets in a string are no nesting
    (b'{"cmd": "status", "pad": "' + b"a" * (2 * MAX_REQUEST) + b'"}\n',
     f"bad request: longer than {MAX_REQUEST} bytes"),
    (b"[]\n", "bad request: expected a JSON object"),
    (b'{"cmd": ["status"]}\n', "unknown command ['status']"),
    (b'{"cmd": "status", "interval": Infinity}\n', "bad request: Infinity is not a JSON number"),
    (b'{"cmd": "status", "interval": -Infinity}\n', "bad request: -Infinity is not a JSON number"),
    (b'{"cmd": "status", "interval": NaN}\n', "bad request: NaN is not a JSON number"),
    (b'{"cmd": "status", "interval": 1e300}\n', f"{STATUS_ONLY}, got 1e+300"),
    (b'{"cmd": "status", "interval": 1e999}\n', f"{STATUS_ONLY}, got inf"),  # JSON has no limit; float has
    (b'{"cmd": "status", "interval": 1%s}\n' % (b"0" * 400), f"{STATUS_ONLY}, got 1{'0' * 400}"),
    (b'{"cmd": "status", "interval": 10.5}\n', f"{STATUS_ONLY}, got 10.5"),
    (b'{"cmd": "status", "interval": -1}\n', f"{STATUS_ONLY}, got -1"),
    (b'{"cmd": "status", "interval": true}\n', f"{STATUS_ONLY}, got True"),
    (b'{"cmd": "status", "interval": "1"}\n', f"{STATUS_ONLY}, got '1'"),
    (b'{"cmd": "scale", "n": true}\n', f"{SCALE_ONLY} (8 per usable CPU), got True"),
    (b'{"cmd": "scale", "n": 1.0}\n', f"{SCALE_ONLY} (8 per usable CPU), got 1.0"),
    (b'{"cmd": "scale", "n": %d}\n' % (MAX_WORKERS + 1), f"{SCALE_ONLY} (8 per usable CPU), got {MAX_WORKERS + 1}"),
    (b'{"cmd": "scale", "n": 100000000000000000000}\n', f"{SCALE_ONLY} (8 per usable CPU), got 100000000000000000000"),
], ids=["deep-list", "deep-object", "brackets-in-string", "too-long", "not-an-object", "unhashable-cmd",
        "infinity", "minus-infinity", "nan", "1e300", "1e999", "huge-int", "over-10", "negative", "bool-interval", "string-interval",
        "bool-n", "float-n", "n-over-max", "n-huge"])
def test_bad_requests_get_a_prompt_clear_answer_and_change_nothing(tmp_path, data, error):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "1", "--control-socket", str(sock)) as b:
        began = time.monotonic()
        reply = raw_request(sock, data)
        assert time.monotonic() - began < 3  # nothing waits for a bad interval
        if error is None:
            assert reply["ok"] and reply["pid"] == b.pid, reply
        else:
            assert reply == {"ok": False, "error": error}, reply
        status = raw_request(sock, b'{"cmd": "status"}\n')  # the master answers on, unchanged
        assert status["ok"] and status["target"] == 1 and status["pid"] == b.pid
        assert "Traceback" not in b.log() and "RecursionError" not in b.log(), b.log()


@pytest.mark.parametrize("interval", ["nan", "inf", "-1", "10.5", "1e300", "soon"])
def test_status_interval_out_of_range_is_a_usage_error(tmp_path, interval):
    r = ctl("status", "--interval", interval, "--control-socket", str(tmp_path / "none.sock"))
    assert r.returncode == 2 and not r.stdout, r
    assert r.stderr.count("\n") == 1 and "argument --interval: an interval is" in r.stderr, r.stderr


def one_cpu() -> None:
    """In the child before exec: only CPU 0, so the master's cap is WORKERS_PER_CPU workers."""
    os.sched_setaffinity(0, {0})


def test_workers_stop_at_eight_per_cpu_for_the_cli_scale_and_sigttin(tmp_path):
    sock = tmp_path / "ctl.sock"
    r = subprocess.run([sys.executable, "-m", "balancer", "--workers", "9", "--bind", "127.0.0.1:0",
                        "--metrics-bind", "none"], capture_output=True, text=True, timeout=30, preexec_fn=one_cpu)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "balancer: error: --workers must be at most 8 (8 per usable CPU), got 9"), r.stderr
    with Balancer("--workers", "7", "--metrics-bind", "none", "--control-socket", str(sock), preexec=one_cpu) as b:
        r = ctl("scale", "9", "--control-socket", str(sock))
        assert r.returncode == 1 and r.stderr == (
            "balancer: error: scale needs a worker count between 1 and 8 (8 per usable CPU), got 9\n"), r.stderr
        mark = b.mark()
        b.signal(signal.SIGTTIN)  # 7 -> 8: the cap is reachable
        b.wait_for(r"worker slot=7 pid=\d+ ready", 30, start=mark)
        mark = b.mark()
        b.signal(signal.SIGTTIN)  # at the cap: logged, not done
        b.wait_for(r"SIGTTIN ignored: 8 workers is the most allowed \(8 per usable CPU\)", 10, start=mark)
        status = json.loads(ctl("status", "--json", "--interval", "0", "--control-socket", str(sock)).stdout)
        assert status["target"] == 8 and len(status["workers"]) == 8, status
