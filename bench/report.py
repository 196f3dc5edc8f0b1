"""Turn the cells of a run into a markdown table, a PNG chart and PASS/MISS lines for the targets."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

# (label, short label for the chart, workload, figure, peer, comparison, threshold).
# figure: rps | p99 | p99_short (the short requests' p99, tail cells) | leader_us (balancer master CPU per
#         request: per new connection in hello-close) | worker_us (CPU of the serving processes per request).
# Issue 25's targets: the tail cells at 70% and 85% of gunicorn-uvloop's capacity, then the no-regression guards
# (every system runs the same aiohttp code on the hello cells, so a win there would be noise).
TARGETS = [
    *[(f"{family} {load}%: short p99 <= {limit}x {peer}", f"{family}-{load} / {peer}", f"{family}-{load}",
       "p99_short", peer, "<=", limit)
      for family, peers in (("tail-close", (("gunicorn-uvloop", 0.8), ("reuseport", 0.6), ("node-cluster", 0.8))),
                            ("tail-keepalive", (("reuseport", 0.6), ("gunicorn-uvloop", 0.5))))
      for load in (70, 85) for peer, limit in peers],
    # Dispatch that knows what a worker is doing, against the least-connections dispatch it replaced.
    *[(f"tail-close {load}%: short p99 < 1.0x balancer-base (least-connections)", f"tail-close-{load} / base",
       f"tail-close-{load}", "p99_short", "balancer-base", "<", 1.0) for load in (70, 85)],
    ("hello keep-alive req/s >= 0.97x gunicorn-uvloop", "keep-alive / gunicorn-uvloop",
     "hello-keepalive", "rps", "gunicorn-uvloop", ">=", 0.97),
    ("hello new-connection req/s >= 1.0x gunicorn-uvloop", "new-conn / gunicorn-uvloop",
     "hello-close", "rps", "gunicorn-uvloop", ">=", 1.0),
    ("template req/s >= 1.9x single", "template / single", "template", "rps", "single", ">=", 1.9),
    ("master CPU <= 10 us per new connection", "master us / new conn",
     "hello-close", "leader_us", None, "<=", 10.0),
    ("stretch: hello new-connection req/s >= 1.4x node-cluster", "new-conn / node-cluster",
     "hello-close", "rps", "node-cluster", ">=", 1.4),
]
# Every target is measured on the like-for-like row: balancer on its defaults serving the peers' Application.
SUBJECT = "balancer"


def _ours(system: str) -> bool:
    """balancer, or a variant of it (balancer-https): shown in bold and red."""
    return system == SUBJECT or system.startswith(SUBJECT + "-")


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _cell_figure(cell: dict, figure: str) -> float | None:
    """One cell's value of a target's figure (None when the cell did not measure it)."""
    if figure == "rps":
        return cell["rps"]
    if figure == "p99":
        return cell["latency_us"]["p99"]
    if figure == "p99_short":
        return cell["short_latency_us"]["p99"] if "short_latency_us" in cell else None
    if figure == "worker_us":
        return cell.get("worker_us_per_request")
    if cell["processes"] and cell["processes"][0]["role"] != "server":
        return cell.get("leader_us_per_request")
    return None


def aggregate(data: dict) -> dict[tuple[str, str], dict]:
    """Per (system, workload): medians over the rounds that ran, error totals, CPU per process position."""
    out: dict[tuple[str, str], dict] = {}
    for system in data["systems"]:
        for w in data["workloads"]:
            cells = [c for c in data["cells"] if c["system"] == system and c["workload"] == w["name"]]
            ok = [c for c in cells if c["ok"]]
            agg = {"runs": len(cells), "ok": len(ok), "crashed": any(c.get("crashed") for c in cells),
                   "failed": len(cells) - len(ok), "notes": sorted({c.get("note", "") for c in cells} - {""}),
                   "errors_list": [c["error"] for c in cells if not c["ok"] and c.get("error")]}
            if ok:
                rps = [c["rps"] for c in ok]
                agg.update(
                    rps=_median(rps), rps_min=min(rps), rps_max=max(rps),
                    p50=_median([c["latency_us"]["p50"] for c in ok]),
                    p99=_median([c["latency_us"]["p99"] for c in ok]),
                    p99_list=[c["latency_us"]["p99"] for c in ok],
                    socket_errors=sum(c["errors"]["socket"] for c in ok),
                    non2xx=sum(c["errors"]["non2xx"] for c in ok),
                    requests=sum(c["requests"] for c in ok),
                    p999=_median([c["latency_us"]["p999"] for c in ok]),
                    leader_us=_median([v for c in ok if (v := _cell_figure(c, "leader_us")) is not None]),
                    worker_us=_median([v for c in ok if (v := _cell_figure(c, "worker_us")) is not None]),
                    other_pct=_median([c["machine"]["other_pct"] for c in ok if "other_pct" in c.get("machine", {})]),
                    loadgen_pct=_median([100 * c["loadgen_cpu_s"] / c["duration_s"] for c in ok if c["duration_s"]]),
                )
                short = [c["short_latency_us"] for c in ok if "short_latency_us" in c]
                if short:  # a tail cell: the short requests' percentiles, and how late the generator sent
                    agg.update(p50_short=_median([x["p50"] for x in short]),
                               p99_short=_median([x["p99"] for x in short]),
                               p999_short=_median([x["p999"] for x in short]),
                               p99_short_list=[x["p99"] for x in short],
                               late_p99=_median([c["late_us"]["p99"] for c in ok if "late_us" in c]),
                               rate=_median([c["rate"] for c in ok]))
                # CPU by position: leader first, then workers busiest first; median per position over rounds.
                width = max(len(c["processes"]) for c in ok)
                cpu = []
                for i in range(width):
                    vals = [c["processes"][i]["cpu_pct"] for c in ok if i < len(c["processes"])]
                    role = next(c["processes"][i]["role"] for c in ok if i < len(c["processes"]))
                    cpu.append((role, _median(vals)))
                agg["cpu"] = cpu
                agg["cpu_total"] = _median([sum(p["cpu_pct"] for p in c["processes"]) for c in ok])
            out[(system, w["name"])] = agg
    return out


def _figure(agg: dict, figure: str) -> float | None:
    return agg.get(figure) if agg else None


def per_round(data: dict, workload: str, figure: str, peer: str | None) -> list[float]:
    """The target's figure round by round: the subject's value, or its ratio to the peer's cell of that round.

    The machine's speed drifts over minutes (a VM); cells of one round ran minutes apart at most, so the
    spread of these shows how far a ratio of medians can be trusted.
    """
    def by_round(system: str) -> dict[int, float]:
        return {c["round"]: v for c in data["cells"] if c["system"] == system and c["workload"] == workload
                and c["ok"] and (v := _cell_figure(c, figure)) is not None}
    mine = by_round(SUBJECT)
    if peer is None:
        return [mine[r] for r in sorted(mine)]
    theirs = by_round(peer)
    return [mine[r] / theirs[r] for r in sorted(mine) if theirs.get(r)]


def targets(data: dict) -> list[dict]:
    agg = aggregate(data)
    rows = []
    for label, short, workload, figure, peer, op, threshold in TARGETS:
        mine = _figure(agg.get((SUBJECT, workload)), figure)
        row = {"label": label, "short": short, "workload": workload, "figure": figure, "peer": peer, "op": op,
               "threshold": threshold, "value": None, "status": "n/a", "detail": "",
               "rounds": per_round(data, workload, figure, peer)}
        if peer is None:
            if mine is not None:
                row["value"] = mine
                row["detail"] = f"{mine:.1f} us"
        else:
            theirs = _figure(agg.get((peer, workload)), figure)
            if mine is not None and theirs:
                row["value"] = mine / theirs
                if figure == "worker_us":
                    row["detail"] = f"{row['value']:.3f}x ({SUBJECT} {mine:.1f} us vs {peer} {theirs:.1f} us)"
                else:
                    unit = (" req/s" if figure == "rps" else " ms (short requests' p99)" if figure == "p99_short"
                            else " ms")
                    scale, places = (1, 0) if figure == "rps" else (1e-3, 2)
                    # 3 decimals: at 2, a 1.047x MISS would print as "1.05x" against a 1.05 target
                    row["detail"] = (f"{row['value']:.3f}x ({SUBJECT} {mine * scale:,.{places}f} vs "
                                     f"{peer} {theirs * scale:,.{places}f}{unit})")
        if row["value"] is not None:
            row["status"] = "PASS" if meets(row["value"], op, threshold) else "MISS"
            if len({meets(v, op, threshold) for v in row["rounds"]}) > 1:  # the rounds disagree: say so
                row["detail"] += f"; rounds straddle {threshold:g} ({min(row['rounds']):.2f}-{max(row['rounds']):.2f})"
        rows.append(row)
    return rows


def meets(value: float, op: str, threshold: float) -> bool:
    """True when value satisfies `op threshold` (op: >=, <= or <)."""
    return value >= threshold if op == ">=" else value <= threshold if op == "<=" else value < threshold


def target_lines(data: dict) -> list[str]:
    return [f"{t['status']:4} {t['label']}: {t['detail'] or 'not measured in this run'}" for t in targets(data)]


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def _cpu(agg: dict) -> str:
    if not agg.get("cpu"):
        return "-"
    leaders = [f"{role} {pct:.0f}" for role, pct in agg["cpu"] if role != "worker"]
    workers = [f"{pct:.0f}" for role, pct in agg["cpu"] if role == "worker"]
    parts = leaders + ([("worker " if len(workers) == 1 else "workers ") + " + ".join(workers)] if workers else [])
    return " / ".join(parts)


def _header(data: dict) -> list[str]:
    env = data["env"]
    return [
        f"Command: `{env['command']}` ({env['mode']} run: {env['rounds']} round(s) x {env['duration_s']} s per cell, "
        f"{env['workers']} workers per system, wrk -t{env['threads']} -c{env['connections']}; "
        f"{env['elapsed_s'] / 60:.1f} min, {env['started']}).",
        f"Machine: {env['cpu']}, {env['cores']} cores, Linux {env['kernel']}; Python {env['python']}, "
        f"aiohttp {env['aiohttp']}, {env['gunicorn']}, node {env['node']}, {env['wrk']}; commit {env['commit']}.",
        "Load generator and servers share the same cores (loopback).",
    ] + _tail_header(env)


def _tail_header(env: dict) -> list[str]:
    """How the tail cells' rates were set, when the run had any."""
    capacity = env.get("capacity")
    if not capacity:
        return []
    base = f" balancer-base ran {env.get('baseline')} ({env['baseline_commit']})." if env.get("baseline_commit") else ""
    return [f"Tail cells: mix `{env.get('tail_mix')}` ms of CPU per request (`/spin`), Poisson arrivals at "
            + ", ".join(f"{x:.0%}" for x in env.get("tail_loads", [])) + " of gunicorn-uvloop's capacity measured "
            f"before the first round: {capacity['tail-close']:,.0f} req/s with a new connection per request, "
            f"{capacity['tail-keepalive']:,.0f} keep-alive (closed loop, 16 in flight); every system at the same "
            f"rates and, within a round, the same schedule. \"Short\" requests are the shortest class.{base}"]


