"""A zygote (--preload): `python -m balancer_workers.zygote --channel-fd N --master-pid P --settings JSON`.

It imports the worker runtime, aiohttp, the event loop and the backend's module once (never calling an app
factory), freezes what that made (gc.freeze: later collections in the workers leave those objects' pages
shared), says READY, then waits for the master's FORK requests. Each brings a worker's channel end and ack
board, handed to a spare forked ahead of it: forked twice, so that its first parent exits at once and the master
(a child subreaper) adopts it. The zygote answers with the spare's pid, and the spare then runs exactly what a
spawned worker runs (balancer_workers.__main__.serve). The zygote starts no event loop and opens no socket: it
refuses to fork, in one line the master logs, while more than one thread runs or a socket not its own is open.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import gc
import json
import os
import select
import socket
import sys
import time
import traceback

from balancer import logs, proctitle, wire
from balancer_workers.__main__ import die_with_master, ignore_signals, loop_factory, serve
from balancer_workers.stdio import whole_lines

SPARES = 2  # workers forked ahead of the requests: a reload asks for the next one as soon as one is ready



def main() -> int:
    """Import once, then fork workers until the master closes the channel; a forked worker runs from here."""
    whole_lines()  # first, as in a spawned worker: what the backend prints at import, and its forks, is whole lines
    faulthandler.enable(file=sys.stderr)
    parser = argparse.ArgumentParser(prog="python -m balancer_workers.zygote")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--master-pid", type=int, required=True)
    parser.add_argument("--settings", required=True)
    args = parser.parse_args()
    settings = json.loads(args.settings)
    ignore_signals()
    die_with_master(args.master_pid)
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, args.channel_fd)
    channel.setblocking(True)
    proctitle.set_title(f"zygote {settings.get('generation', 0)}", os.environ.get(proctitle.NAME_ENV, ""), say=False)
    started = time.perf_counter()
    try:
        logs.configure("zygote", None, level=settings.get("log_level", "info"),
                       log_format=settings.get("log_format", "text"),
                       error_logfile=settings.get("error_logfile") or "-", log_config=settings.get("log_config", ""))
        own_sockets = socket_fds()  # stdio under systemd, a syslog handler: the runtime's, not the backend's
        preload(settings)
    except Exception as exc:  # BackendError, LogSetupError: a one-line reason the master logs
        channel.send(wire.encode_json(wire.BOOT_ERROR, str(exc)))
        return 3
    imported = time.perf_counter() - started
    gc.collect()
    gc.freeze()  # the workers' collections never touch (and so never copy) these objects' pages
    ready = wire.encode_json(wire.READY, {"pid": os.getpid(), "import_seconds": round(imported, 4)})
    child = fork_on_request(channel, own_sockets | {channel.fileno()}, args.master_pid, ready)
    if child is None:  # the master closed the channel: nothing of ours to clean up, skip freeing 100s of MB
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return run_forked(*child, args.master_pid)


def preload(settings: dict) -> None:
    """What every worker would import at boot: the runtime, aiohttp, the loop, the backend's module (BackendError)."""
    import balancer_workers.worker  # noqa: F401  (aiohttp's web stack, the runtime)
    from balancer_workers.backend import import_target

    loop_factory(settings.get("loop", "auto"))  # imports uvloop when it is the loop
    import_target(settings["backend"], settings.get("app_dir", ""))  # the module only: factories are not called


def socket_fds() -> set[int]:
    """The fds of this process that are sockets."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                out.add(int(name))
        except OSError:  # the listing's own fd, already closed
            continue
    return out


def unsafe_to_fork(allowed: set[int]) -> str:
    """Why forking now would hand workers something they must not share ('' when it is safe)."""
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:  # a forked child gets only the calling thread: locks the others held stay locked forever
        return f"{threads} threads are running (one started at import?)"
    extra = sorted(socket_fds() - allowed)
    if extra:  # one connection shared by every worker: their bytes would interleave on it
        return f"socket fds {extra} are open (a client connected at import?)"
    return ""


class Spare:
    """A worker forked ahead of the request that will give it its channel and board: the master's child already."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock  # the zygote's end of the pair the request goes over


