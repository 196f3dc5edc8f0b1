"""A zygote (--preload): `python -m balancer_workers.zygote --channel-fd N --master-pid P --settings JSON`.

It imports the worker runtime, aiohttp, the event loop and the backend's module once (never calling an app
factory), freezes what that made (gc.freeze: later collections in the workers leave those objects' pages
shared), forks spares, says READY, then waits for the master's FORK requests. Each brings a worker's channel end
and ack board, handed to a spare forked ahead of it: forked twice, so that its first parent exits at once and the
master (a child subreaper) adopts it. The zygote answers with the spare's pid, and the spare then runs exactly what
a spawned worker runs (balancer_workers.__main__.serve). The zygote starts no event loop and opens no socket: it
refuses to fork, in one line the master logs, while more than one thread runs or a socket not its own is open.
Files the backend's import left open are named in a warning: the workers would share their offsets.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import gc
import json
import logging
import os
import select
import socket
import sys
import time
import traceback
from collections import deque

from balancer import logs, proctitle, wire
from balancer_workers.__main__ import die_with_master, ignore_signals, loop_factory, serve
from balancer_workers.stdio import whole_lines

SPARES = 2  # workers kept forked ahead of the requests (more before READY: the master's settings say how many)


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
        preload_runtime(settings)
        before = open_fds()
        preload_backend(settings)
    except Exception as exc:  # BackendError, LogSetupError: a one-line reason the master logs
        channel.send(wire.encode_json(wire.BOOT_ERROR, str(exc)))
        return 3
    imported = time.perf_counter() - started
    warn_of_shared_files(files_opened_since(before))
    gc.collect()
    gc.freeze()  # the workers' collections never touch (and so never copy) these objects' pages
    ready = wire.encode_json(wire.READY, {"pid": os.getpid(), "import_seconds": round(imported, 4)})
    child = fork_on_request(channel, own_sockets | {channel.fileno()}, args.master_pid, ready,
                            max(SPARES, int(settings.get("spares", SPARES))))
    if child is None:  # the master closed the channel: nothing of ours to clean up, skip freeing 100s of MB
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return run_forked(*child, args.master_pid)


def preload_runtime(settings: dict) -> None:
    """What every worker imports at boot before the backend: the runtime, aiohttp's web stack, the loop."""
    import balancer_workers.worker  # noqa: F401

    loop_factory(settings.get("loop", "auto"))  # imports uvloop when it is the loop


def preload_backend(settings: dict) -> None:
    """The backend's module (BackendError): its factories are not called."""
    from balancer_workers.backend import import_target

    import_target(settings["backend"], settings.get("app_dir", ""))


def open_fds() -> dict[int, str]:
    """fd -> what it is open on (a path, socket:[N], pipe:[N], anon_inode:...) for every fd of this process."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own fd, already closed
            continue
    return out


def socket_fds() -> set[int]:
    """The fds of this process that are sockets."""
    return {fd for fd, target in open_fds().items() if target.startswith("socket:")}


def files_opened_since(before: dict[int, str]) -> dict[int, str]:
    """Non-socket fds opened since `before` and not in append mode: each worker would share its one file offset.

    Sockets are refused at fork time instead. A file opened for appending (a log) is safe to share: every
    write goes to the end.
    """
    out = {}
    for fd, target in open_fds().items():
        if before.get(fd) == target or target.startswith("socket:") or fd <= 2:
            continue
        try:
            flags = _flags(fd)
        except OSError:  # closed meanwhile
            continue
        if not flags & os.O_APPEND:
            out[fd] = target
    return out


def _flags(fd: int) -> int:
    """The open flags of fd, as /proc/self/fdinfo shows them."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    return 0


def warn_of_shared_files(files: dict[int, str]) -> None:
    """One warning naming the files the backend's import left open: forked workers share their offsets."""
    if files:
        named = ", ".join(f"fd {fd} {target}" for fd, target in sorted(files.items()))
        logging.getLogger("balancer").warning(
            "the backend's import left files open, which every forked worker shares with one file offset "
            "(reads and writes interleave); open them in the app factory or on first use instead: %s",
            named)


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


