"""The master's control socket (0600, same user only); the client is balancer.control_client."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import stat
import struct
import tempfile

from balancer.config import ConfigError
from balancer.listeners import clear_stale_socket, file_identity, unlink_if_ours

log = logging.getLogger("balancer")

MAX_REQUEST = 4096  # one JSON line; anything longer is not ours
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


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

    @property
    def files(self) -> list[tuple[str, tuple[int, int] | None]]:
        """The paths this service created and removes at exit, each with its identity (st_dev, st_ino)."""
        made = ((self.path, self.identity), (self.pid_file, self.pid_identity), (self.link, self.link_identity))
        return [(path, identity) for path, identity in made if path and identity is not None]

    async def start(self) -> None:
        """Create the socket 0600 (no window where others could connect) and the pid file."""
        if not self.master.config.control_socket:
            private_runtime_dir(self.owner)
        self._clear_stale_socket()
        old_umask = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._handle, path=self.path)
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
        """Answer one request, after checking the peer runs as our user."""
        try:
            sock = writer.get_extra_info("socket")
            _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            if uid != os.getuid():
                reply = {"ok": False, "error": "permission denied"}
            else:
                line = await asyncio.wait_for(reader.readline(), 10)
                reply = await self.execute(json.loads(line[:MAX_REQUEST] or b"{}"))
        except (ValueError, asyncio.TimeoutError) as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        except OSError:
            return
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def execute(self, request: dict) -> dict:
        """Run one command against the master."""
        master, sup = self.master, self.master.supervisor
        if not isinstance(request, dict):
            return {"ok": False, "error": "bad request: expected a JSON object"}
        cmd = request.get("cmd")
        if cmd == "status":
            # Here, not at the top: the client imports this module and must not pay for aiohttp.
            from balancer.control_status import full_status, summary

            if request.get("brief"):  # discovery: who is this master, fast
                return {"ok": True, **summary(master)}
            interval = request.get("interval", 0)
            if not isinstance(interval, (int, float)) or interval < 0:
                return {"ok": False, "error": f"status needs an interval of 0 or more seconds, got {interval!r}"}
            return {"ok": True, **await full_status(master, interval)}
        if cmd == "stop":  # acts at once, as SIGTERM does, also while the first workers boot
            if not master.stopping:  # already stopping: --wait waits for that stop
                master.signals.put_nowait(signal.SIGTERM)  # the same path as a real SIGTERM
            return {"ok": True, "pid": os.getpid()}
        if sup is None or not master.booted or master.stopping:
            return {"ok": False, "error": "the master is starting or stopping"}
        if cmd == "reload":
            done = master.request_reload()  # as SIGHUP does: re-reads -c and tells systemd too
            if not request.get("wait"):
                return {"ok": True, "generation": sup.generation}
            if await done:
                return {"ok": True, "generation": sup.generation}
            return {"ok": False, "error": "reload stopped: a replacement could not boot, or the master is stopping; "
                                          "see its log"}
        if cmd == "scale":
            n = request.get("n")
            if not isinstance(n, int) or n < 1:
                return {"ok": False, "error": f"scale needs a worker count of at least 1, got {n!r}"}
            sup.scale(n)
            return {"ok": True, "target": sup.target}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


def write_pid_file(path: str, owner: tuple[int, int] | None = None) -> tuple[int, int]:
    """Write our pid to path (given to owner, if any); its (st_dev, st_ino). A file we could not finish is removed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write pid file {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        if owner is not None:
            os.fchown(fd, *owner)
    except OSError as exc:
        unlink_if_ours(path, (st.st_dev, st.st_ino))
        raise ConfigError(f"cannot write pid file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino


def client_main(command: str, argv: list[str]) -> int:
    """`balancer reload|scale N|stop|status`: the client lives in balancer.control_client."""
    from balancer.control_client import client_main as main

    return main(command, argv)
