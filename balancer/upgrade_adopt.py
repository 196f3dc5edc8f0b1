"""The new image's side of an upgrade: the previous image's workers become records in its supervisor's table."""

from __future__ import annotations

import os
import socket

from balancer import upgrade_state
from balancer.backoff import Backoff
from balancer.board import HANDLED, attach, unpack
from balancer.dispatch import Link
from balancer.process import Phase, WorkerProcess
# A carried worker has no Popen, but it is still our child: waitpid tells its end exactly, as for a forked one.
from balancer.zygote_process import ForkedChild


def adopt_pool(sup, state: dict, process=ForkedChild, exit_fd=os.pidfd_open) -> bool:
    """Put a state's workers in a new supervisor's table and continue its counters; False for a foreign state.

    A foreign state's workers are adopted as generation -1 under generation 0: the pool rolls them as a reload
    does, each slot's old worker serving until its replacement is ready. process and exit_fd make a worker's
    process object and exit fd from its pid (tests/poolmodel.py passes its fakes').
    """
    same = upgrade_state.compatible(state)
    detail = state.get("detail", {}) if same else {}
    per_pid = {w["pid"]: w for w in detail.get("workers", ())}
    for item in state["carried"]["workers"]:
        pid = item["pid"]
        sup.adopt(adopt_worker(item, per_pid.get(pid, {}), None if same else -1, process(pid), exit_fd(pid),
                               sup.clock()))
    if same:
        s = detail["supervisor"]
        sup.generation, sup.failed_generation, sup.target = s["generation"], s["failed_generation"], s["target"]
        for slot, reason, n in s["restarts"]:
            sup.restarts[(slot, reason)] = n
        for slot, failures in s["backoffs"]:
            sup.backoffs.setdefault(slot, Backoff()).failures = failures
        sup.not_before.update({slot: at for slot, at in s["not_before"]})
        sup.dispatcher.redispatched = s["redispatched"]
    else:
        sup.generation = 0
    sup.started_up = True
    return same


def adopt_worker(item: dict, detail: dict, generation: int | None, proc, exit_fd: int, now: float) -> WorkerProcess:
    """A worker record for a carried worker: its channel and board fds as they were, a new exit fd (pidfd).

    Its times are the supervisor's clock (CLOCK_MONOTONIC goes on across execve): a worker whose heartbeat
    stopped before the exec still times out when it would have.
    """
    if item.get("channel_fd") is not None:
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, item["channel_fd"])
        os.set_inheritable(item["channel_fd"], False)
        channel.setblocking(False)
    else:  # a draining worker whose channel had ended
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel.close()
    board_fd = item["board_fd"]
    os.set_inheritable(board_fd, False)
    board = attach(board_fd)
    link = Link(item["slot"], channel, board)
    word = board[HANDLED]  # every handoff sent was handled before the exec (quiesce): start from the board
    handled, refused = unpack(word)
    link.seen_word, link.sent_msgs, link.refused_seen = word, handled, refused
    link.acked_total = item.get("acked_total", 0)
    # Its channel ended (or a send found it gone) before the exec: nothing may be sent to it; its reap follows.
    link.channel_lost = bool(item.get("channel_lost")) or item.get("channel_fd") is None
    link.dispatched = detail.get("dispatched", 0)
    link.returned, link.resumed = detail.get("returned", 0), detail.get("resumed", 0)
    w = WorkerProcess(item["slot"], detail.get("generation", generation if generation is not None else 0),
                      proc, channel, link, exit_fd, now=detail.get("started", now))
    w.board_fd = board_fd
    w.rebalances = detail.get("rebalances", False)  # told its peers again once the new image's table is whole
    w.started_wall = detail.get("started_wall", w.started_wall)
    w.beat = detail.get("beat", {})
    w.reason, w.recycle, w.kill_at = detail.get("reason", ""), detail.get("recycle", False), detail.get("kill_at", 0.0)
    w.last_beat = detail.get("last_beat", now)
    w.phase = Phase.DRAINING if item.get("phase") == "draining" else Phase.READY
    if not w.ready.done():
        w.ready.set_result(True)
    return w