def fork_on_request(channel: socket.socket, allowed: set[int], master_pid: int, ready: bytes,
                    burst: int) -> tuple | None:
    """Serve FORK requests from spares forked ahead; in a worker, (channel fd, board fd, settings).

    READY goes out once `burst` spares are there (the workers a boot or a reload asks for right away), so that
    no fork of this (large) process lies between a request and the worker's boot; later, SPARES are kept.
    Spares are forked in batches by one middle process, which the zygote does not wait for: only the first fork
    blocks it, and it answers requests meanwhile. A request waits in the channel while no spare is there.
    Returns None once the master has closed the channel.
    """
    inbox = wire.inbox(wire.MASTER_MSG_BYTES * 16)
    spares: deque[Spare] = deque()
    coming: dict[int, socket.socket] = {}  # spares forked, not yet adopted by the master: fd -> our end
    want = burst
    refusal = ""  # why forking is not safe: every request is refused, and the next one checks again
    while True:
        reap_middles()
        if ready and (refusal or len(spares) >= want):
            channel.send(ready)
            ready, want = b"", SPARES
        short = 0 if refusal else want - len(spares) - len(coming)
        # Requests first: a fork blocks this process for milliseconds, and a request waiting meanwhile would too.
        readable = select.select([*coming.values(), *([channel] if spares or refusal else [])], [], [],
                                 0 if short > 0 else None)[0]
        if not readable and short > 0:
            keep = [spare.sock for spare in spares] + list(coming.values())
            made = fork_spares(short, channel, allowed, master_pid, keep)
            if isinstance(made, tuple):
                return made  # we are a spare, and this is our request
            if isinstance(made, str):
                refusal = made
            else:
                coming.update(made)
        for sock in readable:
            if sock is not channel:
                del coming[sock.fileno()]
                said = sock.recv(64)
                if said:
                    spares.append(Spare(int(said), sock))
                else:
                    sock.close()  # it died before the master adopted it
        if channel in readable:
            if not serve_request(channel, inbox, spares, refusal):
                return None
            refusal = ""


def serve_request(channel: socket.socket, inbox: bytearray, spares: deque, refusal: str) -> bool:
    """Hand one FORK request to a spare (or refuse it) and answer the master; False once the master has gone."""
    got = wire.receive(channel, inbox)  # MSG_DONTWAIT; replies are sent blocking
    if got is None:
        return True
    msg, fds, truncated = got
    if not msg:
        return False
    try:
        if msg[0] != wire.FORK or truncated or len(fds) != 2:
            return True
        token = wire.decode_json(msg).get("token")
        if refusal:
            channel.send(wire.encode_json(wire.FORK_REFUSED, {"token": token, "reason": refusal}))
            return True
        while spares:
            spare = spares.popleft()
            if select.select([spare.sock], [], [], 0)[0]:  # EOF: that spare died (OOM?), the next one takes it
                spare.sock.close()
                continue
            # Its pid before its channel: a worker with a channel is never one the master does not know of, even
            # if this process dies in between (the spare then exits, and the master sees that worker exit).
            channel.send(wire.encode_json(wire.FORKED, {"token": token, "pid": spare.pid}))
            try:
                wire.send_fds(spare.sock, msg, fds)
            except OSError:  # it died just now: the master sees it exit before READY
                pass
            finally:
                spare.sock.close()
            return True
        channel.send(wire.encode_json(wire.FORKED, {"token": token, "error": "every spare worker was gone"}))
        return True
    finally:
        wire.close_all(fds)


def reap_middles() -> None:
    """Reap the middle processes that have exited (this process has no other children)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def fork_spares(count: int, channel: socket.socket, allowed: set[int], master_pid: int,
                keep: list[socket.socket]) -> dict[int, socket.socket] | str | tuple:
    """Fork a middle process that forks count spares and exits, so that the master (a subreaper) adopts them.

    In the zygote: fd -> our end of each spare's pair (its pid comes over it once it is adopted), or why forking
    is not safe now. In a spare, once it has its request: (channel fd, board fd, settings).
    """
    reason = unsafe_to_fork(allowed | {sock.fileno() for sock in keep})
    if reason:
        return reason
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(count)]
    sys.stdout.flush()  # a partial line still buffered would be printed again by each fork
    sys.stderr.flush()
    try:
        middle = os.fork()
    except OSError as exc:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
        return f"fork failed: {exc}"
    if middle == 0:
        return be_middle(pairs, channel, keep, master_pid)
    for ours, theirs in pairs:
        theirs.close()
    return {ours.fileno(): ours for ours, _ in pairs}


def be_middle(pairs: list[tuple], channel: socket.socket, keep: list[socket.socket], master_pid: int) -> tuple:
    """In the middle process: fork a spare per pair, then exit; in each spare, wait for its request."""
    middle, mine = os.getpid(), None
    try:
        for ours, _ in pairs:
            ours.close()
        for _, theirs in pairs:
            if os.fork() == 0:
                mine = theirs
                break
    except BaseException:
        pass
    finally:
        if mine is None:
            os._exit(0)  # the middle's only job is to fork; the spares are the master's once it is gone
    try:
        channel.close()
        for sock in keep:  # the other spares' ends: each must see the zygote's exit as its own EOF
            sock.close()
        for _, theirs in pairs:
            if theirs is not mine:
                theirs.close()
    except BaseException:
        os._exit(1)
    return wait_for_request(mine, middle, master_pid)


def wait_for_request(sock: socket.socket, middle: int, master_pid: int) -> tuple:
    """In a spare: wait to be adopted by the master, say our pid, then wait for a request; exit with the zygote."""
    while os.getppid() == middle:  # the middle process is exiting: its parent-death signal must not be ours
        time.sleep(0.0005)
    die_with_master(master_pid)
    sock.send(str(os.getpid()).encode())
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
