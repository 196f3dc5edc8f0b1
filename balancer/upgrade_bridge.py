"""The bridge: a forked child that accepts and hands out connections while the master re-execs itself.

The exec and the new image's imports take 50-100 ms of CPU, and on a busy machine several times that in wall
time. Without the bridge every new connection waits that long in the backlog. The bridge is a fork of the
quiesced master taken just before the exec: it has the same listeners, worker channels and ack boards, and
the master's own Dispatcher (without the hold, which needs the loop), and runs a plain epoll loop over the
listeners. When the new image has imported everything and read its state, it asks the bridge to stop, and
the bridge hands back what the Dispatcher knows that the boards do not: per worker the hand-offs not yet
acknowledged (with the bridge's copies of their fds, so a worker that dies or refuses still loses nothing),
the message numbers, the counters, and any connection no worker could take. Its report is version-free JSON,
so an image of another release can stop it too.

The bridge reads no worker's channel (the new image reads what came meanwhile: READY, IDLE, REFUSE) and reaps
no process; it dies with its parent (PR_SET_PDEATHSIG) and exits when stopped.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import socket
import time
import warnings
from typing import TYPE_CHECKING

from balancer.accepting import ACCEPT_BATCH, SKIP_ERRNOS, accept_batch
from balancer.errnos import RESOURCE_ERRNOS
from balancer.signals import HANDLED_SIGNALS

if TYPE_CHECKING:
    from balancer.dispatch import Dispatcher, Link
    from balancer.process import WorkerProcess

STOP = b"stop"
MAX_FDS = 250  # fds per report message (the kernel's SCM_MAX_FD is 253)
CHUNK = 32768  # bytes per report message: a SOCK_SEQPACKET message must fit the socket's send buffer
LIFETIME = 300.0  # seconds: a bridge nobody stopped ends (its parent hangs); the workers' connections go on
POLL = 0.002  # seconds between looks at the ack boards while nothing arrives
STOP_TIMEOUT = 5.0  # seconds the stopping image waits for the report
_PR_SET_PDEATHSIG = 1


def start(master) -> tuple[int, socket.socket]:
    """Fork the bridge from the quiesced master; its pid and the master's end of its control socket."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    with warnings.catch_warnings():  # a multi-threaded master: the child touches no lock another thread may hold
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the bridge
        code = 1
        try:
            mine.close()
            code = serve(master, theirs, parent)
        except BaseException as exc:  # noqa: BLE001 - the stopping image says the report is missing
            os.write(2, f"balancer upgrade bridge failed: {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(code)
    theirs.close()
    return pid, mine


def serve(master, control: socket.socket, parent: int) -> int:
    """The bridge's life: accept and dispatch until told to stop, then report; the exit code."""
    for sig in HANDLED_SIGNALS:  # the master's handlers write to its loop's wake-up fd: not ours
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the master died before the prctl took
        return 1
    dispatcher: Dispatcher = master.dispatcher
    if dispatcher.holding is not None:
        dispatcher.release_held()
        dispatcher.holding = None  # holds wait on the loop's timers and the workers' IDLE messages
    dispatcher._on_blocked = lambda link: None  # a full channel: its worker gets nothing more from the bridge
    listeners = {listener.sock.fileno(): listener for listener in master.listeners}
    poller = select.epoll()
    for fd in listeners:
        poller.register(fd, select.EPOLLIN)
    poller.register(control.fileno(), select.EPOLLIN)
    started = time.monotonic()
    accepted = 0
    errors: dict[str, int] = {}  # accept() failures by errno name, as the master counts them
    until = started + LIFETIME
    while time.monotonic() < until:
        events = poller.poll(POLL if dispatcher.links else 0.05)
        stop = False
        for fd, _ in events:
            if fd == control.fileno():
                # Read, not left: a socket closed with a message unread resets its peer, which loses the report.
                control.recv(len(STOP))
                stop = True
                break
        if stop:
            break
        room = dispatcher.survey()
        for fd, _ in events:
            listener = listeners.get(fd)
            if listener is None or room <= 0 or dispatcher.homeless:
                continue
            fds, err = accept_batch(listener.sock, min(room, ACCEPT_BATCH))
            if err and err != errno.EAGAIN and err not in SKIP_ERRNOS:
                name = errno.errorcode.get(err, str(err))
                errors[name] = errors.get(name, 0) + 1
                if err in RESOURCE_ERRNOS:  # out of fds or memory: the listener stays readable, so do not spin
                    time.sleep(0.005)
            if fds:
                accepted += len(fds)
                room -= len(fds)
                dispatcher.dispatch([(fd, listener.family) for fd in fds], surveyed=True)
        if dispatcher.homeless:
            dispatcher.retry_homeless()
        if room <= 0 or dispatcher.homeless:  # the listeners stay readable: wait for acks instead of spinning
            time.sleep(POLL)
    stopped = time.monotonic()
    dispatcher.collect_all()
    report, fds = make_report(dispatcher, master.supervisor.records(), accepted, errors, started, stopped)
    send_report(control, report, fds)
    return 0


def make_report(dispatcher: Dispatcher, workers: list[WorkerProcess], accepted: int, errors: dict[str, int],
                started: float, stopped: float) -> tuple[dict, list[int]]:
    """What the next owner of the workers' links needs (the fds go after the JSON, in the order it names them)."""
    fds: list[int] = []
    links = []
    for w in workers:
        link, pid = w.link, w.pid
        unacked = []
        for conn_id, (fd, family) in link.unacked.items():
            unacked.append([conn_id, family])
            fds.append(fd)
        links.append({"pid": pid, "seen_word": link.seen_word, "sent_msgs": link.sent_msgs,
                      "refused_seen": link.refused_seen, "acked_total": link.acked_total,
                      "dispatched": link.dispatched, "handed": link.handed, "unbegun": link.unbegun,
                      "handed_at": link.handed_at, "ack_progress": link.ack_progress,
                      "channel_lost": link.channel_lost, "sent": [[seq, ids] for seq, ids in link.sent],
                      "unacked": unacked})
    homeless = []
    for fd, family in dispatcher.homeless:
        homeless.append(family)
        fds.append(fd)
    report = {"links": links, "homeless": homeless, "next_id": dispatcher._next_id,
              "redispatched": dispatcher.redispatched, "accepted": accepted, "accept_errors": errors,
              "started": started, "stopped": stopped, "fds": len(fds)}
    return report, fds


def send_report(control: socket.socket, report: dict, fds: list[int]) -> None:
    """The report's length, the report in CHUNK-byte messages, then its fds MAX_FDS at a time."""
    data = json.dumps(report).encode()
    control.setblocking(True)
    control.send(b"%d" % len(data))
    for at in range(0, len(data), CHUNK):
        control.send(data[at:at + CHUNK])
    for at in range(0, len(fds), MAX_FDS):
        socket.send_fds(control, [b"f"], fds[at:at + MAX_FDS])


def stop(pid: int, control: socket.socket, timeout: float = STOP_TIMEOUT) -> tuple[dict | None, list[int], str]:
    """Stop the bridge and reap it: its report and fds (None, [] and why when it gave none)."""
    report, fds, why = None, [], ""
    try:
        control.settimeout(timeout)
        control.send(STOP)
        length = control.recv(32)
        if not length:
            why = "the bridge ended without a report"
        else:
            data = b""
            while len(data) < int(length):
                chunk = control.recv(CHUNK)
                if not chunk:
                    raise ConnectionError("the report was cut short")
                data += chunk
            report = json.loads(data)
            while len(fds) < report["fds"]:
                _, got, _, _ = socket.recv_fds(control, 16, MAX_FDS)
                if not got:
                    raise ConnectionError("the report's fds did not come")
                fds += got
    except (OSError, ValueError, KeyError) as exc:
        why = f"the bridge gave no report: {exc}"
        for fd in fds:
            os.close(fd)
        report, fds = None, []
    finally:
        control.close()
    status = reap(pid)
    if why and status is not None:
        why += f" (it ended with wait status {status:#x})"
    return report, fds, why


def reap(pid: int) -> int | None:
    """Wait for the bridge to exit (it does once it reported), killing it past a moment; its wait status."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.001)


def take_back(report: dict, fds: list[int], dispatcher: Dispatcher, links_by_pid: dict[int, Link]) -> int:
    """Put the bridge's hand-offs in flight, counters and homeless fds into the links; connections it accepted."""
    at = 0
    for item in report["links"]:
        link = links_by_pid.get(item["pid"])
        count = len(item["unacked"])
        mine = fds[at:at + count]
        at += count
        if link is None:  # its worker is gone from the table: its connections go to the others
            dispatcher.homeless.extend(zip(mine, (family for _, family in item["unacked"])))
            continue
        link.seen_word, link.sent_msgs, link.refused_seen = item["seen_word"], item["sent_msgs"], item["refused_seen"]
        link.acked_total, link.dispatched = item["acked_total"], item["dispatched"]
        link.handed, link.unbegun, link.handed_at = item["handed"], item["unbegun"], item["handed_at"]
        link.ack_progress = item["ack_progress"]
        link.channel_lost = link.channel_lost or item["channel_lost"]
        link.sent.clear()
        link.sent.extend((seq, ids) for seq, ids in item["sent"])
        link.unacked.clear()
        link.unacked.update((conn_id, (fd, family)) for (conn_id, family), fd in zip(item["unacked"], mine))
    dispatcher.homeless.extend(zip(fds[at:], report["homeless"]))
    dispatcher._next_id = max(dispatcher._next_id, report["next_id"])
    dispatcher.redispatched = max(dispatcher.redispatched, report["redispatched"])
    return report["accepted"]


def paused_seconds(report: dict | None, paused_at: float, resumed_at: float) -> float:
    """How long nobody accepted: before the bridge began, and from its stop until the new image resumed."""
    if report is None:
        return resumed_at - paused_at
    return max(0.0, report["started"] - paused_at) + max(0.0, resumed_at - report["stopped"])
