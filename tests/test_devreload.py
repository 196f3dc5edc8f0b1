"""--reload: a changed source file in the app directory is served after a rolling reload, without a failed request."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import Balancer
from tests.test_integration import fetch, run_load, wait_until

pytestmark = pytest.mark.timeout(60)

APP_SOURCE = """from aiohttp import web


async def handler(request):
    return web.Response(text={version!r})
"""


def write_app(directory, version: str) -> None:
    """Write app.py as an editor would on save: the whole file at once."""
    tmp = directory / ".app.py.tmp"  # hidden: the watcher must not act on it
    tmp.write_text(APP_SOURCE.format(version=version))
    os.replace(tmp, directory / "app.py")


def test_a_changed_handler_is_served_after_a_reload_with_no_failed_request(tmp_path):
    pytest.importorskip("watchfiles")  # in the dev extra: tests/run.sh installs it
    write_app(tmp_path, "v1")
    with Balancer("--reload", "--app-dir", str(tmp_path), "--backend", "app:handler", "--workers", "2") as b:
        b.wait_for(r"watching .* for changes", 5)
        assert fetch(b).body == b"v1"
        stop, results, t = run_load(b.url + "/", 4)
        wait_until(lambda: len(results) > 50, 20, "load to start")
        mark = b.mark()
        # Files the watcher ignores come first: had they counted, they would be named in the first reload line.
        (tmp_path / "__pycache__").mkdir()
        (tmp_path / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"stale")
        (tmp_path / ".app.py.swp").write_bytes(b"swap")
        (tmp_path / ".scratch.py").write_text("x = 1\n")  # hidden, though Python
        (tmp_path / ".cache").mkdir()
        (tmp_path / ".cache" / "generated.py").write_text("x = 1\n")
        (tmp_path / "notes.txt").write_text("not Python")
        write_app(tmp_path, "v2")
        changed = b.wait_for(r"--reload: (.*) changed", 10, start=mark)
        assert changed.group(1) == "app.py", b.log()
        b.wait_for("rolling reload done", 30, start=mark)
        wait_until(lambda: fetch(b).body == b"v2", 10, "the new handler to answer")
        seen = len(results)
        wait_until(lambda: len(results) > seen + 20, 10, "requests after the reload")
        stop.set()
        t.join(20)
        failed = [r for r in results if not r[0]]
        assert not failed, f"{len(failed)} of {len(results)} requests failed"
        assert sum("--reload:" in line for line in b.lines[mark:]) == 1, b.log()  # the workers' .pyc did not count


def test_reload_without_watchfiles_is_one_line_and_exit_2(tmp_path):
    blocked = tmp_path / "watchfiles"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ImportError('watchfiles is not installed (test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, "-m", "balancer", "--reload", "--bind", "127.0.0.1:0",
                           "--metrics-bind", "none"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["balancer: error: --reload needs watchfiles: pip install 'balancer[reload]'"]


def test_a_file_written_again_and_again_is_one_change_once_quiet(tmp_path):
    """An editor autosaving, or a build writing one file in bursts: one batch, after the writes stop."""
    pytest.importorskip("watchfiles")
    import asyncio

    from balancer.devreload import DEBOUNCE_MS, QUIET_MS, DevReloader

    async def scenario() -> tuple[list, list[float]]:
        loop = asyncio.get_running_loop()
        calls: list = []
        got = asyncio.Event()

        def on_change(paths):
            calls.append((loop.time(), paths))
            got.set()

        watcher = DevReloader(str(tmp_path), on_change)
        await watcher.start()
        await asyncio.sleep(0.3)  # the watcher thread is up (watchfiles gives no ready signal)
        target = tmp_path / "mod0.py"
        writes = []
        for i in range(25):  # every 0.04 s for 1 s: never quiet for QUIET_MS
            with open(target, "a") as f:
                f.write(f"x{i} = {i}\n")
            writes.append(loop.time())
            await asyncio.sleep(0.04)
        await asyncio.wait_for(got.wait(), 5)
        await asyncio.sleep(2 * QUIET_MS / 1000 + 0.3)  # room for a second batch, had the writes made two
        await watcher.close()
        return calls, writes

    calls, writes = asyncio.run(scenario())
    assert calls and all(paths == ["mod0.py"] for _, paths in calls), calls
    # The promise holds for writes closer than QUIET_MS (200 ms). An overloaded machine can stall this loop
    # between two writes for longer: then that gap may end a batch, and only such a gap.
    stalls = sum(b - a > 0.1 for a, b in zip(writes, writes[1:]))
    assert len(calls) <= 1 + stalls, (calls, writes)
    if not stalls:
        began, last_write = writes[0], writes[-1]
        assert calls[0][0] >= min(last_write, began + DEBOUNCE_MS / 1000) - 0.15, "handed over while still written"
