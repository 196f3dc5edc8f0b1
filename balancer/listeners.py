"""Bind the listening sockets: TCP over IPv4/IPv6, Unix paths, or fds inherited from systemd."""

from __future__ import annotations

import os
import socket
import stat

from balancer.config import Bind, ConfigError

SD_LISTEN_FDS_START = 3
# TCP keepalive timings: a peer that vanished without a FIN is found dead after IDLE + INTVL * CNT seconds.
KEEPALIVE_IDLE, KEEPALIVE_INTVL, KEEPALIVE_CNT = 60, 10, 6


class Listener:
    """One non-blocking listening socket and what the dispatcher needs to know about it."""

    def __init__(self, sock: socket.socket, label: str, unlink: str = "") -> None:
        self.sock = sock
        self.label = label
        self.family = sock.family
        self.unlink = unlink  # unix path we created and remove on close
        sock.setblocking(False)

    def close(self) -> None:
        """Close the socket and remove a unix path we bound."""
        self.sock.close()
        if self.unlink:
            try:
                os.unlink(self.unlink)
            except OSError:
                pass


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


def bind_unix(bind: Bind, backlog: int) -> Listener:
    """Bind a unix-domain listener, replacing a stale socket file but never a regular file."""
    path = bind.path
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {bind}: {exc.strerror}") from None
    return Listener(sock, str(bind), unlink=path)


def systemd_listeners() -> list[Listener]:
    """Adopt sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS), if any for us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            set_inherited_options(sock, True)
        out.append(Listener(sock, f"systemd fd {fd}"))
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return out


def open_listeners(binds: list[Bind], backlog: int, keepalive: bool = True) -> list[Listener]:
    """Bind every address (or adopt systemd's), closing what was opened if one fails."""
    inherited = systemd_listeners()
    if inherited:
        return inherited
    out: list[Listener] = []
    try:
        for bind in binds:
            out.append(bind_unix(bind, backlog) if bind.family == "unix" else bind_tcp(bind, backlog, keepalive))
    except ConfigError:
        for listener in out:
            listener.close()
        raise
    return out
