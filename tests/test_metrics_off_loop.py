"""A scrape reads the workers' /proc files off the master's event loop: nothing O(connections) runs on it."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Balancer, fd_count

pytestmark = pytest.mark.timeout(60)

# Loaded by every interpreter started with this directory on PYTHONPATH. In the master, it wraps
# balancer.metrics.read_proc so that a call on the main thread, where the master's event loop runs, fails
# the scrape (a 500) instead of stalling accepts for as long as listing a worker's fds takes.
GUARD = '''
import importlib.abc, importlib.util, sys, threading


class GuardReadProc(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "balancer.metrics":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            read_proc = module.read_proc

            def off_the_loop_only(pid):
                if threading.current_thread() is threading.main_thread():
                    raise AssertionError("read_proc ran on the master's event loop thread")
                return read_proc(pid)

            module.read_proc = off_the_loop_only

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, GuardReadProc())
'''


def scrape(address: str) -> tuple[int, dict]:
    """(status, {(name, worker label): value}) of one /metrics scrape."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, s.labels.get("worker"))] = s.value
    return status, found


def test_worker_proc_figures_are_read_off_the_loop_and_still_exported(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(GUARD)
    with Balancer("--workers", "1", env={"PYTHONPATH": str(tmp_path)}) as b:
        [worker] = b.worker_pids()
        deadline = time.monotonic() + 20
        while True:
            status, found = scrape(b.metrics_address)
            assert status == 200, b.log()  # 500: read_proc ran on the loop
            fds = found.get(("balancer_worker_open_fds", "0"))
            if fds == fd_count(worker):  # an idle worker's fd count holds still between the two reads
                break
            assert time.monotonic() < deadline, (fds, fd_count(worker))
            time.sleep(0.1)
        assert found[("balancer_worker_resident_memory_bytes", "0")] > 1_000_000
        assert "read_proc ran on the master's event loop" not in b.log()
