"""--pid-file: written whole and moved into place, never through a planted link, never over a live master's."""

from __future__ import annotations

import errno
import os
import stat
import tempfile

from balancer.config import ConfigError
from balancer.listeners import file_identity, unlink_if_ours


def write_pid_file(path: str, owner: tuple[int, int] | None = None) -> tuple[int, int]:
    """Put our pid at path (given to owner, if any); its (st_dev, st_ino). ConfigError (one line) if we must not.

    The pid is written whole to a new file beside it, then moved into place: a symlink or FIFO someone
    planted at path (a directory the service user owns) is never opened, and a reader never sees it empty.
    A pid file naming another running master is left to it: that master removes it when it stops.
    """
    _check_pid_file(path)
    directory, name = os.path.split(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)  # O_EXCL: a file of our own
    except OSError as exc:
        raise ConfigError(f"cannot write pid file {path}: {exc.strerror}") from None
    try:
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(fd, 0o644 & ~umask)  # as an open(..., 0o644) would have made it: mkstemp's is 0600
            if owner is not None:
                os.fchown(fd, *owner)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)  # replaces a stale one; the rename is the only step others can see
    except OSError as exc:
        unlink_if_ours(temporary, file_identity(temporary))
        raise ConfigError(f"cannot write pid file {path}: {exc.strerror}") from None
    return st.st_dev, st.st_ino


def _check_pid_file(path: str) -> None:
    """ConfigError unless path is free for our pid file: missing, or a stale regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        reason = ("it is a symbolic link, which balancer does not follow: remove it, or name the file itself"
                  if exc.errno == errno.ELOOP else exc.strerror)
        raise ConfigError(f"cannot write pid file {path}: {reason}") from None
    try:
        mode = os.fstat(fd).st_mode
        text = os.read(fd, 64) if stat.S_ISREG(mode) else b""
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode):
        reason = os.strerror(errno.EISDIR) if stat.S_ISDIR(mode) else "not a regular file"
        raise ConfigError(f"cannot write pid file {path}: {reason}")
    try:
        pid = int(text)
    except ValueError:
        return  # half-written or not a pid file of ours: stale
    if pid != os.getpid() and is_balancer_master(pid):
        raise ConfigError(f"pid file {path} names a running balancer master (pid {pid}): stop it first, or pass "
                          f"another --pid-file")


def is_balancer_master(pid: int) -> bool:
    """True if pid runs `balancer` (not a worker or janitor): by its command line, or its title."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")[:4]
    except OSError:  # gone, or hidden from us (hidepid): not one we can tell is running
        return False
    if args[0].startswith(b"balancer: "):  # the proctitle extra: "balancer: master [name]"
        return args[0].startswith(b"balancer: master")
    return any(os.path.basename(arg) == b"balancer" and (i < 2 or args[i - 1] == b"-m")
               for i, arg in enumerate(args))
