"""What the control client prints: a master's status table, and the list of this user's masters (`balancer ls`)."""

from __future__ import annotations

import json
import os
import sys
import time


def duration(seconds: float) -> str:
    """42s, 5m02s, 3h05m, 2d03h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    return f"{s // 86400}d{s // 3600 % 24:02d}h"


def figure(value, fmt: str = "{:.1f}") -> str:
    """A measured figure, or '-' when there is none (not measured, process gone)."""
    return "-" if value is None else fmt.format(value)


def mebibytes(n: int | None) -> float | None:
    """Bytes in MiB."""
    return None if n is None else n / (1024 * 1024)


def generations(reply: dict) -> str:
    """The generation served, and where a reload stands when the served one is not the wanted one."""
    wanted, serving = reply["generation"], reply.get("serving_generation", reply["generation"])
    if not reply.get("booted", True):
        return f"starting (generation {wanted})"
    if serving == wanted:
        return f"generation {wanted}"
    served = "no full generation" if serving is None else f"generation {serving}"
    if reply.get("reload_failed"):
        return f"{served} (reload to generation {wanted} failed: see the master's log)"
    return f"{served} (reloading to generation {wanted})"


def zygote_lines(z: dict) -> list[str]:
    """--preload: the zygote's line, and the last reload's import error while it stands."""
    imported = f", imported in {z['import_seconds']:.2f}s" if z.get("import_seconds") is not None else ""
    boot = z.get("boot_p50", {}).get("fork")
    booted = f", fork to ready {boot * 1000:.0f} ms (p50)" if boot is not None else ""
    lines = [f"zygote pid {z['pid'] or '-'}, generation {z['generation']}, {z['state']}{imported}; "
             f"{z['forked']} workers forked, {z['spawned']} spawned{booted}"]
    if z.get("error"):
        lines.append(f"zygote: {z['error']}")
    if z.get("reload_error"):
        lines.append(f"last reload failed, the code does not import: {z['reload_error']}")
    return lines


def upgraded(reply: dict) -> str:
    """', upgraded N times, this image up T' for a master re-executed in place; '' for one never upgraded."""
    if not reply.get("upgrades"):
        return ""
    return f"; upgraded {reply['upgrades']} times, this image up {duration(time.time() - reply['exec_started'])}"


def format_status(reply: dict) -> str:
    """The status reply as a header, a table of workers and a line per slot that needs attention."""
    master = reply.get("master", {})
    lines = [f"{reply['name']}: master pid {reply['pid']}, up {duration(reply['uptime'])}, "
             f"{reply['ready']}/{reply['target']} workers ready, {generations(reply)}, "
             f"listening on {', '.join(reply['listening'])}{upgraded(reply)}",
             f"{reply['accepted']} connections accepted; master RSS {figure(mebibytes(master.get('rss')))} MiB, "
             f"CPU {figure(master.get('cpu_percent'))}%",
             f"{'slot':>4} {'pid':>7}  {'state':<9}{'gen':>4} {'up':>7} {'restarts':>8} {'RSS MiB':>8} {'CPU %':>6} "
             f"{'req/s':>7} {'open':>5} {'dispatched':>10}"]
    if reply.get("zygote"):
        lines[2:2] = zygote_lines(reply["zygote"])
    slots = {s["slot"]: s for s in reply.get("slots", [])}
    for w in reply["workers"]:
        restarts = slots.get(w["slot"], {}).get("restarts_total", 0)
        lines.append(f"{w['slot']:>4} {w['pid']:>7}  {w['state']:<9}{w['generation']:>4} {duration(w['uptime']):>7} "
                     f"{restarts:>8} {figure(mebibytes(w.get('rss'))):>8} {figure(w.get('cpu_percent')):>6} "
                     f"{figure(w.get('requests_per_second')):>7} {w['open']:>5} {w['dispatched']:>10}")
    live = {w["slot"] for w in reply["workers"]}
    for slot in sorted(set(slots) - live):
        if slots[slot]["wanted"]:
            lines.append(f"{slot:>4} {'-':>7}  {'empty':<9}")
    for s in slots.values():
        notes = []
        if s["empty"]:
            later = f", next start in {s['respawn_in']:.1f}s" if s["respawn_in"] else ""
            notes.append(f"EMPTY: no ready worker{later}")
        if s["crash_looping"]:
            notes.append(f"CRASH-LOOPING: died {s['failures_in_a_row']} times in a row, each soon after starting")
        if s["restarts"]:
            notes.append("restarts: " + ", ".join(f"{n} {reason}" for reason, n in s["restarts"].items()))
        if notes:
            lines.append(f"slot {s['slot']}: " + "; ".join(notes))
    if reply.get("interval"):
        lines.append(f"(CPU % and req/s over the last {reply['interval']:.1f}s)")
    return "\n".join(lines)


# ---- listing masters ------------------------------------------------------------------------------------

def master_state(info: dict) -> str:
    """One word for where a master stands: starting, serving, degraded, reloading, reload-failed, stopping."""
    if info.get("stopping"):
        return "stopping"
    if not info.get("booted", True):
        return "starting"
    if info.get("serving_generation") is None:  # a wanted slot has no worker (crashed, respawning)
        return "degraded"
    if info["serving_generation"] == info["generation"]:
        return "serving"
    return "reload-failed" if info.get("reload_failed") else "reloading"


def format_list(found: list[tuple[str, dict]]) -> str:
    """A table, one master a line: name, pid, ready/wanted workers, generation, state, uptime, binds."""
    rows = [("NAME", "PID", "WORKERS", "GEN", "STATE", "UPTIME", "LISTENING")]
    rows += [(info["name"], str(info["pid"]), f"{info['ready']}/{info['target']}", str(info["generation"]),
              master_state(info), duration(info["uptime"]), ", ".join(info["listening"])) for _, info in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


def list_masters(found: list[tuple[str, dict]], as_json: bool, several: bool = False) -> int:
    """Print the masters found (`balancer ls`; `status` when several match); the exit code, 0."""
    if as_json:
        print(json.dumps([{**{k: v for k, v in info.items() if k != "ok"}, "control_socket": path}
                          for path, info in found], indent=2))
    elif found:
        print(format_list(found))
    else:
        print(f"balancer: no balancer master of uid {os.getuid()} is running", file=sys.stderr)
    if several and not as_json:
        print("balancer: several masters run: pass --name or --pid for one's workers", file=sys.stderr)
    sys.stdout.flush()  # here, where a reader that left shows as BrokenPipeError
    return 0
