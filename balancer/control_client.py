"""The `balancer reload|scale|stop|status|ls` client: find this user's masters, send one a request, report."""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import stat
import sys
import tempfile
import time
from typing import Callable

from balancer.config import WORKERS_PER_CPU, ConfigError, parse_bind
from balancer.control import _CRED, MAX_INTERVAL, ForeignPeer, check_private_dir, runtime_dir
from balancer.control_show import duration, format_status, list_masters

COMMANDS = ("reload", "scale", "stop", "status", "ls", "upgrade")
PROBE_TIMEOUT = 5.0  # seconds a master gets to say who it is while the client looks for masters
YOUNG_SOCKET = 2.0  # seconds: a refusing socket file this new may be a master between bind() and listen()


class NoMaster(Exception):
    """No master (or not exactly one) could be picked; the message says what to pass."""


class MasterStopped(Exception):
    """The master closed the connection without an answer: it stopped (or died) while the request ran."""


def check_peer(sock: socket.socket, path: str) -> int:
    """Trust only a server running as our user (or root): anyone can bind a socket where ours should be; its pid."""
    pid, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    if uid not in (os.getuid(), 0):
        raise ForeignPeer(f"{path} is served by a process of uid {uid}, not by us (uid {os.getuid()}): "
                          "not our master; nothing was sent")
    return pid


