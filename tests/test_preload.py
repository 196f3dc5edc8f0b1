"""--preload on real processes: workers forked by a zygote, its death, hang and refusal, reloads through it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from balancer.control_client import request
from balancer.zygote_process import FORK_TIMEOUT
from balancer_workers.zygote import SPARES
from tests.harness import Balancer, pid_alive
from tests.test_integration import fetch, run_load, wait_until

pytestmark = pytest.mark.timeout(120)

# Each process that imports the module appends its pid to $PRELOAD_TEST_IMPORTS: only the zygote should.
APP = """
import os, time
from aiohttp import web

VERSION = "@VERSION@"
time.sleep(float(os.environ.get("PRELOAD_TEST_IMPORT_DELAY", "0")))
with open(os.environ["PRELOAD_TEST_IMPORTS"], "a") as f:
    f.write(f"{os.getpid()}\\n")
@EXTRA@

async def handler(request):
    if request.path == "/pdeathsig":  # the signal the kernel sends this worker when its parent dies, and that parent
        import ctypes
        got = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(got), 0, 0, 0)  # PR_GET_PDEATHSIG
        return web.Response(text=f"{got.value} {os.getppid()}", headers={"X-Worker-Pid": str(os.getpid())})
    return web.Response(text=f"{VERSION} {os.getpid()}", headers={"X-Worker-Pid": str(os.getpid())})
