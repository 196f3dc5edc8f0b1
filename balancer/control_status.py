"""What `balancer status` reports: uptime, per-slot restarts and health, per-worker RSS, CPU % and requests/s."""

from __future__ import annotations

import asyncio
import os
import time

from balancer import __version__
from balancer.control import MAX_INTERVAL
from balancer.process import Phase
from balancer.metrics import read_procs


def instance_name(master) -> str:
    """--name, else the first address the master listens on."""
    if master.config.name:
        return master.config.name
    return master.listeners[0].label if master.listeners else master.config.bind[0]


def summary(master) -> dict:
    """Who this master is: enough to tell several apart (name, pid, binds, uptime) without touching /proc."""
    sup = master.supervisor
    return {"name": instance_name(master), "pid": os.getpid(), "version": __version__,
            "started": master.started, "uptime": round(time.time() - master.started, 3),
            "upgrades": master.upgrader.upgrades, "exec_started": master.upgrader.exec_started,
            "listening": [listener.label for listener in master.listeners],
            "target": sup.target if sup else 0, "generation": sup.generation if sup else 0,
            "serving_generation": serving_generation(sup),
            "reload_failed": bool(sup and sup.reload_failed),
            "booted": master.booted,
            "stopping": master.stopping,
            "ready": sum(1 for w in sup.records() if w.phase is Phase.READY) if sup else 0}


def serving_generation(sup) -> int | None:
    """The oldest code generation a wanted slot serves (every slot runs it or newer); None if a slot is empty."""
    if sup is None:
        return None
    serving = sup.slots
    if not serving or any(w is None for w in serving):
        return None
    return min(w.generation for w in serving)


def requests_done(stats: dict) -> int:
    """Requests a worker has finished (its board counts them as they finish)."""
    return sum(n for _, _, n in stats.get("requests", ()))


def sample(master) -> dict:
    """Per pid, the requests it has finished by now; and the time of this sample."""
    sup = master.supervisor
    done = {w.pid: requests_done(w.stats) for w in sup.records()} if sup else {}
    return {"at": time.monotonic(), "done": done}


async def measure(master, interval: float) -> tuple[dict, dict, dict, float]:
    """Two readings `interval` apart: heartbeats and /proc (read in a thread, as for /metrics) at each end."""
    loop = asyncio.get_running_loop()
    sup = master.supervisor
    pids = [os.getpid()] + ([w.pid for w in sup.records() if not w.exited] if sup else [])
    first, procs_a = sample(master), await loop.run_in_executor(None, read_procs, pids)
    if interval > 0:
        await asyncio.sleep(min(interval, MAX_INTERVAL))
    second = sample(master)
    procs_b = await loop.run_in_executor(None, read_procs, pids)
    return first, second, procs_a, procs_b


def slot_health(sup, now: float) -> list[dict]:
    """Each wanted slot (and any other with a live worker or a restart): restarts by reason, empty, crash-looping."""
    slots = set(range(sup.target)) | {w.slot for w in sup.records()} | {slot for slot, _ in sup.restarts}
    out = []
    for slot in sorted(slots):
        serving = sup.serving(slot)
        backoff = sup.backoffs.get(slot)
        failures = backoff.failures if backoff is not None else 0
        restarts = {reason: n for (s, reason), n in sorted(sup.restarts.items()) if s == slot and n}
        wanted = slot < sup.target
        out.append({"slot": slot, "wanted": wanted, "serving": serving.pid if serving else None,
                    "restarts": restarts, "restarts_total": sum(restarts.values()),
                    "empty": wanted and serving is None,
                    "crash_looping": sup.crash_looping(slot, now),
                    "failures_in_a_row": failures,
                    "respawn_in": max(0.0, round(sup.not_before.get(slot, 0.0) - now, 3)) if serving is None else 0.0})
    return out


async def full_status(master, interval: float) -> dict:
    """Everything `balancer status` shows; CPU % and requests/s are measured over `interval` seconds (0: not)."""
    sup = master.supervisor
    first, second, procs_a, procs_b = await measure(master, interval)
    elapsed = second["at"] - first["at"]

    def cpu_percent(pid: int) -> float | None:
        if interval <= 0 or elapsed <= 0 or pid not in procs_a or pid not in procs_b:
            return None
        return round(100.0 * (procs_b[pid][0] - procs_a[pid][0]) / elapsed, 1)

    def per_second(pid: int) -> float | None:
        if interval <= 0 or elapsed <= 0 or pid not in first["done"] or pid not in second["done"]:
            return None
        return round((second["done"][pid] - first["done"][pid]) / elapsed, 1)

    me = os.getpid()
    now = time.monotonic()
    workers = []
    for w in (sup.records() if sup else ()):
        proc = procs_b.get(w.pid)
        workers.append({"slot": w.slot, "pid": w.pid, "state": w.phase.value, "generation": w.generation,
                        "uptime": round(now - w.started, 3), "open": w.link.open_conns,
                        "dispatched": w.link.dispatched, "requests": requests_done(w.stats),
                        "requests_per_second": per_second(w.pid), "rss": proc[1] if proc else None,
                        "cpu_percent": cpu_percent(w.pid)})
    return {**summary(master), "accepted": master.accepted, "coalesced": master.coalesced,
            "interval": round(elapsed, 3) if interval > 0 else 0,
            "master": {"rss": procs_b[me][1] if me in procs_b else None, "cpu_percent": cpu_percent(me)},
            "workers": workers, "slots": slot_health(sup, now) if sup else [],
            "zygote": master.zygotes.status() if getattr(master, "zygotes", None) is not None else None}
