"""The default worker count follows the CPUs this process may use (affinity, cgroup quota)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from balancer import cpus
from balancer.cli import build_parser
from balancer.config import Config
from tests.harness import Balancer

pytestmark = pytest.mark.timeout(60)


# ---- the worker default: usable CPUs ------------------------------------------------------------------------

def fake_cgroup(tmp_path: Path, files: dict[str, str], own: str = "0::/") -> tuple[str, str]:
    """A cgroup tree under tmp_path (path -> content) and a /proc/self/cgroup naming this process's place in it."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(own + "\n")
    return str(root), str(proc)


@pytest.mark.parametrize("text, expected", [
    ("max 100000", None), ("200000 100000", 2.0), ("150000 100000", 1.5), ("50000 100000", 0.5),
    ("", None), ("garbage", None), ("0 100000", None),
])
def test_parse_cpu_max(text, expected):
    assert cpus.parse_cpu_max(text) == expected


def test_cpu_max_caps_the_affinity_rounded_up_and_at_least_one(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 8)
    cases = {"max 100000": 8, "200000 100000": 2, "150000 100000": 2, "50000 100000": 1, "1600000 100000": 8}
    for text, expected in cases.items():
        root, proc = fake_cgroup(tmp_path / text.replace(" ", "_"), {"cgroup.controllers": "cpu", "cpu.max": text})
        assert cpus.available_cpus(root, proc) == expected, text
    # no cgroup files at all (not Linux, or no cpu controller): the affinity alone
    assert cpus.available_cpus(str(tmp_path / "nothing"), str(tmp_path / "nothing")) == 8


def test_a_parent_cgroups_quota_binds_the_child(tmp_path, monkeypatch):
    # Without a cgroup namespace the process sits deep in the tree; a pod-level quota sits above the container.
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 8)
    root, proc = fake_cgroup(tmp_path, {
        "cgroup.controllers": "cpu", "kubepods/cpu.max": "max 100000",
        "kubepods/pod1/cpu.max": "300000 100000", "kubepods/pod1/ctr/cpu.max": "max 100000",
    }, own="0::/kubepods/pod1/ctr")
    assert cpus.cgroup_cpu_quota(root, proc) == 3.0
    assert cpus.available_cpus(root, proc) == 3


def test_cgroup_v1_cfs_quota_counts_too(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 8)
    root, proc = fake_cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": "250000", "cpu/cpu.cfs_period_us": "100000"},
                             own="4:cpu,cpuacct:/")
    assert cpus.available_cpus(root, proc) == 3
    root, proc = fake_cgroup(tmp_path / "none", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
                             own="4:cpu,cpuacct:/")
    assert cpus.available_cpus(root, proc) == 8


def test_the_affinity_caps_a_larger_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 1)
    root, proc = fake_cgroup(tmp_path, {"cgroup.controllers": "cpu", "cpu.max": "400000 100000"})
    assert cpus.available_cpus(root, proc) == 1


def test_help_says_where_the_worker_default_comes_from():
    text = " ".join(build_parser().format_help().split())
    assert "affinity" in text and "cpu.max" in text and f"here {cpus.available_cpus()}" in text
    assert Config().workers == cpus.available_cpus()


def test_a_process_pinned_to_one_cpu_starts_one_worker():
    usable = os.sched_getaffinity(0)
    if len(usable) < 2:
        pytest.skip("needs 2+ usable CPUs to tell a pinned default from an unpinned one")
    one = min(usable)
    # Pinned by the kernel before exec, as `taskset -c 0` or a cpuset would: the master reads it at start.
    with Balancer(preexec=lambda: os.sched_setaffinity(0, {one})) as b:
        assert b.wait_for(r"balancer (\d+) workers serving").group(1) == "1"
        assert len(b.worker_pids()) == 1
    cap = cpus.available_cpus()
    with Balancer() as b:  # unpinned: one worker per usable CPU
        assert b.wait_for(r"balancer (\d+) workers serving").group(1) == str(cap)
        assert len(b.worker_pids()) == cap  # "serving" comes after every first worker reported ready

