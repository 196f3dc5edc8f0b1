"""Orphans a backend leaves behind are adopted and reaped by the master; workers' exit statuses stay its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from balancer.reaper import OrphanReaper
from tests.harness import Balancer
from tests.test_integration import fetch, wait_until

pytestmark = pytest.mark.timeout(60)

APP = ("--backend", "orphanapp:handler")


def zombie_children(pid: int) -> list[int]:
    """Pids in state Z whose parent is pid (a scan of /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            out.append(int(name))
    return out


def is_zombie(pid: int) -> bool:
    """True while pid is an exited, unreaped process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def orphans_reaped(b: Balancer) -> float:
    """balancer_orphans_reaped_total from the master's /metrics."""
    with urllib.request.urlopen(f"http://{b.metrics_address}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("balancer_orphans_reaped_total "):
                return float(line.split()[1])
    raise AssertionError("balancer_orphans_reaped_total missing from /metrics")


def test_orphans_of_a_backend_are_reaped_and_worker_deaths_still_reported():
    with Balancer("--workers", "2", *APP) as b:
        for i in range(5):  # a shell's `sleep &` and a double fork, each orphaning one process for 0.1 s
            resp = fetch(b, "/?how=fork" if i % 2 else "/")
            assert resp.status == 200, resp.body
        # Every orphan came to the master (a subreaper) and was reaped there, not by init or anyone else.
        seen = {}

        def all_reaped() -> bool:
            seen.update(zombies=zombie_children(b.pid), reaped=orphans_reaped(b))
            return not seen["zombies"] and seen["reaped"] == 5

        try:
            wait_until(all_reaped, 10, "5 orphans reaped by the master, no zombie children left")
        finally:
            print(f"last seen: {seen}")

        # The reaper never takes a worker's exit status: a kill -9 is still reported as such. The master is
        # stopped meanwhile so that it learns of the death by SIGCHLD and pidfd at once: a reaper that took
        # any child would get to it first.
        victim = b.worker_pids()[0]
        mark = b.mark()
        os.kill(b.pid, signal.SIGSTOP)
        try:
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: victim in zombie_children(b.pid), 5, "the victim to be a zombie")
        finally:
            os.kill(b.pid, signal.SIGCONT)
        b.wait_for(rf"worker slot=\d pid={victim} died \(crash, signal SIGKILL\)", 10, start=mark)
        b.wait_for(r"worker slot=\d pid=\d+ ready", 10, start=mark)
        assert fetch(b).status == 200
        assert not zombie_children(b.pid)
        assert orphans_reaped(b) == 5  # a worker is not an orphan


@pytest.mark.parametrize("listed", [True, False], ids=["child-lists", "peek"])
def test_reaper_takes_exited_children_but_leaves_workers_to_the_supervisor(listed):
    """Both ways of finding children: /proc child lists, and waitid(WNOWAIT) where the kernel has none."""
    worker = subprocess.Popen(["sleep", "30"])  # started first: the peek meets it first
    orphan = subprocess.Popen(["true"])
    os.kill(worker.pid, signal.SIGKILL)
    wait_until(lambda: is_zombie(worker.pid) and is_zombie(orphan.pid), 5, "both children to exit")
    reaper = OrphanReaper(lambda pid: pid == worker.pid)
    reaper.listed = listed
    reaper.reap()
    if not listed:  # the peek stops at an exited worker until the supervisor has reaped it
        assert is_zombie(worker.pid)
        assert worker.poll() == -signal.SIGKILL
        reaper.reap()
    assert worker.poll() == -signal.SIGKILL  # a stolen status would read as exit code 0
    with pytest.raises(ChildProcessError):
        os.waitpid(orphan.pid, os.WNOHANG)  # reaped by the reaper
    orphan.returncode = 0  # Popen never saw it: keep it from waiting again
    assert reaper.reaped >= 1  # other children of this test process it reaped count too


def test_become_subreaper_in_a_child_process():
    """prctl(PR_SET_CHILD_SUBREAPER) takes: a grandchild orphaned under the caller is reparented to it."""
    code = ("import os, sys, time\n"
            "from balancer.reaper import become_subreaper\n"
            "assert become_subreaper()\n"
            "if os.fork() == 0:\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(0.05); os._exit(0)\n"
            "    os._exit(0)\n"
            "os.wait()\n"  # the child
            "pid, status = os.wait()\n"  # the grandchild: ours only as a subreaper (else ECHILD)
            "print('adopted', pid)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and r.stdout.startswith("adopted"), r.stderr


def test_as_pid_1_of_a_pid_namespace_orphans_are_reaped(tmp_path, monkeypatch):
    """A container without an init: the master is PID 1 (unshare --pid), where orphans go whatever it asks for."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here: {probe.stderr.decode().strip()}")
    wrapper = tmp_path / "pid1-python"
    wrapper.write_text(f'#!/bin/sh\nexec unshare --pid --fork --mount-proc --kill-child "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(wrapper))  # the harness starts `sys.executable -m balancer`
    b = Balancer("--workers", "1", *APP)
    monkeypatch.undo()
    with b:
        master = b.worker_pids()[0]  # the harness's child is unshare; the master is its only child
        with open(f"/proc/{master}/status") as f:
            nspid = [line.split()[1:] for line in f if line.startswith("NSpid:")][0]
        assert nspid == [str(master), "1"]  # PID 1 inside its namespace
        assert "pid 1," in b.log()
        for i in range(5):
            assert fetch(b, "/?how=fork" if i % 2 else "/").status == 200
        wait_until(lambda: orphans_reaped(b) == 5 and not zombie_children(master), 10,
                   "5 orphans reaped by PID 1, no zombie children left")
        os.kill(master, signal.SIGTERM)  # from outside its namespace: PID 1 gets the signals it handles
        assert b.wait(10) == 0, b.log()
