"""The benchmark harness in smoke mode: every system x every workload for ~1 s, one round.

Checks the harness itself works (a table and a chart with a row per system, no crashed or failed system,
PASS/MISS lines printed); it asserts no speed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ["balancer", "balancer-bare", "balancer-base", "single", "reuseport", "gunicorn", "gunicorn-uvloop",
           "node-cluster", "balancer-https", "gunicorn-https"]
# A smoke run sends the tail mix at 70% of gunicorn-uvloop's capacity only (a full run: 50, 70 and 85%).
WORKLOADS = ["hello-keepalive", "hello-close", "template", "skewed", "open-loop", "tail-close-70", "tail-keepalive-70",
             "https-keepalive", "https-close"]
HTTPS = {"balancer-https", "gunicorn-https", "https-keepalive", "https-close"}  # https runs against https only


def _missing() -> list[str]:
    missing = [tool for tool in ("wrk", "node") if shutil.which(tool) is None]
    for module in ("gunicorn", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return missing


@pytest.mark.timeout(240)
def test_bench_smoke(tmp_path: Path) -> None:
    missing = _missing()
    if missing:
        pytest.skip(f"benchmark tools missing: {missing} (apt-get install wrk; pip install -e '.[bench]')")
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path), "--baseline", "HEAD"],
                          cwd=REPO, capture_output=True, text=True, timeout=210)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[round 1/1]" in proc.stderr  # the progress display

    md = (tmp_path / "results.md").read_text()
    png = tmp_path / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0].strip("*") in SYSTEMS:
            rows[cells[0].strip("*")] = cells
    assert sorted(rows) == sorted(SYSTEMS), summary
    for system, cells in rows.items():
        assert cells[-1] == "no", f"{system} crashed or failed a cell:\n{md}"
        assert "failed" not in cells, f"{system} failed a cell:\n{md}"
    for workload in WORKLOADS:
        section = md.split(f"## {workload}:", 1)[1].split("\n## ", 1)[0]
        for system in SYSTEMS:
            row = re.search(rf"^\| \**{re.escape(system)}\** \| ([\d,]+) \|", section, re.M)
            if (system in HTTPS) == (workload in HTTPS):
                assert row and int(row.group(1).replace(",", "")) > 0, (workload, system, section)
            else:
                assert not row, (workload, system, section)

    assert re.search(r"^calibrate: gunicorn-uvloop serves [\d,]+ req/s of the tail mix \(tail-close", proc.stderr, re.M)
    section = md.split("## tail-close-70:", 1)[1].split("\n## ", 1)[0]
    assert "short p99 ms" in section and "load gen CPU %" in section, section
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("PASS ", "MISS ", "n/a "))]
    from bench.report import TARGETS

    assert len(lines) == len(TARGETS), proc.stdout
    # every target measured, like for like, but those of the loads a smoke run leaves out
    assert all(("85%" in l) == l.startswith("n/a ") for l in lines), proc.stdout
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout
    assert "balancer-base" not in worktrees  # the baseline's checkout is removed again

    # The scaling model takes its inputs from this run's raw JSON.
    raw = re.search(r"raw (\S+\.json)", proc.stderr).group(1)
    model = subprocess.run([sys.executable, "-m", "bench.scaling", raw, "--cores", "8,64", "--tail", raw], cwd=REPO,
                           capture_output=True, text=True, timeout=20)
    assert model.returncode == 0, model.stderr
    rows = re.findall(r"^\| (8|64) \| ([\d,]+) \| (master|CPU) \|", model.stdout, re.M)
    assert [r[0] for r in rows] == ["8", "64"] and all(int(r[1].replace(",", "")) > 0 for r in rows), model.stdout
    # ... and what holding and moving connections cost the master, from the same run's tail cells
    assert re.search(r"mh = [\d.]+ us of master CPU per connection", model.stdout), model.stdout
    os.unlink(raw)


@pytest.mark.timeout(60)
def test_ab_smoke_runs_a_revision_from_its_own_worktree() -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk missing (apt-get install wrk)")
    variant = "HEAD BALANCER_NO_EXTENSIONS=1 --accept-coalesce 0"  # environment and options reach that balancer
    env = {k: v for k, v in os.environ.items() if k != "BALANCER_NO_EXTENSIONS"}  # plain HEAD runs the C path
    proc = subprocess.run([sys.executable, "-m", "bench.ab", "HEAD", variant, "--rounds", "1", "--duration", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=50, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[round 1/1] HEAD" in proc.stderr
    assert re.search(r"^HEAD \(\w+\): hand-off in C$", proc.stderr, re.M), proc.stderr[-3000:]
    assert re.search(r"^HEAD \(\w+\) BALANCER_NO_EXTENSIONS=1 --accept-coalesce 0: hand-off in Python$", proc.stderr,
                     re.M), proc.stderr[-3000:]
    assert re.search(r"^\| HEAD \(\w+\) BALANCER_NO_EXTENSIONS=1 --accept-coalesce 0 \| [\d,]+ \|", proc.stdout, re.M)
    row = re.search(r"^\| HEAD \(\w+\) \| ([\d,]+) \| 1\.000x \| ([\d.]+) \| ([\d.]+) \| 0 \|", proc.stdout, re.M)
    assert row, proc.stdout
    assert int(row.group(1).replace(",", "")) > 0 and float(row.group(2)) > 0 and float(row.group(3)) > 0
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout
    assert "balancer-ab-" not in worktrees  # removed again


def _cell(rnd: int, system: str, rps: float, ok: bool = True, leader_us: float = 0.0) -> dict:
    role = "master" if system == "balancer" else "arbiter"
    return {"round": rnd, "system": system, "workload": "hello-close", "ok": ok, "rps": rps,
            "latency_us": {"p99": 1000.0}, "processes": [{"role": role}], "leader_us_per_request": leader_us}


@pytest.mark.timeout(10)
def test_per_round_ratios_pair_cells_of_the_same_round_only() -> None:
    from bench import report

    cells = [_cell(0, "balancer", 1100, leader_us=12.0), _cell(0, "gunicorn-uvloop", 1000),
             _cell(1, "balancer", 900, leader_us=14.0), _cell(1, "gunicorn-uvloop", 0, ok=False),
             _cell(2, "gunicorn-uvloop", 800), _cell(2, "balancer", 1000, leader_us=16.0)]
    data = {"cells": cells}
    assert report.per_round(data, "hello-close", "rps", "gunicorn-uvloop") == [1.1, 1.25]  # round 1's peer failed
    assert report.per_round(data, "hello-close", "leader_us", None) == [12.0, 14.0, 16.0]
    assert report.per_round(data, "template", "rps", "gunicorn-uvloop") == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", ["plain", "observe+proxy"])
def test_hotpath_harness_serves_every_request_of_a_variant(variant) -> None:
    # What bench.hotpath runs under valgrind, run directly: it must get every pipelined answer back (a lost
    # answer would hang it, and the timeout fails the test), and leave no error output.
    proc = subprocess.run([sys.executable, "-m", "bench.hotpath", "--run", variant, "3", "50"], cwd=REPO,
                          capture_output=True, text=True, timeout=45)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]


def test_free_port_skips_ports_given_to_systems_still_starting() -> None:
    """Systems start together and bind later: a port handed to one must not go to the next (a run lost a round)."""
    from bench.systems import PORTS, free_port

    two = set(PORTS[:2])
    given = {free_port(avoid=set(PORTS) - two) for _ in range(20)}
    assert given <= two  # only ports outside avoid come back (a bound one is skipped too)
    with pytest.raises(RuntimeError, match="no free port"):
        free_port(avoid=set(PORTS))
