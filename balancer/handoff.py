"""The master's per-connection syscalls (accept a batch, send a hand-off, close its copies): C when built.

`balancer/_speedups.c` is compiled at install when a C compiler is present. These Python versions are the
reference it is tested against, and the fallback where it is missing or BALANCER_NO_EXTENSIONS is set.
"""

from __future__ import annotations

import logging
import socket
from operator import index

from balancer import speedups, wire


def accept_many_py(sock: socket.socket, limit: int) -> tuple[list[int], int]:
    """Accept up to limit connections: (fds, errno), errno 0 at the limit, EAGAIN when the backlog ran dry."""
    accept = sock._accept  # the raw fd: the master never needs a socket object for it
    fds: list[int] = []
    while len(fds) < limit:
        try:
            fd, _addr = accept()
        except OSError as exc:
            return fds, exc.errno
        fds.append(fd)
    return fds, 0


def send_handoff_py(channel: socket.socket, ids: list[int], families: list[int], fds: list[int]) -> None:
    """Send one hand-off message with its fds; BlockingIOError when the channel is full."""
    # Convert first, check after: an __index__ may change the lists as they are read, and the message must
    # carry exactly the ids, families and fds that were checked.
    ids, families, fds = list(map(index, ids)), list(map(index, families)), list(map(index, fds))
    if not 1 <= len(ids) <= wire.MAX_FDS_PER_MSG or len(families) != len(ids) or len(fds) != len(ids):
        raise ValueError(f"a hand-off carries 1 to {wire.MAX_FDS_PER_MSG} fds with one id and family each")
    wire.send_fds(channel, wire.encode_handoff(ids, families), fds)


def close_fds_py(fds: list[int]) -> None:
    """Close every fd, ignoring ones already gone."""
    wire.close_all(fds)


if speedups.WHY == "missing":
    # pip hides the build's output, so an install without a C compiler would go unnoticed: say it once, here,
    # where the master first needs the hand-off (workers never import this module).
    logging.getLogger("balancer.handoff").warning(
        "C accelerator balancer._speedups is not installed (built only with a C compiler and the Python "
        "headers): handing connections off in Python, which costs the master more CPU per connection")
_c = speedups.MODULE
IMPLEMENTATION = "c" if _c is not None else "python"
accept_many = _c.accept_many if _c is not None else accept_many_py
send_handoff = _c.send_handoff if _c is not None else send_handoff_py
close_fds = _c.close_fds if _c is not None else close_fds_py
