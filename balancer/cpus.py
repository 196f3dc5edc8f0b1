"""How many CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota."""

from __future__ import annotations

import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (taskset, cpuset), or the machine's count where unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 cpu.max line ("200000 100000" -> 2.0), None for "max" or nonsense."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return parse_cfs(*parts)  # the same quota and period, in one file


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us, None for -1 (no quota)."""
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _own_cgroups(proc_cgroup: str) -> dict[str, str]:
    """This process's cgroup path per hierarchy: "" for the v2 one, each controller's name for v1."""
    out = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)  # "0::/path" (v2) or "4:cpu,cpuacct:/path" (v1)
        if len(parts) == 3:
            for name in parts[1].split(",") if parts[1] else [""]:
                out[name] = parts[2]
    return out


def _levels(mount: str, path: str) -> list[str]:
    """The directories from this process's cgroup up to the mount: a parent's quota binds the child too.

    Inside a container with its own cgroup namespace the path is "/" and the mount is the container's
    cgroup; where the path does not exist under the mount (a host namespace seen from a container),
    only the mount's own files can speak for this process.
    """
    here = os.path.normpath(os.path.join(mount, path.lstrip("/")))
    if not os.path.isdir(here):
        return [mount]
    levels = [here]
    while os.path.normpath(here) != os.path.normpath(mount):
        here = os.path.dirname(here)
        levels.append(here)
    return levels


def cgroup_cpu_quota(root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> float | None:
    """The smallest CPU quota (in CPUs) on this process's cgroup path, v2 cpu.max or v1 CFS; None if none."""
    own = _own_cgroups(proc_cgroup)
    quotas = []
    if "" in own:  # cgroup v2: cgroup2 mounted at root itself, or at root/unified on hybrid hosts
        for mount in (root, os.path.join(root, "unified")):
            if os.path.exists(os.path.join(mount, "cgroup.controllers")):
                for level in _levels(mount, own[""]):
                    text = _read(os.path.join(level, "cpu.max"))
                    quotas.append(parse_cpu_max(text) if text else None)
                break
    if "cpu" in own:  # cgroup v1 cpu controller, mounted as cpu or cpu,cpuacct
        for mount in (os.path.join(root, "cpu"), os.path.join(root, "cpu,cpuacct")):
            if os.path.isdir(mount):
                for level in _levels(mount, own["cpu"]):
                    quota = _read(os.path.join(level, "cpu.cfs_quota_us"))
                    period = _read(os.path.join(level, "cpu.cfs_period_us"))
                    quotas.append(parse_cfs(quota, period) if quota and period else None)
                break
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def available_cpus(root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> int:
    """The CPUs this process may use: affinity, capped by the cgroup quota rounded up; at least 1."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is not None:
        # A quota of 1.5 CPUs still lets two workers run at once; rounding down would leave half a CPU idle.
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)
