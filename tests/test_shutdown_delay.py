"""--shutdown-delay: on a stop, /readyz turns 503 at once while the master serves on, then drains as without it."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from balancer.config import Config
from balancer.supervisor import KILL_GRACE
from tests.harness import Balancer
from tests.test_integration import APP, fetch, run_cli, wait_until

pytestmark = pytest.mark.timeout(60)

DELAY_LINE = r"SIGTERM: not ready; serving 2s more before draining \(--shutdown-delay\)"


def readyz(b: Balancer) -> tuple[int, str]:
    """Status and body of the master's /readyz."""
    try:
        with urllib.request.urlopen(f"http://{b.metrics_address}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def refused(b: Balancer) -> bool:
    """True once a new connection to the serving address is refused (the listener is closed)."""
    try:
        socket.create_connection(("127.0.0.1", b.port), timeout=2).close()
    except (ConnectionRefusedError, ConnectionResetError):
        # Reset: this connect was still in the listener's queue when it closed. Not accepting, as refused.
        return True
    return False


def slow_request(b: Balancer, seconds: float, out: dict) -> threading.Thread:
    """GET /slow?s=seconds in a thread; its response or error lands in out."""
    def run() -> None:
        try:
            out["resp"] = fetch(b, f"/slow?s={seconds}", timeout=30)
        except (OSError, http.client.HTTPException) as exc:
            out["error"] = exc

    th = threading.Thread(target=run)
    th.start()
    return th


def test_delay_keeps_serving_while_not_ready_then_drains():
    with Balancer("--workers", "2", "--shutdown-delay", "2", "--graceful-timeout", "10", *APP) as b:
        assert readyz(b)[0] == 200
        out: dict = {}
        th = slow_request(b, 3, out)  # in flight across the whole delay and into the drain
        b.wait_for("slow request started", 10)
        mark = b.mark()
        started = time.monotonic()
        b.signal(signal.SIGTERM)
        b.wait_for(DELAY_LINE, 5, start=mark)
        assert readyz(b) == (503, "not ready: shutting down\n")
        served = [fetch(b).status for _ in range(5)]  # each on a new connection
        assert time.monotonic() - started < 2, "too slow to check inside the delay"
        assert served == [200] * 5 and not refused(b)
        assert "graceful shutdown" not in b.log()

        b.wait_for("SIGTERM: graceful shutdown", 5, start=mark)
        assert time.monotonic() - started >= 2
        wait_until(lambda: refused(b), 2, "the listener to close once the delay is over")
        assert "resp" not in out  # it is still being served: the refusal came from the drain, not the exit
        th.join(15)
        assert out["resp"].status == 200 and out["resp"].body == b"slow done\n", out
        assert b.wait(15) == 0
        elapsed = time.monotonic() - started
        assert 2.5 < elapsed < 2 + 5, elapsed  # the delay, then the drain of a request with 1 s left


def test_without_delay_the_listener_closes_at_once():
    with Balancer("--workers", "1", *APP) as b:
        out: dict = {}
        th = slow_request(b, 2, out)
        b.wait_for("slow request started", 10)
        mark = b.mark()
        started = time.monotonic()
        b.signal(signal.SIGTERM)
        b.wait_for("SIGTERM: graceful shutdown", 5, start=mark)
        wait_until(lambda: refused(b), 1, "the listener to close at once")
        assert time.monotonic() - started < 2 and "resp" not in out
        assert readyz(b) == (503, "not ready: shutting down\n")  # the metrics endpoint lasts the drain
        assert "--shutdown-delay" not in b.log()
        th.join(15)
        assert out["resp"].status == 200, out
        assert b.wait(15) == 0


def test_second_stop_ends_the_delay_and_a_third_cuts_the_drain(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "1", "--shutdown-delay", "30", "--graceful-timeout", "30",
                  "--control-socket", str(sock), *APP) as b:
        out: dict = {}
        th = slow_request(b, 25, out)
        b.wait_for("slow request started", 10)
        mark = b.mark()
        started = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "balancer", "stop", "--control-socket", str(sock)],
                           capture_output=True, text=True, timeout=20)  # the same path as SIGTERM
        assert r.returncode == 0, r.stderr
        b.wait_for(r"SIGTERM: not ready; serving 30s more", 5, start=mark)
        assert readyz(b)[0] == 503 and fetch(b).status == 200
        b.signal(signal.SIGHUP)
        b.wait_for("SIGHUP ignored: shutting down", 5, start=mark)
        b.signal(signal.SIGINT)
        b.wait_for("SIGINT again: draining now", 5, start=mark)
        b.wait_for("SIGINT: graceful shutdown", 5, start=mark)
        wait_until(lambda: refused(b), 2, "the listener to close")
        assert "resp" not in out
        b.signal(signal.SIGINT)
        assert b.wait(10) == 0
        th.join(10)
        assert "error" in out, out  # the third stop killed its worker
        assert "SIGINT again: stopping now" in b.log()
        assert time.monotonic() - started < 15  # nowhere near the 30 s delay or the 25 s request
        assert "rolling reload" not in b.log()


def test_default_timings_fit_kubernetes_grace_period_and_bad_delays_exit_2():
    config = Config()
    assert config.shutdown_delay == 0
    assert config.graceful_timeout + config.shutdown_delay + KILL_GRACE < 30  # terminationGracePeriodSeconds
    assert "(default: 25.0)" in " ".join(run_cli("--help").stdout.split())
    r = run_cli("--shutdown-delay", "-1")
    assert r.returncode == 2 and r.stderr.strip() == "balancer: error: --shutdown-delay must be 0 or more, got -1.0"


def test_reload_and_scale_are_refused_during_the_delay(tmp_path):
    sock = tmp_path / "ctl.sock"
    with Balancer("--workers", "1", "--shutdown-delay", "5", "--control-socket", str(sock), *APP) as b:
        mark = b.mark()
        b.signal(signal.SIGTERM)
        b.wait_for(r"SIGTERM: not ready; serving 5s more", 5, start=mark)
        for args in (["reload"], ["scale", "3"]):
            r = subprocess.run([sys.executable, "-m", "balancer", *args, "--control-socket", str(sock)],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 1 and "starting or stopping" in r.stderr, (args, r.stdout, r.stderr)
        assert "rolling reload" not in b.log() and "scaling" not in b.log()
        b.signal(signal.SIGTERM)  # a second stop ends the delay
        assert b.wait(20) == 0
