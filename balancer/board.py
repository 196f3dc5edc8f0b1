"""The ack board: counters a worker publishes in shared memory and the master reads, no syscall on either side.

The master keeps its copy of each handed-over fd until the worker acknowledges it, and it needs each worker's
open-connection count. Sent as messages, those reports cost nearly one wake-up and recvmsg in the master and
one send in the worker per connection: 13 us and 11 us of CPU per new connection, measured with
Connection: close. As counters in a shared page they cost one store and one load.

Word 0: handoff messages the worker has handled, in the order the master sent them (low 40 bits), and how
many of those it refused (high 24 bits). Both share one aligned 8-byte word, so a single store publishes them
together: the master never sees a handled count without the refusals in it. A refusal's ids still travel as a
REFUSE message, sent before that store.
Word 1: connections the worker has closed.
Both only grow (modulo their widths). A memoryview item store or load of format "Q" is one aligned 8-byte move.
"""

from __future__ import annotations

import mmap
import os

WORDS = 2
SIZE = 8 * WORDS
HANDLED = 0
CLOSED = 1
HANDLED_BITS = 40
HANDLED_MASK = (1 << HANDLED_BITS) - 1
REFUSED_MASK = (1 << 24) - 1


def create(name: str = "balancer-board") -> tuple[int, memoryview]:
    """A new board: (memfd for the worker to inherit, the master's mapping of it)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, SIZE)
        return fd, attach(fd)
    except BaseException:
        os.close(fd)
        raise


def attach(fd: int) -> memoryview:
    """Map the board behind fd; the mapping stays valid after fd is closed."""
    return memoryview(mmap.mmap(fd, SIZE)).cast("Q")


def private() -> memoryview:
    """A board no other process can see (a route without a worker process, in tests)."""
    return memoryview(mmap.mmap(-1, SIZE)).cast("Q")


def pack(handled: int, refused: int) -> int:
    """Word 0 from the two counts."""
    return (handled & HANDLED_MASK) | ((refused & REFUSED_MASK) << HANDLED_BITS)


def unpack(word: int) -> tuple[int, int]:
    """(handled, refused) from word 0."""
    return word & HANDLED_MASK, word >> HANDLED_BITS


def handled_by(seq: int, handled: int) -> bool:
    """True when message number seq (1-based, masked) is within the first `handled` messages."""
    return ((handled - seq) & HANDLED_MASK) < (1 << (HANDLED_BITS - 1))
