"""What the master hands its next image: the state of an upgrade, read off a quiesced master (balancer/upgrade.py)."""

from __future__ import annotations

import os
import socket
import sys

from balancer import __version__, upgrade_state
from balancer.process import Phase


def capture(master, upgrader, paused_at: float, pending_signals: list[int], replies: list[int]) -> dict:
    """The state of a master whose accepting is paused and whose handed-out fds are all acked."""
    workers, pool = capture_pool(master.supervisor)
    carried = {
        "argv": sys.argv[1:],
        "listeners": [{"fd": listener.sock.fileno(), "family": int(listener.family), "label": listener.label,
                       "unlink": listener.unlink, "identity": listener.identity, "systemd_fd": listener.systemd_fd}
                      for listener in master.listeners],
        "workers": workers,
        "services": services(master),
        "replies": replies,
    }
    detail = {
        "master": {"accepted": master.accepted, "accept_errors": master.accept_errors,
                   "paused_seconds": master.paused_seconds, "coalesced": master.coalesced,
                   "started": master.started,
                   "reaped": master.reaper.reaped, "reopen_pending": sorted(master.reopen_pending),
                   "upgrades": upgrader.upgrades, "signals": [int(sig) for sig in pending_signals]},
        **pool,
    }
    metrics = next((svc for svc in master.services if hasattr(svc, "bases")), None)
    if metrics is not None:
        from balancer.upgrade_metrics import dump_bases

        detail["metrics"] = dump_bases(metrics)
    return {"version": upgrade_state.written_version(), "balancer": __version__, "pid": os.getpid(),
            "paused_at": paused_at, "paused_cpu": upgrader_cpu(), "carried": carried, "detail": detail}


def capture_pool(sup) -> tuple[list[dict], dict]:
    """The carried part of each ready or draining worker, and the supervisor's and workers' detail."""
    workers = [w for w in sup.records() if w.phase in (Phase.READY, Phase.DRAINING)]
    carried = [{"pid": w.pid, "slot": w.slot, "phase": w.phase.value,
                "channel_fd": w.channel.fileno() if w.channel.fileno() >= 0 else None,
                "board_fd": w.board_fd, "acked_total": w.link.acked_total, "channel_lost": w.link.channel_lost}
               for w in workers]
    detail = {
        "supervisor": {"generation": sup.generation, "failed_generation": sup.failed_generation, "target": sup.target,
                       "restarts": [[slot, reason, n] for (slot, reason), n in sup.restarts.items()],
                       "backoffs": [[slot, b.failures] for slot, b in sup.backoffs.items()],
                       "not_before": [[slot, at] for slot, at in sup.not_before.items()],
                       "redispatched": sup.dispatcher.redispatched},
        "workers": [{"pid": w.pid, "generation": w.generation, "started": w.started, "started_wall": w.started_wall,
                     "beat": w.beat, "last_beat": w.last_beat, "reason": w.reason, "recycle": w.recycle, "kill_at": w.kill_at,
                     "dispatched": w.link.dispatched, "returned": w.link.returned, "resumed": w.link.resumed,
                     "rebalances": w.rebalances}
                    for w in workers],
    }
    return carried, detail


def upgrader_cpu() -> float:
    """This process's CPU seconds as the state is written (the new image subtracts it from its own)."""
    return cpu_seconds()


def services(master) -> dict:
    """The control socket's and the metrics endpoint's listening sockets, and the files the control socket made."""
    out = {}
    for service in master.services:
        sock = listening_socket(service)
        if sock is None:
            continue
        if hasattr(service, "bases"):
            out["metrics"] = {"fd": sock.fileno(), "family": int(sock.family), "address": service.address}
        elif hasattr(service, "pid_identity"):
            out["control"] = {"fd": sock.fileno(), "family": int(socket.AF_UNIX), "path": service.path,
                              "identity": service.identity, "pid_identity": service.pid_identity,
                              "link": service.link, "link_identity": service.link_identity}
    return out


def listening_socket(service):
    """The one listening socket of an asyncio server a service runs, or None."""
    server = getattr(service, "server", None)
    server = getattr(server, "server", server)  # the metrics endpoint wraps its asyncio server
    sockets = getattr(server, "sockets", None) or ()
    return sockets[0] if len(sockets) == 1 else None


def cpu_seconds() -> float:
    """User and system CPU seconds of this process so far (they go on across execve)."""
    times = os.times()
    return times.user + times.system


def survivors(state: dict) -> list[int]:
    """Every fd the state names: these must survive the exec."""
    carried = state["carried"]
    fds = [item["fd"] for item in carried["listeners"]]
    fds += [item["fd"] for item in carried.get("services", {}).values()]
    for w in carried["workers"]:
        fds.append(w["board_fd"])
        if w.get("channel_fd") is not None:
            fds.append(w["channel_fd"])
    if carried.get("bridge") is not None:
        fds.append(carried["bridge"]["fd"])
    return fds + list(carried.get("replies", ()))


def notify_env(notifier) -> dict:
    """NOTIFY_SOCKET and the watchdog for the new image, which speaks for the same service (same MAINPID)."""
    if not notifier.address:
        return {}
    address = notifier.address
    out = {"NOTIFY_SOCKET": "@" + address[1:].decode() if isinstance(address, bytes) else address}
    if notifier.watchdog_every:
        out.update(WATCHDOG_USEC=str(int(notifier.watchdog_every * 2e6)), WATCHDOG_PID=str(os.getpid()))
    return out