def fork_on_request(channel: socket.socket, allowed: set[int], master_pid: int, ready: bytes) -> tuple | None:
    """Serve FORK requests, each with a spare forked ahead; in a worker, (channel fd, board fd, settings).

    SPARES spares wait, forked while no request does: a request is answered with a spare's pid at once, and
    no fork of this (large) process lies between the master's request and the worker's boot, also when a
    reload asks for one worker right after another. READY goes out once the first spare is there.
    Returns None once the master has closed the channel.
    """
    inbox = wire.inbox(wire.MASTER_MSG_BYTES * 16)
    spares: list[Spare] = []
    refusal = ""  # why forking is not safe: every request is refused, and the next one checks again
    while True:
        asked = select.select([channel], [], [], 0)[0]
        if len(spares) < SPARES and not refusal and not (asked and spares):
            spare = fork_spare(channel, allowed, master_pid, [s.sock for s in spares])
            if isinstance(spare, tuple):
                return spare  # we are a spare, and this is our request
            if isinstance(spare, str):
                refusal = spare
            else:
                spares.append(spare)
            if ready:
                channel.send(ready)
                ready = b""
            continue
        select.select([channel], [], [])
        got = wire.receive(channel, inbox)  # MSG_DONTWAIT; replies are sent blocking
        if got is None:
            continue
        msg, fds, truncated = got
        if not msg:
            return None
        if msg[0] != wire.FORK or truncated or len(fds) != 2:
            wire.close_all(fds)
            continue
        token = wire.decode_json(msg).get("token")
        if refusal:
            wire.close_all(fds)
            channel.send(wire.encode_json(wire.FORK_REFUSED, {"token": token, "reason": refusal}))
            refusal = ""
            continue
        spare = spares.pop(0)
        try:
            wire.send_fds(spare.sock, msg, fds)
        except OSError as exc:  # the spare died (OOM?): no worker this time; the next request gets another
            channel.send(wire.encode_json(wire.FORKED, {"token": token, "error": f"the spare worker is gone: {exc}"}))
        else:
            channel.send(wire.encode_json(wire.FORKED, {"token": token, "pid": spare.pid}))
        finally:
            wire.close_all(fds)
            spare.sock.close()


def fork_spare(channel: socket.socket, allowed: set[int], master_pid: int,
               others: list[socket.socket]) -> Spare | str | tuple:
    """Fork twice, so that the master (a child subreaper) adopts the spare once the middle process exits.

    In the zygote: the Spare, or why forking is not safe now. In the spare, once it has its request:
    (channel fd, board fd, settings).
    """
    reason = unsafe_to_fork(allowed | {sock.fileno() for sock in others})
    if reason:
        return reason
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()  # a partial line still buffered would be printed again by each fork
    sys.stderr.flush()
    try:
        middle = os.fork()
    except OSError as exc:
        ours.close()
        theirs.close()
        return f"fork failed: {exc}"
    if middle == 0:  # the middle process: its only job is to exit
        spare, middle = -1, os.getpid()
        try:
            ours.close()
            spare = os.fork()
        finally:
            if spare != 0:
                os._exit(0)
        channel.close()
        for sock in others:  # the other spares' ends: each must see the zygote's exit as its own EOF
            sock.close()
        return wait_for_request(theirs, middle, master_pid)
    theirs.close()
    os.waitpid(middle, 0)  # reaped: the spare is the master's child now
    said = ours.recv(64)
    if not said:
        ours.close()
        return "the spare worker died at once"
    return Spare(int(said), ours)


def wait_for_request(sock: socket.socket, middle: int, master_pid: int) -> tuple:
    """In a spare: say our pid, wait to be adopted by the master, then for a request; exit with the zygote."""
    sock.send(str(os.getpid()).encode())
    while os.getppid() == middle:  # the middle process is exiting: its parent-death signal must not be ours
        time.sleep(0.0005)
    die_with_master(master_pid)
    while True:
        select.select([sock], [], [])
        got = wire.receive(sock)
        if got is not None:
            break
    msg, fds, _ = got
    if not msg or len(fds) != 2:  # the zygote is gone (retired, stopped, killed): so is its spare
        os._exit(0)
    sock.close()
    return fds[0], fds[1], wire.decode_json(msg)["settings"]


def run_forked(channel_fd: int, board_fd: int, settings: dict, master_pid: int) -> int:
    """In a forked worker: run the worker as a spawned one runs; never returns."""
    try:
        code = serve(channel_fd, board_fd, master_pid, settings)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    # atexit handlers (logging's flush) run as at any exit; tearing down the interpreter would not: it would
    # write to every preloaded object, copying the pages this worker shares with the zygote and its siblings.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
