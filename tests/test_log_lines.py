"""The shared log stream: every line whole, whoever wrote it (master, worker, the backend's print()), and named."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from balancer_workers import stdio
from tests.harness import Balancer

pytestmark = pytest.mark.timeout(90)
APP = ("--backend", "printapp:application")
ROUNDS, REQUESTS = 300, 4
RECORD = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[(?:balancer master|worker slot=\d) pid=\d+\] [A-Z]+ \S.*"
PRINTED = (r"print slot=\d i=\d+ x*", r"stderr slot=\d i=\d+", r"\{", r' "slot": "\d",', r' "i": \d+', r"\}")
WHOLE = re.compile("|".join(f"(?:{p})" for p in (RECORD, *PRINTED)))


def reopened(lines: list[str]) -> int:
    """The master's lines for a SIGUSR1 so far."""
    return sum("SIGUSR1: log files reopened" in line for line in list(lines))


def get(b: Balancer, target: str) -> int:
    with urllib.request.urlopen(f"{b.url}{target}", timeout=30) as resp:
        return resp.status


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["PYTHONUNBUFFERED", "buffered"])
def test_every_line_of_the_shared_stream_is_whole(unbuffered):
    # Two workers print and log while the master logs a line per SIGUSR1, all into one pipe (stdout and
    # stderr together, as journald and `docker logs` take them). PYTHONUNBUFFERED=1 is the shipped Dockerfile's.
    with Balancer("--workers", "2", *APP, env={"PYTHONUNBUFFERED": unbuffered}) as b:
        done = threading.Event()

        def master_talks() -> None:
            while not done.is_set():
                b.signal(signal.SIGUSR1)  # "SIGUSR1: log files reopened (0)" from the master each time
                time.sleep(0.002)

        talker = threading.Thread(target=master_talks, daemon=True)
        talker.start()
        sent = 0
        try:
            with ThreadPoolExecutor(REQUESTS) as pool:
                # Batches until the master has talked over the workers' prints (signals that arrive together are
                # one line; a loaded machine may need several batches), bounded.
                while sent < 20 * REQUESTS and (sent == 0 or reopened(b.lines) <= 10):
                    assert list(pool.map(lambda _: get(b, f"/?n={ROUNDS}"), range(REQUESTS))) == [200] * REQUESTS
                    sent += REQUESTS
        finally:
            done.set()
            talker.join(5)
        b.signal(signal.SIGTERM)
        assert b.wait(30) == 0
    broken = [line for line in b.lines if not WHOLE.fullmatch(line)]
    assert not broken, "\n".join(broken[:20])
    assert sum(line.startswith("print slot=") for line in b.lines) == ROUNDS * sent
    assert sum(line == "{" for line in b.lines) == ROUNDS * sent
    assert reopened(b.lines) > 10  # the master did talk meanwhile
    # The app's own records name their logger; balancer's own lines stay as they were.
    assert sum(bool(re.search(r"\] INFO printapp\.talk: log slot=\d i=\d+$", line)) for line in b.lines) == (
        ROUNDS * sent)
    assert any(re.search(r"\[balancer master pid=\d+\] INFO balancer 2 workers serving on ", line) for line in b.lines)


def test_a_print_reaches_the_stream_at_once_through_a_pipe():
    # A block-buffered stdout kept a backend's print()s until 8 KiB had gathered, or the worker exited.
    with Balancer("--workers", "1", *APP, env={"PYTHONUNBUFFERED": ""}) as b:
        assert get(b, "/?n=1") == 200
        b.wait_for(r"^print slot=0 i=0 $", 10)
        b.wait_for(r'^ "i": 0$', 10)
        b.wait_for(r"^stderr slot=0 i=0$", 10)


def test_aiohttp_records_name_their_logger():
    with Balancer("--workers", "1", "--backend", "testapp:create_app") as b:
        with pytest.raises(urllib.error.HTTPError):
            get(b, "/crash")
        b.wait_for(r"\[worker slot=0 pid=\d+\] ERROR aiohttp\.server: Error handling request", 10)


def test_whole_lines_packs_lines_into_atomic_writes_and_holds_a_partial_one(monkeypatch):
    writes: list[bytes] = []
    monkeypatch.setattr(stdio.os, "write", lambda fd, data: writes.append(bytes(data)) or len(data))
    out = stdio.WholeLines(99)
    out.write(b"par")
    out.write(b"tial\nnext")
    assert writes == [b"partial\n"]
    a, b, c = b"a" * 3000 + b"\n", b"b" * 3000 + b"\n", b"c" * 5000 + b"\n"
    out.write(b" line\n" + a + b + c + b"d\n")
    # Runs of whole lines of at most PIPE_BUF (4096) bytes; a longer line alone.
    assert writes[1:] == [b"next line\n" + a, b, c, b"d\n"]
    out.write(b"no end yet")
    assert len(writes) == 5
    out.flush()  # asked for: the partial line goes out as it is
    assert writes[5:] == [b"no end yet"]