def request(path: str, body: dict, timeout: float | None,
            on_connect: Callable[[int], None] | None = None) -> dict:
    """Send one request to the master at path and return its reply; on_connect gets the master's pid first."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        pid = check_peer(sock, path)
        if on_connect is not None:
            on_connect(pid)
        sock.sendall(json.dumps(body).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise MasterStopped(f"master stopped (pid {pid}) before answering")
    return json.loads(data)


# ---- finding the master ---------------------------------------------------------------------------------

def discover() -> list[tuple[str, dict]]:
    """(control socket, summary) of every master of ours in search_dirs(); stale sockets and links are removed.

    Each master keeps its control socket there (or, with --control-socket elsewhere, a symlink to it), so
    the bind it was started with (localhost:PORT, :PORT, unix:, systemd's sockets) does not matter.
    """
    found, seen = [], set()
    for directory, entry in [(d, entry) for d in search_dirs() for entry in sorted(os.listdir(d))]:
        path = os.path.join(directory, entry)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not entry.endswith(".sock") or not (stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            continue
        try:
            reply = request(path, {"cmd": "status", "brief": True}, PROBE_TIMEOUT)
        except (FileNotFoundError, ConnectionRefusedError):
            remove_stale(path, st)
            continue
        except (OSError, ValueError) as exc:
            print(f"balancer: note: {path} did not answer ({exc}); skipped", file=sys.stderr)
            continue
        if reply.get("ok") and reply.get("pid") not in seen:
            seen.add(reply["pid"])
            found.append((path, reply))
    return found


def search_dirs() -> list[str]:
    """runtime_dir(), and the /tmp one when that is under $XDG_RUNTIME_DIR: those of them that exist and are ours."""
    # Masters started without $XDG_RUNTIME_DIR (sudo -u, cron, a system service with User=) use the /tmp one.
    primary = runtime_dir()
    dirs = []
    if os.path.lexists(primary):
        check_private_dir(primary)  # a directory others can write to may hold a planted "master"
        dirs.append(primary)
    fallback = os.path.join(tempfile.gettempdir(), f"balancer-{os.getuid()}")
    if fallback != primary and os.path.lexists(fallback):
        try:
            check_private_dir(fallback)
            dirs.append(fallback)
        except ConfigError as exc:  # anyone may create it in /tmp first: a note, not a refusal to use ours
            print(f"balancer: note: skipped: {exc}", file=sys.stderr)
    return dirs


def remove_stale(path: str, st: os.stat_result) -> None:
    """Remove a socket nobody listens on (or a link to none) that a killed master left behind."""
    if stat.S_ISSOCK(st.st_mode) and time.time() - st.st_mtime < YOUNG_SOCKET:
        return  # perhaps a master that has bound but not yet listens
    try:
        if os.lstat(path).st_ino == st.st_ino:
            os.unlink(path)
    except OSError:
        pass


def bind_matches(text: str, listening: list[str]) -> bool:
    """True if the master listens on the address given as --bind (localhost:PORT, :PORT, unix:/path)."""
    want = parse_bind(text)
    for label in listening:
        try:
            have = parse_bind(label)
        except ConfigError:
            continue  # an abstract unix name, say
        if want.family == "unix" and have.family == "unix":
            if os.path.realpath(want.path) == os.path.realpath(have.path):
                return True
        elif want.family == have.family == "tcp" and want.port == have.port:
            wildcard = want.host in ("0.0.0.0", "::") or have.host in ("0.0.0.0", "::")
            if wildcard or resolves_to(want.host, have.host):
                return True
    return False


def resolves_to(host: str, address: str) -> bool:
    """True if host names address (localhost -> 127.0.0.1)."""
    try:
        return address in {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror:
        return False


def describe(found: list[tuple[str, dict]]) -> str:
    """Numbered lines: name, pid, binds, uptime."""
    return "\n".join(f"  {i}) {info['name']}  pid {info['pid']}  {', '.join(info['listening'])}  "
                     f"up {duration(info['uptime'])}" for i, (_, info) in enumerate(found, 1))


def matching_masters(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(control socket, summary) of each master of ours that --name/--pid/--bind pick (all without them); never none."""
    found = discover()
    picked = [(path, info) for path, info in found
              if (not args.name or info["name"] == args.name) and (not args.pid or info["pid"] == args.pid)
              and (not args.bind or bind_matches(args.bind, info["listening"]))]
    if not picked and not found:
        raise NoMaster(f"no balancer master of uid {os.getuid()} is running (none in {runtime_dir()}); "
                       "pass --control-socket if it has its socket elsewhere")
    if not picked:
        raise NoMaster(f"no running balancer master matches {selectors(args)}; running:\n{describe(found)}")
    return picked


def selectors(args: argparse.Namespace) -> str:
    """The --name/--pid/--bind options given, as typed."""
    return " ".join(f"--{key} {getattr(args, key)}" for key in ("name", "pid", "bind") if getattr(args, key))


def choose(args: argparse.Namespace) -> str:
    """The control socket to talk to: --control-socket, else the one master of ours that --name/--pid/--bind pick."""
    if args.control_socket:
        return args.control_socket
    picked = matching_masters(args)
    if len(picked) == 1:
        return picked[0][0]
    if sys.stdin.isatty():
        return prompt(picked)
    asked = selectors(args)
    raise NoMaster(f"{len(picked)} balancer masters are running{' that match ' + asked if asked else ''}:\n"
                   f"{describe(picked)}\npass --name or --pid to pick one")


def prompt(found: list[tuple[str, dict]]) -> str:
    """Ask on the terminal which master is meant: its number, name or pid."""
    print(f"{len(found)} balancer masters are running:\n{describe(found)}", file=sys.stderr)
    print(f"which one? [1-{len(found)}, a name or a pid]: ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip()
    for i, (path, info) in enumerate(found, 1):
        if answer in (str(i), info["name"]) or answer == f"pid {info['pid']}" or answer == str(info["pid"]):
            return path
    raise NoMaster(f"no master picked ({answer or 'no answer'}); pass --name or --pid")


# ---- commands -----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the options of one control command (reload, scale, stop, status, ls) to an argparse (sub)parser."""
    if command == "ls":
        parser.add_argument("--json", action="store_true", help="print a JSON list, one object per master")
        return
    if command == "scale":
        parser.add_argument("n", type=worker_count, help=f"the number of workers to run: 1 to {WORKERS_PER_CPU} "
                                                         "per CPU the master may use")
    pick = parser.add_argument_group("which master (default: the only one this user runs; asks when several)")
    pick.add_argument("--name", default="", help="the master started with this --name (default name: its first bind)")
    pick.add_argument("--pid", type=int, default=0, help="the master with this process id")
    pick.add_argument("--bind", default="", metavar="ADDR", help="the master listening on ADDR")
    pick.add_argument("--control-socket", default="", metavar="PATH", help="the master's control socket")
    parser.add_argument("--json", action="store_true", help="print the master's reply as JSON, for scripts")
    if command == "status":
        parser.add_argument("--interval", type=interval_seconds, default=1.0, metavar="SECONDS",
                            help=f"measure CPU %% and requests/s over this long (0: skip them; at most "
                                 f"{MAX_INTERVAL:g})")
    if command in ("stop", "reload", "upgrade"):
        waits = {"stop": "until the master has exited", "reload": "until every worker runs the new code",
                 "upgrade": "once the re-executed master accepts again"}[command]
        parser.add_argument("--wait", action="store_true", help=f"return only {waits}")
        parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                            help="give up waiting after this long, exit 1 (default: 60; 0: wait for ever)")


def worker_count(text: str) -> int:
    """scale's N: a whole number of at least 1; anything else is a usage error (exit 2), before any master is asked."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a worker count is a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"scale needs a worker count of at least 1, got {n}")
    return n


def interval_seconds(text: str) -> float:
    """status --interval: seconds from 0 to MAX_INTERVAL; anything else (nan, inf, -1) is a usage error (exit 2)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an interval is a number of seconds, got {text!r}") from None
    if not 0 <= seconds <= MAX_INTERVAL:  # also false for nan
        raise argparse.ArgumentTypeError(f"an interval is from 0 to {MAX_INTERVAL:g} seconds, got {text}")
    return seconds


def run_command(command: str, args: argparse.Namespace) -> int:
    """Run one control command: 0 done, 1 failed, 2 no master answers (several might, or it stopped meanwhile)."""
    try:
        return talk(command, args)
    except BrokenPipeError:  # the reader left early (| head, | true): not an error; nothing more to write
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def talk(command: str, args: argparse.Namespace) -> int:
    """Pick the master, send it the command, report; the exit code (see run_command)."""
    try:
        if command == "ls":
            return list_masters(discover(), args.json)
        if command == "status" and not args.control_socket:
            picked = matching_masters(args)
            if len(picked) > 1:
                return list_masters(picked, args.json, several=True)  # as `balancer ls`, not an error
            path = picked[0][0]
        else:
            path = choose(args)
    except (ConfigError, ForeignPeer, NoMaster) as exc:
        print(f"balancer: error: {exc}", file=sys.stderr)
        return 2
    body: dict = {"cmd": command}
    timeout: float | None = 30.0
    if command == "scale":
        body["n"] = args.n
    elif command == "status":
        body["interval"] = args.interval
        timeout += body["interval"]
    elif command in ("reload", "upgrade") and args.wait:
        body["wait"] = True
        timeout = args.timeout or None
    elif command == "upgrade":
        timeout = args.timeout or None  # the answer comes after the preflight, which imports the new code
    started, master = time.monotonic(), ExitWatch()
    try:
        reply = request(path, body, timeout, master.watch if command == "stop" and args.wait else None)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"balancer: error: no balancer master at {path} (is it running? pass --control-socket)",
              file=sys.stderr)
        return 2
    except (ForeignPeer, MasterStopped) as exc:
        print(f"balancer: error: {exc}", file=sys.stderr)
        return 2
    except socket.timeout:
        print(f"balancer: error: no answer from {path} within {timeout:g}s"
              f"{'; the reload goes on in the master' if command == 'reload' else ''}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"balancer: error: {path}: {exc}", file=sys.stderr)
        return 1
    return report(command, args, reply, started, master)


def report(command: str, args: argparse.Namespace, reply: dict, started: float, master: "ExitWatch") -> int:
    """Wait for the exit if asked, print the reply; the exit code."""
    code = 0 if reply.get("ok") else 2 if reply.get("stopped") else 1
    if code == 0 and command == "stop" and args.wait:
        left = args.timeout - (time.monotonic() - started) if args.timeout else None
        if not master.wait(left):
            print(f"balancer: error: master pid {master.pid} still running after {args.timeout:g}s", file=sys.stderr)
            code = 1
        reply["exited"] = code == 0
    if args.json:
        print(json.dumps(reply, indent=2))
    elif reply.get("stopped"):  # the master's stop ended this request (status --interval): one line, no JSON
        print(f"balancer: error: master stopped (pid {reply.get('pid')}) before answering", file=sys.stderr)
    elif not reply.get("ok"):
        print(f"balancer: error: {reply.get('error', 'failed')}", file=sys.stderr)
    elif command == "status":
        print(format_status(reply))
    elif command == "reload":
        print(f"{'reloaded' if args.wait else 'reload started'} (generation {reply.get('generation')})")
    elif command == "stop":
        print(("stopped" if code == 0 else "stopping") if args.wait else "stopping")
    elif command == "upgrade":
        print(f"upgraded in place (pid {reply.get('pid')}, upgrade {reply.get('upgrades')}, accepting paused "
              f"{reply.get('paused_ms')} ms)" if args.wait else f"upgrade started (pid {reply.get('pid')})")
    else:
        print(f"scaling to {reply.get('target')}")
    sys.stdout.flush()  # here, where a reader that left shows as BrokenPipeError
    return code


class ExitWatch:
    """The master's pid, taken from the connection itself, and a way to wait for that process to exit."""

    def __init__(self) -> None:
        self.pid = 0
        self.pidfd = -1

    def watch(self, pid: int) -> None:
        """Called once connected, before the stop is sent: a pidfd cannot be confused by a reused pid."""
        self.pid = pid
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:  # kernels before 5.3: fall back to polling /proc
            self.pidfd = -1

    def wait(self, timeout: float | None) -> bool:
        """True once the master has exited (a zombie its parent has not reaped yet counts), False on timeout."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        try:
            if self.pidfd >= 0:
                poller = select.poll()
                poller.register(self.pidfd, select.POLLIN)
                return bool(poller.poll(None if deadline is None else max(0.0, timeout) * 1000))
            while process_alive(self.pid):
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
            return True
        finally:
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1


def process_alive(pid: int) -> bool:
    """True while pid runs (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def client_main(command: str, argv: list[str]) -> int:
    """`balancer reload|scale N|stop|status|ls` parsed on its own (cli.py's subparsers call the two above)."""
    parser = argparse.ArgumentParser(prog=f"balancer {command}")
    add_arguments(parser, command)
    return run_command(command, parser.parse_args(argv))
