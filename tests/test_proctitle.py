"""Process titles: `balancer: master [name]` and `balancer: worker N [name]` in ps, via the setproctitle extra."""

from __future__ import annotations

import os

import pytest

from tests.harness import Balancer
from tests.test_integration import APP, fetch

pytestmark = pytest.mark.timeout(60)


def cmdline(pid: int) -> str:
    """What ps shows for pid: its argv from /proc, NULs (and setproctitle's padding) as spaces."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def test_master_and_each_worker_carry_their_role_slot_and_name():
    pytest.importorskip("setproctitle")  # in the dev extra: tests/run.sh installs it
    with Balancer("--workers", "2", *APP) as b:
        assert cmdline(b.pid) == f"balancer: master [{b.address}]"  # no --name: the first bound address
        assert sorted(cmdline(pid) for pid in b.worker_pids()) == [
            f"balancer: worker 0 [{b.address}]", f"balancer: worker 1 [{b.address}]"]
    with Balancer("--workers", "1", "--name", "shop-api", *APP) as b:
        assert cmdline(b.pid) == "balancer: master [shop-api]"
        assert [cmdline(pid) for pid in b.worker_pids()] == ["balancer: worker 0 [shop-api]"]


def test_without_setproctitle_it_serves_and_says_so_once(tmp_path):
    blocked = tmp_path / "setproctitle"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ImportError('setproctitle is not installed (test)')\n")
    path = os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH"))))
    with Balancer("--workers", "2", "--log-level", "debug", *APP, env={"PYTHONPATH": path}) as b:
        assert fetch(b).status == 200
        assert "-m balancer" in cmdline(b.pid)  # the title is what the interpreter was started with
        said = [line for line in b.lines if "setproctitle is not installed" in line]
        assert len(said) == 1 and "DEBUG" in said[0] and "master" in said[0], b.log()
