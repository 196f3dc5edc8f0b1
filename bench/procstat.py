"""CPU time of every process in a process group, from /proc/<pid>/stat (utime + stime)."""

from __future__ import annotations

import os

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float, str] | None:
    """(process group, CPU seconds, command name) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("latin-1")
    except OSError:
        return None
    # comm is in parentheses and may hold spaces or ')': split after its last ')'.
    lp, rp = raw.index("("), raw.rindex(")")
    fields = raw[rp + 2:].split()
    # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
    return int(fields[2]), (int(fields[11]) + int(fields[12])) / TICK, raw[lp + 1:rp]


def group_cpu(pgid: int) -> dict[int, tuple[float, str]]:
    """{pid: (CPU seconds so far, command name)} for every live process whose process group is pgid."""
    out: dict[int, tuple[float, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is not None and st[0] == pgid:
            out[int(name)] = (st[1], st[2])
    return out


def cpu_delta(before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]]) -> dict[int, float]:
    """CPU seconds each process used between two snapshots (a process born in between counts from zero;
    one that died in between is missing: its last interval cannot be read)."""
    return {pid: cpu - before.get(pid, (0.0, ""))[0] for pid, (cpu, _) in after.items()}


def machine_cpu() -> tuple[float, float, float]:
    """(busy, idle, steal) CPU seconds of the whole machine so far, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / TICK, (idle + iowait) / TICK, steal / TICK


def machine_busy(interval: float) -> float:
    """Whole-machine busy CPU over the next `interval` seconds, in % of one core."""
    import time
    b0, t0 = machine_cpu()[0], time.monotonic()
    time.sleep(interval)
    return 100 * (machine_cpu()[0] - b0) / (time.monotonic() - t0)
