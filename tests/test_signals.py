"""Signals gunicorn and nginx operators send, and stray ones: none may end the master without a word."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness import Balancer, pid_alive
from tests.test_lifecycle import blocked_signals

pytestmark = pytest.mark.timeout(60)
APP = ("--workers", "1", "--backend", "testapp:create_app")
SURVIVED = {  # signal -> what the master says about it (None: Python ignores it; a write fails instead)
    signal.SIGWINCH: r"SIGWINCH ignored: gunicorn and nginx stop their workers on it.* SIGTERM to stop",
    signal.SIGALRM: r"SIGALRM ignored: a timer signal",
    signal.SIGVTALRM: r"SIGVTALRM ignored: a timer signal",
    signal.SIGPROF: r"SIGPROF ignored: a profiling timer signal",
    signal.SIGXCPU: r"SIGXCPU ignored: over its CPU time soft limit",
    signal.SIGPIPE: None,
    signal.SIGXFSZ: None,
}


def get(b: Balancer) -> int:
    with urllib.request.urlopen(f"{b.url}/", timeout=10) as resp:
        return resp.status


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.parametrize("sig", list(SURVIVED), ids=lambda s: signal.Signals(s).name)
def test_the_master_survives_and_names_the_signal(sig, tmp_path):
    pid_file = tmp_path / "app.pid"
    with Balancer(*APP, "--pid-file", str(pid_file)) as b:
        mark = b.mark()
        b.signal(sig)
        if SURVIVED[sig]:
            b.wait_for(SURVIVED[sig], 10, start=mark)
        b.signal(signal.SIGUSR1)  # a signal it answers: by then the first one has been delivered
        b.wait_for(r"SIGUSR1: log files reopened", 10, start=mark)
        assert pid_alive(b.pid) and get(b) == 200
        assert len([line for line in b.lines[mark:] if signal.Signals(sig).name in line]) == (
            1 if SURVIVED[sig] else 0), b.log()
        b.signal(signal.SIGTERM)
        assert b.wait(30) == 0, b.log()
    assert not pid_file.exists()


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGPWR], ids=lambda s: signal.Signals(s).name)
def test_sigquit_and_sigpwr_stop_gracefully(sig):
    # nginx's graceful stop, and LXC's (lxc-stop) and UPS daemons' request to shut down cleanly.
    with Balancer(*APP) as b:
        b.signal(sig)
        assert b.wait(30) == 0, b.log()
        b.wait_for(rf"{signal.Signals(sig).name}: graceful shutdown", 5)


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGPWR, signal.SIGUSR2, signal.SIGWINCH, signal.SIGALRM],
                         ids=lambda s: signal.Signals(s).name)
def test_a_signal_while_the_master_starts_is_held_until_it_can_act(sig):
    # From `balancer`'s first lines to the loop's handlers, a signal's default action would end the master:
    # `balancer run` holds these back, so each is acted on (a stop) or named (the rest) once the loop runs.
    b = Balancer(*APP, ready=False)
    try:
        wait_until(lambda: blocked_signals(b.pid) & (1 << (sig - 1)), 10, f"the CLI to hold {sig!r} back")
        b.signal(sig)
        name = signal.Signals(sig).name
        if sig in (signal.SIGQUIT, signal.SIGPWR):
            assert b.wait(30) == 0, b.log()
            assert f"{name}: graceful shutdown" in b.log(), b.log()
        else:
            b.wait_ready()
            # SIGUSR2 upgrades the master in place (tests/test_upgrade.py) once it serves; the others are named.
            b.wait_for("upgrade: master re-executed" if sig == signal.SIGUSR2 else rf"{name} ignored: ", 30)
            assert get(b) == 200
    finally:
        b.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=lambda s: signal.Signals(s).name)
def test_a_terminals_ctrl_c_or_ctrl_backslash_to_the_whole_group_drains(sig):
    # A terminal sends Ctrl-C (SIGINT) and Ctrl-\ (SIGQUIT) to every process of its foreground group: the
    # workers leave the stop to the master, which drains them, and a request in flight is answered.
    with Balancer(*APP) as b:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(lambda: urllib.request.urlopen(f"{b.url}/slow?s=1", timeout=20).status)
            b.wait_for(r"slow request started", 10)
            os.killpg(b.pid, sig)  # the harness's own session: the master and its workers only
            assert slow.result() == 200
        assert b.wait(30) == 0, b.log()
    assert "exited (shutdown)" in b.log() and ", signal SIG" not in b.log() and "SIGQUIT)" not in b.log(), b.log()


def test_a_stop_waiting_in_the_queue_is_acted_on_before_signals_ahead_of_it():
    # Each signal goes to whichever of the master's threads the kernel picks, so a SIGTTIN sent after a SIGTERM
    # can be recorded first; the stop must still come first, and the rest keep their order behind it.
    import asyncio
    from types import SimpleNamespace

    from balancer.master import Master

    async def order(*recorded):
        queue = asyncio.Queue()
        for sig in recorded:
            queue.put_nowait(sig)
        fake = SimpleNamespace(signals=queue)
        got = []
        while not queue.empty():
            got.append(Master._stop_first(fake, await queue.get()))
        return got

    ttin, term, hup, usr1 = signal.SIGTTIN, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1
    assert asyncio.run(order(ttin, hup, term, usr1)) == [term, ttin, hup, usr1]
    assert asyncio.run(order(ttin, hup, usr1)) == [ttin, hup, usr1]
    assert asyncio.run(order(term, ttin)) == [term, ttin]
