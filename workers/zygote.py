"""A zygote (--preload): `python -m balancer_workers.zygote --channel-fd N --master-pid P --settings JSON`.

It imports the worker runtime, aiohttp, the event loop and the backend's module once (never calling an app
factory), freezes what that made (gc.freeze: later collections in the workers leave those objects' pages
shared), says READY, then waits for the master's FORK requests. Each brings a worker's channel end and ack
board; the zygote forks twice, so the worker's parent exits at once and the worker is adopted by the master
(a child subreaper), and answers with its pid. The worker then runs exactly what a spawned one runs
(balancer_workers.__main__.serve). It starts no event loop and opens no socket: a fork is refused, in one
line the master logs, while more than one thread runs or a socket other than its own is open.
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
import struct
import sys
import time
import traceback

from balancer import logs, proctitle, wire
from balancer_workers.__main__ import die_with_master, ignore_signals, loop_factory, serve

REPARENT_WAIT = 5.0  # seconds a forked worker waits to be adopted by the master; its first parent exits at once
_PID = struct.Struct("<i")


def main() -> int:
    """Import once, then fork workers until the master closes the channel; a forked worker runs from here."""
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
    channel.send(wire.encode_json(wire.READY, {"pid": os.getpid(), "import_seconds": round(imported, 4)}))
    child = fork_on_request(channel, own_sockets | {channel.fileno()}, args.master_pid)
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


def fork_on_request(channel: socket.socket, allowed: set[int], master_pid: int) -> tuple | None:
    """Serve FORK requests; in a forked worker, return what it needs to run; None once the master is gone."""
    inbox = wire.inbox(wire.MASTER_MSG_BYTES * 16)
    while True:
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
        request = wire.decode_json(msg)
        token = request.get("token")
        reason = unsafe_to_fork(allowed | {fds[0]})
        if reason:
            wire.close_all(fds)
            channel.send(wire.encode_json(wire.FORK_REFUSED, {"token": token, "reason": reason}))
            continue
        child = fork_worker(channel, token, fds)
        if child is not None:
            return (*child, request["settings"])


def fork_worker(channel: socket.socket, token, fds: list[int]) -> tuple | None:
    """Fork twice and tell the master the worker's pid; in the worker, return (channel fd, board fd, middle pid)."""
    read_end, write_end = os.pipe()
    try:
        middle = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        wire.close_all(fds)
        channel.send(wire.encode_json(wire.FORKED, {"token": token, "error": str(exc)}))
        return None
    if middle == 0:  # the middle process: its only job is to exit, so that the master adopts the worker
        worker, middle = -1, os.getpid()
        try:
            os.close(read_end)
            worker = os.fork()
            if worker != 0:
                os.write(write_end, _PID.pack(worker))
        finally:
            if worker != 0:
                os._exit(0)
        os.close(write_end)
        channel.close()
        return fds[0], fds[1], middle
    os.close(write_end)
    try:
        data = b""
        while chunk := os.read(read_end, 4):
            data += chunk
    finally:
        os.close(read_end)
    # Once the middle process is reaped, its child has been handed to the master: the pid we send is the
    # master's own child by the time it reads it, so it can wait for it as for one it started.
    os.waitpid(middle, 0)
    wire.close_all(fds)
    if len(data) != _PID.size:
        channel.send(wire.encode_json(wire.FORKED, {"token": token, "error": "the middle process failed to fork"}))
        return None
    channel.send(wire.encode_json(wire.FORKED, {"token": token, "pid": _PID.unpack(data)[0]}))
    return None


def run_forked(channel_fd: int, board_fd: int, middle: int, settings: dict, master_pid: int) -> int:
    """In a forked worker: once the master has adopted us, run the worker as a spawned one runs; never returns."""
    deadline = time.monotonic() + REPARENT_WAIT
    while os.getppid() == middle:  # its parent-death signal must name the master, not the exiting middle process
        if time.monotonic() > deadline:
            os._exit(1)
        time.sleep(0.0002)
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