def _rounds(t: dict) -> str:
    """The per-round figures of a target, as measured in each round."""
    if not t["rounds"]:
        return "-"
    return ", ".join(f"{v:.2f}x" if t["peer"] else f"{v:.1f}" for v in t["rounds"])


def _targets_table(data: dict) -> list[str]:
    lines = ["| target | result | measured (medians) | round by round |", "|---|---|---|---|"]
    for t in targets(data):
        lines.append(f"| {t['label']} | {t['status']} | {t['detail'] or 'not measured'} | {_rounds(t)} |")
    return lines


def _summary_table(data: dict, agg: dict) -> list[str]:
    wls = data["workloads"]
    unit = {"rps": "req/s", "p99": "p99 ms", "p99_short": "short p99 ms"}
    head = ["system"] + [f"{w['name']} {unit[w['key']]}" for w in wls] + ["errors", "crashed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system in data["systems"]:
        row = [f"**{system}**" if _ours(system) else system]
        errors, crashed = 0, False
        for w in wls:
            a = agg[(system, w["name"])]
            crashed |= a["crashed"] or a["failed"] > 0
            if not a["runs"]:  # not a workload of this system (https workloads run on the https systems)
                row.append("-")
                continue
            if a.get("rps") is None:
                row.append("failed")
                continue
            errors += a["socket_errors"] + a["non2xx"]
            row.append(f"{a['rps']:,.0f}" if w["key"] == "rps" else _ms(a[w["key"]]))
        row += [str(errors), "yes" if crashed else "no"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _table(data: dict, agg: dict, w: dict, head: list[str], ran: str, row) -> list[str]:
    """head, then row(system cell, aggregate) for each system that ran workload w; one that failed every cell
    gets a row saying so. ran: a key the aggregate of a cell that ran has."""
    columns = head[0].count("|") - 1
    lines = list(head)
    for system in data["systems"]:
        a = agg[(system, w["name"])]
        if not a["runs"]:
            continue
        name = f"**{system}**" if _ours(system) else system
        if a.get(ran) is None:
            lines.append(f"| {name} | failed: {'; '.join(a['errors_list'])[:120] or '?'} |" + "  |" * (columns - 2))
        else:
            lines.append(row(name + (" (crashed)" if a["crashed"] else ""), a))
    return lines


def _other(a: dict) -> str:
    return "-" if a["other_pct"] is None else f"{a['other_pct']:.0f}"


def _tail_row(name: str, a: dict) -> str:
    """A tail cell's row: the short requests' and all requests' latency, and what the generator cost."""
    return (f"| {name} | {a['rps']:,.0f} | {a['rate']:,.0f} | {_ms(a['p50_short'])} | {_ms(a['p99_short'])} | "
            f"{_ms(a['p999_short'])} | {_ms(a['p50'])} | {_ms(a['p99'])} | {_ms(a['p999'])} | "
            f"{a['socket_errors']} + {a['non2xx']} | {_cpu(a)} | {a['loadgen_pct']:.0f} | {_ms(a['late_p99'])} | "
            f"{_other(a)} |")


def _row(name: str, a: dict) -> str:
    leader = "-" if a["leader_us"] is None else f"{a['leader_us']:.1f}"
    return (f"| {name} | {a['rps']:,.0f} | {a['rps_min']:,.0f}-{a['rps_max']:,.0f} | {_ms(a['p50'])} | "
            f"{_ms(a['p99'])} | {a['socket_errors']} + {a['non2xx']} | {_cpu(a)} | {a['cpu_total']:.0f} | "
            f"{leader} | {a['loadgen_pct']:.0f} | {_other(a)} |")


TAIL_HEAD = ["| system | req/s | sent req/s | short p50 ms | short p99 ms | short p99.9 ms | all p50 ms | all p99 ms "
             "| all p99.9 ms | errors (socket + non-2xx) | CPU % of a core per process | load gen CPU % "
             "| load gen late p99 ms | other CPU % |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
HEAD = ["| system | req/s | range | p50 ms | p99 ms | errors (socket + non-2xx) | CPU % of a core per process "
        "| total CPU % | leader us/req | load gen CPU % | other CPU % |", "|---|---|---|---|---|---|---|---|---|---|---|"]


def _workload_table(data: dict, agg: dict, w: dict) -> list[str]:
    if w["key"] == "p99_short":
        return _table(data, agg, w, TAIL_HEAD, "p99_short", _tail_row)
    return _table(data, agg, w, HEAD, "rps", _row)


def markdown(data: dict) -> str:
    agg = aggregate(data)
    lines = ["# Benchmark results", "", *_header(data), "",
             "## Targets (balancer, medians of this run; reported, not asserted)", "", *_targets_table(data),
             "", "## Summary (median over rounds)", "", *_summary_table(data, agg)]
    for w in data["workloads"]:
        lines += ["", f"## {w['name']}: {w['title']}", "", *_workload_table(data, agg, w)]
    notes = sorted({n for a in agg.values() for n in a["notes"]})
    cells = data["cells"]
    rerun = sum(c.get("attempts", 1) - 1 for c in cells)
    disturbed = [f"{c['system']} {c['workload']} round {c['round']} ({c['machine']['other_pct']:.0f}%)"
                 for c in cells if c.get("disturbed")]
    if rerun or disturbed:
        notes.append(f"{rerun} cell run(s) were discarded and re-run because processes outside the benchmark "
                     f"used more than {data['env'].get('max_other', 25):g}% of a core during them"
                     + (f"; still disturbed after {data['env'].get('retries', 0)} re-run(s), kept as measured: "
                        + ", ".join(disturbed) if disturbed else ""))
    lines += [
        "",
        "Columns: req/s = requests completed / run time (median; range = min-max over rounds). Latency is per "
        "request (wrk's coordinated-omission correction undone; open loop: from each request's scheduled send "
        "time). CPU = utime+stime from /proc of every process of the system during the cell, % of one core; "
        "leader = balancer master / gunicorn arbiter / node primary / reuseport launcher; leader us/req = its "
        "CPU microseconds per request, which in hello-close is per new connection. other CPU = whole-machine "
        "busy time (/proc/stat) minus the system's and the load generator's: interference from outside the "
        "benchmark (this is a VM: time the host takes away does not show as steal, it slows everything "
        "down; the per-round ranges show it).",
        "",
        "Systems: " + "; ".join(f"{n} = {d}" for n, d in data["descriptions"].items()) + ".",
    ]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(data)
    wls = data["workloads"]
    n = len(wls) + 1
    cols = 3
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(15, 4.2 * rows), squeeze=False)
    for ax, w in zip(axes.flat, wls):
        key = w["key"]
        systems = [s for s in data["systems"] if agg[(s, w["name"])]["runs"]]  # those this workload ran on
        colors = ["#d62728" if _ours(s) else "#7f7f7f" for s in systems]
        vals, lo, hi = [], [], []
        for s in systems:
            a = agg[(s, w["name"])]
            if key == "rps":
                v = a.get("rps") or 0.0
                vals.append(v)
                lo.append(v - (a.get("rps_min") or v))
                hi.append((a.get("rps_max") or v) - v)
            else:
                ps = [p / 1000 for p in a.get(f"{key}_list", [])]
                v = (a.get(key) or 0) / 1000
                vals.append(v)
                lo.append(v - min(ps) if ps else 0)
                hi.append(max(ps) - v if ps else 0)
        ax.bar(range(len(systems)), vals, color=colors, yerr=[lo, hi], capsize=3)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:,.0f}" if key == "rps" else f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(systems)))
        ax.set_xticklabels(systems, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"{w['name']}: " + ("req/s (higher is better)" if key == "rps" else
                                         "short p99 ms (lower is better)" if key == "p99_short" else
                                         "p99 ms (lower is better)"),
                     fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    ax = axes.flat[len(wls)]
    rows_t = [t for t in targets(data) if t["value"] is not None]
    margins = [(t["value"] / t["threshold"]) if t["op"] == ">=" else (t["threshold"] / t["value"] if t["value"] else 0)
               for t in rows_t]  # >= 1 passes (for "<", 1 itself does not)
    ax.barh(range(len(rows_t)), margins, color=["#2ca02c" if t["status"] == "PASS" else "#ff7f0e" for t in rows_t])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(rows_t)))
    ax.set_yticklabels([f"{t['short']} {t['op']} {t['threshold']:g}" for t in rows_t], fontsize=8)
    ax.invert_yaxis()
    for i, t in enumerate(rows_t):
        ax.text(margins[i], i, f" {t['value']:.2f}{'x' if t['peer'] else ' us'}", va="center", fontsize=8)
    ax.set_xlim(0, max(margins + [1.0]) * 1.25)
    ax.set_title("balancer targets: margin (>= 1 is PASS)", fontsize=10)
    for extra in axes.flat[len(wls) + 1:]:
        extra.axis("off")
    env = data["env"]
    fig.suptitle(f"balancer vs peers: {env['workers']} workers, {env['rounds']} round(s) x {env['duration_s']} s, "
                 f"{env['cores']} cores, `{env['command']}`", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(data: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "results.md", out / "results.png"
    md.write_text(markdown(data))
    chart(data, png)
    return md, png


START, END = "<!-- latest-results:start -->", "<!-- latest-results:end -->"


def update_readme(data: dict, readme: Path, results: Path) -> bool:
    """Replace the block between the latest-results markers in a README with this run's command,
    targets, summary and chart; the per-workload tables stay in results/results.md."""
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    where = Path(os.path.relpath(results, readme.parent)).as_posix()
    body = [START, *_header(data), "", "### Targets", "", *_targets_table(data), "",
            "### Summary (median over rounds)", "", *_summary_table(data, aggregate(data)), "",
            f"![benchmark chart]({where}/results.png)", "",
            f"Per-workload tables (p50/p99, errors, CPU per process): [{where}/results.md]({where}/results.md).",
            END]
    head, rest = text.split(START, 1)
    readme.write_text(head + "\n".join(body) + rest.split(END, 1)[1])
    return True
