"""The master's control socket (0600, same user only); the client is balancer.control_client."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import re
import signal
import socket
import stat
import struct
import tempfile

from balancer.config import MAX_WORKERS, WORKERS_PER_CPU, ConfigError
from balancer.listeners import clear_stale_socket, file_identity, unlink_if_ours
from balancer.pidfile import write_pid_file

log = logging.getLogger("balancer")

MAX_REQUEST = 4096  # one JSON line; anything longer is not ours
MAX_DEPTH = 4  # requests are flat objects; deeper nesting is refused before json.loads recurses into it
READ_TIMEOUT = 10.0  # seconds a client has to send its request line
MAX_INTERVAL = 10.0  # seconds: a status request cannot make the master hold its connection longer
JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# The writer of the connection a request came on: `upgrade` answers on it itself (see upgrade_master).
CONNECTION: contextvars.ContextVar = contextvars.ContextVar("control_connection", default=None)


class ForeignPeer(Exception):
    """The control socket is served by a process of another user: not our master."""


def runtime_dir(uid: int | None = None) -> str:
    """Where default control sockets live: $XDG_RUNTIME_DIR/balancer, else $TMPDIR/balancer-<uid> (/tmp).

    For another uid (root starting a master with --user) only the second: $XDG_RUNTIME_DIR is root's own.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    if (uid is None or uid == os.getuid()) and base and os.path.isdir(base):
        return os.path.join(base, "balancer")
    return os.path.join(tempfile.gettempdir(), f"balancer-{os.getuid() if uid is None else uid}")