"""


def write_app(path, version: str, extra: str = "") -> None:
    path.write_text(APP.replace("@VERSION@", version).replace("@EXTRA@", extra))


def start(tmp_path, *args: str, version: str = "v1", extra: str = "", delay: float = 0.0) -> Balancer:
    write_app(tmp_path / "preloaded.py", version, extra)
    return Balancer("--preload", "--app-dir", str(tmp_path), "--backend", "preloaded:handler",
                    "--control-socket", str(tmp_path / "ctl.sock"), *args,
                    env={"PRELOAD_TEST_IMPORTS": str(tmp_path / "imports"),
                         "PRELOAD_TEST_IMPORT_DELAY": str(delay)})


def status(tmp_path) -> dict:
    return request(str(tmp_path / "ctl.sock"), {"cmd": "status", "interval": 0}, 10)


def importers(tmp_path) -> list[int]:
    return [int(line) for line in (tmp_path / "imports").read_text().split()]


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def serving(tmp_path) -> dict[int, int]:
    """slot -> pid of its ready worker."""
    return {w["slot"]: w["pid"] for w in status(tmp_path)["workers"] if w["state"] == "ready"}


def replaced(tmp_path, slot: int, old: int) -> int:
    """Wait until slot has a ready worker other than old; its pid."""
    wait_until(lambda: serving(tmp_path).get(slot) not in (None, old), 20, f"slot {slot} to be refilled")
    return serving(tmp_path)[slot]


def test_workers_are_forked_by_the_zygote_the_masters_children_and_serve(tmp_path):
    with start(tmp_path, "--workers", "2") as b:
        st = status(tmp_path)
        z = st["zygote"]
        assert (z["state"], z["generation"], z["forked"], z["spawned"]) == ("ready", 0, 2, 0), z
        assert z["import_seconds"] > 0 and z["boot_p50"]["fork"] is not None
        # Only the zygote imported the backend: not the master, not the workers.
        assert importers(tmp_path) == [z["pid"]]
        workers = [w["pid"] for w in st["workers"]]
        assert all(parent_of(pid) == b.pid for pid in workers), "a forked worker is the master's own child"
        assert parent_of(z["pid"]) == b.pid
        assert {int(fetch(b).getheader("X-Worker-Pid")) for _ in range(4)} == set(workers)
        assert fetch(b).body.startswith(b"v1 ")
        text = fetch_metrics(b)
        assert 'balancer_workers_started_total{how="fork"} 2.0' in text
        assert f"balancer_zygote_pid {float(z['pid'])}" in text and "balancer_zygote_import_seconds" in text
    assert not pid_alive(z["pid"]) and not any(pid_alive(pid) for pid in workers)


def fetch_metrics(b: Balancer) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{b.metrics_address}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_kill_9_worker_is_refilled_from_the_zygote(tmp_path):
    with start(tmp_path, "--workers", "2") as b:
        zygote = status(tmp_path)["zygote"]["pid"]
        victim = serving(tmp_path)[0]
        os.kill(victim, signal.SIGKILL)
        new = replaced(tmp_path, 0, victim)
        assert parent_of(new) == b.pid
        z = status(tmp_path)["zygote"]
        assert (z["pid"], z["forked"], z["spawned"]) == (zygote, 3, 0), z
        assert importers(tmp_path) == [zygote], "the replacement did not import again"
        b.wait_for(f"worker slot=0 pid={victim} died")


def test_dead_zygote_workers_spawn_meanwhile_then_it_is_back(tmp_path):
    # A 1.5 s import: the zygote's restart is still importing when the killed worker's back-off is over.
    with start(tmp_path, "--workers", "2", delay=1.5) as b:
        first = status(tmp_path)["zygote"]["pid"]
        os.kill(first, signal.SIGKILL)
        b.wait_for(f"zygote pid={first} .*died \\(signal SIGKILL\\); workers are spawned without it until it is back")
        victim = serving(tmp_path)[1]
        os.kill(victim, signal.SIGKILL)
        spawned = replaced(tmp_path, 1, victim)
        assert spawned in importers(tmp_path), "the fallback worker imported the backend itself"
        assert parent_of(spawned) == b.pid
        wait_until(lambda: status(tmp_path)["zygote"]["state"] == "ready", 20, "the zygote to be back")
        z = status(tmp_path)["zygote"]
        assert z["pid"] != first and z["restarts"] == 1 and z["spawned"] == 1, z
        victim = serving(tmp_path)[0]
        os.kill(victim, signal.SIGKILL)
        forked = replaced(tmp_path, 0, victim)
        assert forked not in importers(tmp_path) and status(tmp_path)["zygote"]["forked"] == 3
        assert fetch(b).status == 200


def test_a_hung_zygote_never_blocks_the_master_and_its_worker_is_spawned_after_the_deadline(tmp_path):
    # The fork request waits unanswered in a stopped zygote's queue: meanwhile the master answers its probes and
    # the other worker serves, every time at once; FORK_TIMEOUT after the request the zygote is killed and the
    # worker spawned, and a new zygote comes back.
    with start(tmp_path, "--workers", "2") as b:
        hung = status(tmp_path)["zygote"]["pid"]
        victim = serving(tmp_path)[0]
        os.kill(hung, signal.SIGSTOP)
        mark = b.mark()
        os.kill(victim, signal.SIGKILL)
        b.wait_for(f"worker slot=0 pid={victim} died", 10, start=mark)
        asked = time.monotonic()  # the respawn is asked for 0.1 s (its back-off) after this line
        slowest, probes = 0.0, 0
        while not any("no answer to a fork" in line for line in b.lines[mark:]):
            assert time.monotonic() - asked < 10, "the hung zygote was never given up on"
            t = time.monotonic()
            assert healthz(b) == 200 and fetch(b).status == 200
            slowest, probes = max(slowest, time.monotonic() - t), probes + 1
        line = b.wait_for(f"zygote pid={hung}: no answer to a fork within 1s; killing it, its workers are spawned",
                          start=mark)
        gave_up = time.monotonic()
        assert probes >= 5 and slowest < 0.5, f"{probes} probes while the zygote hung, the slowest {slowest:.3f}s"
        assert gave_up - asked >= FORK_TIMEOUT, line.string
        spawned = replaced(tmp_path, 0, victim)
        assert spawned in importers(tmp_path) and parent_of(spawned) == b.pid
        wait_until(lambda: status(tmp_path)["zygote"]["state"] == "ready", 20, "a new zygote")
        z = status(tmp_path)["zygote"]
        assert z["pid"] != hung and z["spawned"] == 1 and z["restarts"] == 1, z
        assert not pid_alive(hung)


def healthz(b: Balancer) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://{b.metrics_address}/healthz", timeout=5) as resp:
        resp.read()
        return resp.status


def test_reload_to_code_that_does_not_import_touches_no_worker(tmp_path):
    with start(tmp_path, "--workers", "2") as b:
        before, zygote = serving(tmp_path), status(tmp_path)["zygote"]["pid"]
        (tmp_path / "preloaded.py").write_text("raise ImportError('half-deployed release')\n")
        mark = b.mark()
        reply = request(str(tmp_path / "ctl.sock"), {"cmd": "reload", "wait": True}, 30)
        assert not reply["ok"], reply
        b.wait_for("reload failed: the new code does not import .*half-deployed release.*; no worker was touched",
                   10, start=mark)
        st = status(tmp_path)
        assert serving(tmp_path) == before and st["generation"] == 0
        assert st["zygote"]["pid"] == zygote and "half-deployed release" in st["zygote"]["reload_error"]
        assert fetch(b).body.startswith(b"v1 ")
        assert not any(f"worker slot={slot} pid={pid} exited" in line
                       for line in b.lines[mark:] for slot, pid in before.items())


def test_reload_forks_from_a_new_zygote_and_the_old_one_exits_losing_nothing(tmp_path):
    with start(tmp_path, "--workers", "2", "--graceful-timeout", "10") as b:
        old_zygote, old_workers = status(tmp_path)["zygote"]["pid"], set(serving(tmp_path).values())
        stop, results, t = run_load(b.url + "/", 16, new_conn=False)
        try:
            wait_until(lambda: len(results) > 200, 20, "load to start")
            write_app(tmp_path / "preloaded.py", "v2")
            mark = b.mark()
            b.signal(signal.SIGHUP)
            b.wait_for("rolling reload done", 30, start=mark)
            seen = len(results)
            wait_until(lambda: len(results) > seen + 200, 20, "requests after the reload")
        finally:
            stop.set()
            t.join(20)
        failed = [r for r in results if not r[0]]
        assert not failed, f"{len(failed)} of {len(results)} requests failed across the reload"
        z = status(tmp_path)["zygote"]
        assert z["pid"] != old_zygote and z["generation"] == 1 and z["spawned"] == 0
        assert importers(tmp_path) == [old_zygote, z["pid"]]
        new_workers = set(serving(tmp_path).values())
        assert not new_workers & old_workers
        assert {fetch(b).body.split()[0] for _ in range(4)} == {b"v2"}
        wait_until(lambda: not pid_alive(old_zygote), 20, "the old zygote to exit once its workers are gone")
        assert not any(pid_alive(pid) for pid in old_workers)
        # The old zygote's spares went with it: the master, the new zygote, its spares and the 2 workers remain.
        wait_until(lambda: len(group_members(b.pid)) == 1 + 1 + SPARES + 2, 10, "only the new generation's processes")


@pytest.mark.parametrize("opened, why", [
    ("import threading\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()", "threads are running"),
    ("import socket\nHELD = socket.socket()", "socket fds"),
])
def test_zygote_refuses_to_fork_with_threads_or_sockets_from_import(tmp_path, opened, why):
    with start(tmp_path, "--workers", "2", extra=opened) as b:
        line = b.wait_for(r"zygote pid=(\d+) refuses to fork: .*; workers of generation 0 are spawned as without")
        assert why in line.string
        assert sum(why in text for text in b.lines) == 1, "one line, not one per worker"
        z = status(tmp_path)["zygote"]
        assert z["spawned"] == 2 and z["forked"] == 0, z
        assert fetch(b).status == 200
        wait_until(lambda: not pid_alive(int(line.group(1))), 10, "the refusing zygote to exit")


def test_boot_fails_with_the_import_error_and_leaves_nothing(tmp_path):
    (tmp_path / "preloaded.py").write_text("raise RuntimeError('database URL not configured')\n")
    b = Balancer("--preload", "--app-dir", str(tmp_path), "--backend", "preloaded:handler", ready=False)
    try:
        assert b.wait(30) == 3
        assert "database URL not configured" in b.log()
    finally:
        b.stop()
    assert not group_members(b.pid), "nothing left behind"


def group_members(pgid: int) -> list[int]:
    """Live processes of process group pgid (the test's Balancer runs in a session of its own)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(name))
    return out


def test_master_kill_9_leaves_nothing_and_forked_workers_have_the_parent_death_signal(tmp_path):
    # Each forked worker asked the kernel for SIGTERM when the master (its parent since adoption) dies, as a
    # spawned one does; after kill -9 of the master nothing of its process group is left: not the zygote, not its
    # spares (which no status lists), not a worker.
    with start(tmp_path, "--workers", "2") as b:
        st = status(tmp_path)
        workers = {w["pid"] for w in st["workers"]}
        seen = {}
        while set(seen) != workers:
            resp = fetch(b, "/pdeathsig")
            seen[int(resp.getheader("X-Worker-Pid"))] = resp.body.decode()
        assert set(seen.values()) == {f"{int(signal.SIGTERM)} {b.pid}"}, seen
        others = workers | {b.pid, st["zygote"]["pid"]}
        wait_until(lambda: len([pid for pid in group_members(b.pid) if pid not in others]) == SPARES, 10,
                   "the zygote's spares")
        assert all(parent_of(pid) == b.pid for pid in group_members(b.pid) if pid not in others)
        os.kill(b.pid, signal.SIGKILL)
        b.wait(5)
        wait_until(lambda: not group_members(b.pid), 3, "the zygote, its spares and the workers to exit")


def test_files_the_import_leaves_open_are_named_in_one_warning(tmp_path):
    # A file opened at import is shared by every forked worker with one offset; one opened to append (a log) is not
    # a hazard, and no file of the runtime's own is named.
    extra = "DATA = open(__file__)\nLOG = open(os.devnull, 'a')"
    with start(tmp_path, "--workers", "2", extra=extra) as b:
        line = b.wait_for("the backend's import left files open, which every forked worker shares .*: fd \\d+ ").string
        assert str(tmp_path / "preloaded.py") in line and os.devnull not in line, line
        assert sum("import left" in text for text in b.lines) == 1
        z = status(tmp_path)["zygote"]
        assert (z["forked"], z["spawned"]) == (2, 0), z  # a warning, not a refusal
        assert fetch(b).status == 200


def test_reload_rereads_the_config_file_and_the_new_zygote_imports_its_backend(tmp_path):
    write_app(tmp_path / "preloaded.py", "v1")
    write_app(tmp_path / "other.py", "other")
    conf = tmp_path / "balancer.toml"
    conf.write_text('backend = "preloaded:handler"\npreload = true\n')
    with Balancer("-c", str(conf), "--app-dir", str(tmp_path), "--control-socket", str(tmp_path / "ctl.sock"),
                  "--workers", "2", env={"PRELOAD_TEST_IMPORTS": str(tmp_path / "imports")}) as b:
        assert fetch(b).body.startswith(b"v1 ")
        conf.write_text('backend = "other:handler"\npreload = true\n')
        mark = b.mark()
        b.signal(signal.SIGHUP)
        b.wait_for("rolling reload done", 30, start=mark)
        assert {fetch(b).body.split()[0] for _ in range(4)} == {b"other"}
        assert status(tmp_path)["zygote"]["spawned"] == 0
