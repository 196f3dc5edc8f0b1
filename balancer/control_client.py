"""The `balancer reload|scale|stop|status` client: find our master's control socket, send one request."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from balancer.config import Config, ConfigError, parse_bind
from balancer.control import _CRED, ForeignPeer, check_private_dir, default_socket_path, runtime_dir

COMMANDS = ("reload", "scale", "stop", "status")


def client_socket_path(control_socket: str, bind: str) -> str:
    """The path a client should use: --control-socket, or the default for --bind (in a directory we trust)."""
    if control_socket:
        return control_socket
    if os.path.lexists(runtime_dir()):  # missing: the connect reports that no master runs
        check_private_dir(runtime_dir())
    return default_socket_path(str(parse_bind(bind)))


def check_peer(sock: socket.socket, path: str) -> None:
    """Trust only a server running as our user (or root): anyone can bind a socket where ours should be."""
    _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    if uid not in (os.getuid(), 0):
        raise ForeignPeer(f"{path} is served by a process of uid {uid}, not by us (uid {os.getuid()}): "
                          "not our master; nothing was sent")


def request(path: str, body: dict, timeout: float | None) -> dict:
    """Send one request to the master at path and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        check_peer(sock, path)
        sock.sendall(json.dumps(body).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the options of one control command (reload, scale, stop, status) to an argparse (sub)parser."""
    if command == "scale":
        parser.add_argument("n", type=int, help="the number of workers to run")
    parser.add_argument("--control-socket", default="", metavar="PATH",
                        help="the master's control socket (default: derived from --bind)")
    parser.add_argument("--bind", default=Config.__dataclass_fields__["bind"].default_factory()[0], metavar="ADDR",
                        help="the master's first --bind, to find its default control socket")
    parser.add_argument("--json", action="store_true", help="print the raw JSON reply")


def run_command(command: str, args: argparse.Namespace) -> int:
    """Run one control command: 0 on success, 1 on failure, 2 when no master answers."""
    try:
        path = client_socket_path(args.control_socket, args.bind)
    except ConfigError as exc:
        print(f"balancer: error: {exc}", file=sys.stderr)
        return 2
    body: dict = {"cmd": command}
    if command == "scale":
        body["n"] = args.n
    try:
        reply = request(path, body, None if command == "reload" else 30)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"balancer: error: no balancer master at {path} (is it running? pass --control-socket)",
              file=sys.stderr)
        return 2
    except ForeignPeer as exc:
        print(f"balancer: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"balancer: error: {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
    elif not reply.get("ok"):
        print(f"balancer: error: {reply.get('error', 'failed')}", file=sys.stderr)
    elif command == "status":
        print(format_status(reply))
    else:
        print({"reload": "reloaded", "stop": "stopping", "scale": f"scaling to {reply.get('target')}"}[command])
    return 0 if reply.get("ok") else 1


def client_main(command: str, argv: list[str]) -> int:
    """`balancer reload|scale N|stop|status` parsed on its own (until cli.py has real subparsers)."""
    parser = argparse.ArgumentParser(prog=f"balancer {command}")
    add_arguments(parser, command)
    return run_command(command, parser.parse_args(argv))


def format_status(reply: dict) -> str:
    """The status reply as a small table."""
    lines = [f"master pid {reply['pid']}, target {reply['target']} workers, {reply['accepted']} connections "
             f"accepted, listening on {', '.join(reply['listening'])}",
             f"{'slot':>4}  {'pid':>7}  {'state':<9} {'open':>6} {'dispatched':>10}"]
    for w in reply["workers"]:
        lines.append(f"{w['slot']:>4}  {w['pid']:>7}  {w['state']:<9} {w['open']:>6} {w['dispatched']:>10}")
    return "\n".join(lines)