def check_private_dir(directory: str, uid: int | None = None) -> None:
    """Refuse a directory another user could write into (delete our socket, plant a fake master there).

    In a shared /tmp anyone can create balancer-<uid> first: only a real directory of ours that nobody
    else may enter is trusted. One of ours with a wide mode is refused too, not narrowed: whatever others
    put in it meanwhile would stay.
    """
    try:
        st = os.lstat(directory)
    except OSError as exc:
        raise ConfigError(f"cannot use control socket directory {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"control socket directory {directory} is not a directory; remove it")
    uid = os.getuid() if uid is None else uid
    if st.st_uid != uid:
        raise ConfigError(f"control socket directory {directory} belongs to uid {st.st_uid}, not to us "
                          f"(uid {uid}): another user could plant a fake master there; remove it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"control socket directory {directory} has mode {stat.S_IMODE(st.st_mode):04o}, "
                          f"must be 0700 so no other user can enter it: chmod 700 {directory}")


def private_runtime_dir(owner: tuple[int, int] | None = None) -> str:
    """runtime_dir() of owner's uid (default: ours), created 0700 and given to owner if missing, then checked."""
    uid = None if owner is None else owner[0]
    directory = runtime_dir(uid)
    try:
        os.mkdir(directory, 0o700)
        if owner is not None:
            os.lchown(directory, *owner)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create control socket directory {directory}: {exc.strerror}") from None
    check_private_dir(directory, uid)
    return directory


def default_socket_path(key: str, uid: int | None = None) -> str:
    """Where a master known by key (--name or its first bind) puts its control socket in uid's runtime_dir()."""
    key = re.sub(r"[^A-Za-z0-9.]+", "-", key).strip("-") or "default"
    return os.path.join(runtime_dir(uid), f"{key}.sock")


def registry_link_path(pid: int, uid: int | None = None) -> str:
    """The symlink a master with --control-socket elsewhere leaves in runtime_dir(), so clients find it."""
    return os.path.join(runtime_dir(uid), f"pid-{pid}.sock")


def socket_key(master) -> str:
    """What names the default control socket: --name, else the first bind as bound (port 0 resolved)."""
    if master.config.name:
        return master.config.name
    label = master.listeners[0].label if master.listeners else str(master.config.binds[0])
    # Inherited sockets (systemd) are labelled by fd number, the same in every socket-activated master.
    return f"{label}-{os.getpid()}" if label.startswith("systemd") else label


class ControlServer:
    """Serves one JSON request per connection from processes of our own user."""

    def __init__(self, master) -> None:
        self.master = master
        config = master.config
        # With --user the master will run as that user: its files are that user's, where its client looks.
        run_as = getattr(master, "run_as", None)
        self.owner: tuple[int, int] | None = run_as.owner if run_as is not None else None
        uid = None if self.owner is None else self.owner[0]
        self.path = config.control_socket or default_socket_path(socket_key(master), uid)
        # --control-socket elsewhere: a symlink to it in the runtime directory, where clients look.
        self.link = registry_link_path(os.getpid(), uid) if config.control_socket else ""
        self.pid_file = config.pid_file
        self.server: asyncio.AbstractServer | None = None
        # (st_dev, st_ino) of the files we created: close() removes only those, never a successor's.
        self.identity: tuple[int, int] | None = None
        self.pid_identity: tuple[int, int] | None = None
        self.link_identity: tuple[int, int] | None = None
        self.handlers = {"status": self.report_status, "stop": self.stop_master, "reload": self.reload_workers,
                         "scale": self.scale_workers, "upgrade": self.upgrade_master}

    @property
    def files(self) -> list[tuple[str, tuple[int, int] | None]]:
        """The paths this service created and removes at exit, each with its identity (st_dev, st_ino)."""
        made = ((self.path, self.identity), (self.pid_file, self.pid_identity), (self.link, self.link_identity))
        return [(path, identity) for path, identity in made if path and identity is not None]

    async def start(self) -> None:
        """Create the socket 0600 (no window where others could connect) and the pid file."""
        carried = self.master.upgrader.carried_service("control")
        if carried is not None:  # re-executed by an upgrade: the same socket and files, still ours
            await self._adopt(*carried)
            return
        if not self.master.config.control_socket:
            private_runtime_dir(self.owner)
        self._clear_stale_socket()
        old_umask = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._handle, path=self.path, limit=MAX_REQUEST)
            self.identity = file_identity(self.path)
            if self.owner is not None:
                os.lchown(self.path, *self.owner)
        except OSError as exc:
            raise ConfigError(f"cannot create control socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        if self.pid_file:
            self.pid_identity = write_pid_file(self.pid_file, self.owner)
        if self.link:
            self._register()
        log.info("control socket at %s", self.path)

    async def _adopt(self, sock: socket.socket, kept: dict) -> None:
        """Serve on the socket the previous image listened on; its files stay, removed at the final exit."""
        self.server = await asyncio.start_unix_server(self._handle, sock=sock, limit=MAX_REQUEST)
        self.path, self.link = kept["path"], kept["link"]
        self.identity, self.pid_identity, self.link_identity = (
            tuple(kept[key]) if kept[key] else None for key in ("identity", "pid_identity", "link_identity"))

    def _register(self) -> None:
        """Link the runtime directory to our --control-socket; without it we still run, just not discoverable."""
        try:
            private_runtime_dir(self.owner)
            target = os.path.abspath(self.path)
            try:
                os.symlink(target, self.link)
            except FileExistsError:  # a dead master of the same pid left it: ours now
                os.unlink(self.link)
                os.symlink(target, self.link)
            self.link_identity = file_identity(self.link)
            if self.owner is not None:
                os.lchown(self.link, *self.owner)
        except (OSError, ConfigError) as exc:
            log.warning("`balancer status` without --control-socket will not find this master: %s",
                        getattr(exc, "strerror", None) or exc)
            self.link = ""

    def _clear_stale_socket(self) -> None:
        """Remove a socket file left by a dead master; refuse a live one and anything not a socket."""
        try:
            taken = clear_stale_socket(self.path)
        except OSError as exc:
            raise ConfigError(f"cannot create control socket {self.path}: {exc.strerror}") from None
        if taken == "not a socket":
            raise ConfigError(f"control socket {self.path} exists and is not a socket")
        if taken == "live":
            config = self.master.config
            if config.name and not config.control_socket:
                raise ConfigError(f"a master named {config.name!r} is already running (control socket {self.path}); "
                                  "pass another --name")
            raise ConfigError(f"control socket {self.path} belongs to a running master; "
                              "pass --control-socket to run another")

    async def close(self) -> None:
        """Stop serving and remove the socket and pid files we created."""
        if self.server is not None:
            self.server.close()
            self.server = None
        unlink_if_ours(self.path, self.identity)
        unlink_if_ours(self.pid_file, self.pid_identity)
        unlink_if_ours(self.link, self.link_identity)
        self.identity = self.pid_identity = self.link_identity = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one request, after checking the peer runs as our user; if the master stops first, say so."""
        CONNECTION.set(writer)
        try:
            reply = await self._answer(reader, writer)
        except asyncio.CancelledError:
            # The master stopped while this client waited (status --interval): the end of its loop cancels what
            # is left. Answered and ended here, the task leaves no CancelledError traceback in the log.
            reply = {"ok": False, "error": "master stopped", "stopped": True, "pid": os.getpid()}
        except OSError:
            reply = None
        try:
            if reply is not None:
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict:
        """Read one request line (bounded in time, size and nesting) from a peer of our uid; the reply."""
        sock = writer.get_extra_info("socket")
        _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        if uid != os.getuid():
            return {"ok": False, "error": "permission denied"}
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:  # no newline before the client's end: the request is what came
            line = exc.partial
        except asyncio.LimitOverrunError:
            return {"ok": False, "error": f"bad request: longer than {MAX_REQUEST} bytes"}
        except TimeoutError:
            return {"ok": False, "error": f"bad request: no whole line within {READ_TIMEOUT:g}s"}
        try:
            request = parse_request(line)
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        return await self.execute(request)

    async def execute(self, request: dict) -> dict:
        """Run one command against the master: the handler named by request["cmd"]."""
        cmd = request.get("cmd")
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        return await handler(request)

    async def report_status(self, request: dict) -> dict:
        """Who this master is (brief), or its workers and figures measured over request["interval"] seconds."""
        # Here, not at the top: the client imports this module and must not pay for the master's modules.
        from balancer.control_status import full_status, summary

        if request.get("brief"):  # discovery: who is this master, fast
            return {"ok": True, **summary(self.master)}
        interval = request.get("interval", 0)
        if not is_number(interval) or not 0 <= interval <= MAX_INTERVAL:  # false for nan (and 1e999: inf)
            return {"ok": False, "error": f"status needs an interval between 0 and {MAX_INTERVAL:g} seconds, "
                                         f"got {interval!r}"}
        return {"ok": True, **await full_status(self.master, interval)}

    async def stop_master(self, request: dict) -> dict:
        """Stop at once, as SIGTERM does, also while the first workers boot."""
        master = self.master
        if not (master.stopping):  # already stopping: --wait waits for that stop
            master.signals.put_nowait(signal.SIGTERM)  # the same path as a real SIGTERM
        return {"ok": True, "pid": os.getpid()}

    async def reload_workers(self, request: dict) -> dict:
        """Rolling reload, as SIGHUP does; with request["wait"], answered once every slot serves the new code."""
        if (busy := self.unless_serving()) is not None:
            return busy
        done = self.master.request_reload()  # re-reads -c and tells systemd too
        # Shielded: the end of a client's wait (the master stopping) must not cancel what systemd is told.
        if request.get("wait") and not await asyncio.shield(done):
            return {"ok": False, "error": "reload stopped: a replacement could not boot, or the master is stopping; "
                                          "see its log"}
        return {"ok": True, "generation": self.master.supervisor.generation}

    async def scale_workers(self, request: dict) -> dict:
        """Run request["n"] workers: a whole number from 1 to MAX_WORKERS, as --workers takes."""
        if (busy := self.unless_serving()) is not None:
            return busy
        n = request.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_WORKERS:  # True is an int too
            return {"ok": False, "error": f"scale needs a worker count between 1 and {MAX_WORKERS} "
                                          f"({WORKERS_PER_CPU} per usable CPU), got {n!r}"}
        self.master.supervisor.scale(n)
        return {"ok": True, "target": self.master.supervisor.target}

    async def upgrade_master(self, request: dict) -> dict:
        """Re-exec the master in place, as SIGUSR2 does.

        Answered once the preflight passed (a broken release is still reported, exit 1), written before the exec
        can begin; with request["wait"], by the new image once it accepts again: this connection goes across the
        exec. A failure after the preflight is answered here, unless the answer went out already (None).
        """
        upgrader, writer = self.master.upgrader, CONNECTION.get()
        answered = []

        def answer() -> None:
            reply = {"ok": True, "pid": os.getpid(), "upgrades": upgrader.upgrades, "started": True}
            writer.write(json.dumps(reply).encode() + b"\n")  # a few bytes into an empty socket buffer: sent now
            answered.append(True)

        wait = bool(request.get("wait"))
        why = await asyncio.shield(upgrader.start(writer.get_extra_info("socket") if wait else None,
                                                  None if wait else answer))
        if answered:
            return None
        return {"ok": False, "error": f"upgrade failed: {why}", "pid": os.getpid()}

    def unless_serving(self) -> dict | None:
        """The refusal of a command that changes the pool while the master boots or stops; None when it serves."""
        master = self.master
        if master.supervisor is None or not master.booted or master.stopping:
            return {"ok": False, "error": "the master is starting or stopping"}
        return None


def parse_request(line: bytes) -> dict:
    """The JSON object of one request line; ValueError saying what is wrong with it."""
    if nesting_depth(line) > MAX_DEPTH:  # json.loads recurses per level: 3000 `[` are a RecursionError
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    request = json.loads(line or b"{}", parse_constant=not_a_number)
    if not isinstance(request, dict):
        raise ValueError("expected a JSON object")
    return request


def nesting_depth(text: bytes) -> int:
    """How deep [ and { nest in a JSON text, brackets inside strings aside, counted without parsing it."""
    depth = deepest = 0
    for byte in JSON_STRING.sub(b"", text):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def not_a_number(name: str) -> float:
    """json.loads takes NaN and Infinity, which JSON has not: a request with them is refused."""
    raise ValueError(f"{name} is not a JSON number")


def is_number(value: object) -> bool:
    """An int or a float, and not a bool (True is an int in Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def client_main(command: str, argv: list[str]) -> int:
    """`balancer reload|scale N|stop|status|ls`: the client lives in balancer.control_client."""
    from balancer.control_client import client_main as main

    return main(command, argv)
