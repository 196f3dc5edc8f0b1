"""Bind the listening sockets: TCP over IPv4/IPv6, Unix paths, or fds inherited from systemd."""

from __future__ import annotations

import errno
import os
import socket
import stat

from balancer.config import Bind, ConfigError

SD_LISTEN_FDS_START = 3
# TCP keepalive timings: a peer that vanished without a FIN is found dead after IDLE + INTVL * CNT seconds.
KEEPALIVE_IDLE, KEEPALIVE_INTVL, KEEPALIVE_CNT = 60, 10, 6


class Listener:
    """One non-blocking listening socket and what the dispatcher needs to know about it."""

    def __init__(self, sock: socket.socket, label: str, unlink: str = "",
                 identity: tuple[int, int] | None = None, systemd_fd: int | None = None) -> None:
        self.sock = sock
        self.label = label  # the address, as --bind would give it: what `balancer status --bind` matches
        self.systemd_fd = systemd_fd  # the fd systemd passed it as, for an inherited socket
        self.family = sock.family
        self.unlink = unlink  # unix path we created and remove on close, if it is still the file we made:
        self.identity = identity  # its (st_dev, st_ino) right after our bind()
        sock.setblocking(False)

    @property
    def described(self) -> str:
        """The address, and where an inherited socket came from (start-up line, systemd STATUS=)."""
        return self.label if self.systemd_fd is None else f"{self.label} (systemd fd {self.systemd_fd})"

    def close(self) -> None:
        """Close the socket and remove a unix path we bound."""
        self.sock.close()
        if self.unlink:
            unlink_if_ours(self.unlink, self.identity)


def file_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of path, None if it is gone."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def unlink_if_ours(path: str, identity: tuple[int, int] | None) -> None:
    """Remove path only if it is still the file we created: another process may have replaced it since."""
    if identity is not None and file_identity(path) == identity:
        try:
            os.unlink(path)
        except OSError:
            pass


def unix_socket_alive(path: str) -> bool:
    """True if a process listens on the unix socket at path; False for a stale socket file or none."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a live server with a full backlog answers EAGAIN instead of blocking us
        err = probe.connect_ex(path)
    if err in (0, errno.EAGAIN, errno.EINPROGRESS, errno.EPROTOTYPE):  # EPROTOTYPE: a live non-stream socket
        return True
    if err in (errno.ECONNREFUSED, errno.ENOENT):  # nobody listens: the file outlived its process
        return False
    raise OSError(err, os.strerror(err))  # EACCES and the like: we cannot tell, so we must not take it over


def clear_stale_socket(path: str) -> str:
    """Remove a socket file whose server is gone; "" if path is free now, else why not: "live" or "not a socket".

    lstat, not stat: a symlink planted at path is "not a socket", never followed. OSError (EACCES...) propagates:
    what cannot be checked must not be taken over.
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return "not a socket"
        if unix_socket_alive(path):
            return "live"
        os.unlink(path)
    except FileNotFoundError:
        pass
    return ""


def set_inherited_options(sock: socket.socket, keepalive: bool) -> None:
    """Options Linux copies from a listener to every accepted socket: set once here, not per connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTVL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_CNT)


def bind_tcp(bind: Bind, backlog: int, keepalive: bool = True) -> Listener:
    """Bind a TCP listener, choosing the family from the host."""
    try:
        infos = socket.getaddrinfo(bind.host, bind.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot bind {bind}: {exc.strerror}") from None
    family, _, proto, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        set_inherited_options(sock, keepalive)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {bind}: {exc.strerror}") from None
    host, port = sock.getsockname()[:2]
    return Listener(sock, str(Bind("tcp", host=host, port=port)))


def bind_unix(bind: Bind, backlog: int, mode: int | None = None, owner: tuple[int, int] = (-1, -1)) -> Listener:
    """Bind a unix-domain listener, replacing a stale socket file but never a live socket or a regular file.

    mode (--socket-mode) and owner (--user, --socket-group; -1 leaves one as is) are set before listen(): no
    client can connect while the file still has the umask's mode. The mode comes from a umask around bind(),
    not a chmod after it, which would follow a symlink swapped in for the socket to any file root may change.
    """
    path = bind.path
    try:
        taken = clear_stale_socket(path)  # a regular file is left alone: bind() then fails on it
    except OSError as exc:
        raise ConfigError(f"cannot bind {bind}: {exc.strerror}") from None
    if taken == "live":
        raise ConfigError(f"cannot bind {bind}: another process is listening there")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    identity = None
    try:
        old_umask = os.umask(0o777 & ~mode) if mode is not None else None
        try:
            sock.bind(path)
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        identity = file_identity(path)
        if owner != (-1, -1):
            os.lchown(path, *owner)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        unlink_if_ours(path, identity)
        raise ConfigError(f"cannot bind {bind}: {exc.strerror}") from None
    return Listener(sock, str(bind), unlink=path, identity=identity)


def systemd_listeners() -> list[Listener]:
    """Adopt sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS), if any for us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        raise ConfigError(f"bad LISTEN_FDS {os.environ['LISTEN_FDS']!r}: expected a number of sockets") from None
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = adopt_listener(fd)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            set_inherited_options(sock, True)
        out.append(Listener(sock, address_of(sock), systemd_fd=fd))
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return out


def adopt_listener(fd: int) -> socket.socket:
    """The socket at an fd systemd passed; ConfigError unless it is a listening TCP or unix stream socket."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ConfigError(f"systemd fd {fd} is not a socket")
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"systemd fd {fd}: {exc.strerror}") from None
    listening = sock.type == socket.SOCK_STREAM and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) or not listening:
        sock.detach()  # systemd's fd: left as it was
        raise ConfigError(f"systemd fd {fd} is not a listening TCP or unix stream socket (use ListenStream=)")
    return sock


def address_of(sock: socket.socket) -> str:
    """A listening socket's address written as --bind takes it: HOST:PORT, [IPV6]:PORT, unix:/path."""
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        if isinstance(name, bytes):  # abstract namespace
            name = "@" + name[1:].decode(errors="replace")
        return f"unix:{name}"
    host, port = sock.getsockname()[:2]
    return str(Bind("tcp", host=host, port=port))


def open_listeners(binds: list[Bind], backlog: int, keepalive: bool = True, unix_mode: int | None = None,
                   unix_owner: tuple[int, int] = (-1, -1)) -> list[Listener]:
    """Bind every address (or adopt systemd's), closing what was opened if one fails."""
    inherited = systemd_listeners()
    if inherited:
        return inherited
    out: list[Listener] = []
    try:
        for bind in binds:
            out.append(bind_unix(bind, backlog, unix_mode, unix_owner) if bind.family == "unix"
                       else bind_tcp(bind, backlog, keepalive))
    except ConfigError:
        for listener in out:
            listener.close()
        raise
    return out
