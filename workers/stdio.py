"""The worker's stdout and stderr: every line a backend prints reaches the shared stream whole, in one write()."""

from __future__ import annotations

import io
import os
import select
import sys

# Writes up to PIPE_BUF bytes to a pipe are never interleaved with other writers' (the master's, the other
# workers'): whole lines are packed into writes of at most this size; a longer line is written alone.
ATOMIC = select.PIPE_BUF
LONGEST_PARTIAL = 1 << 16  # a partial line longer than this is written out before its end comes


class WholeLines(io.BufferedIOBase):
    """A binary stream over a file descriptor that writes whole lines only; a partial line waits for its end.

    Python's own stdout writes a print()'s text and its newline separately when unbuffered (-u,
    PYTHONUNBUFFERED=1, as in containers) and cuts lines at 8 KiB boundaries when block-buffered (a pipe):
    either way another process's line could land inside one of the backend's.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.partial = bytearray()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def write(self, data) -> int:
        """Take all of data; write out the whole lines it completes."""
        partial = self.partial
        if not partial and data[-1:] == b"\n" and len(data) <= ATOMIC:  # a log record: one line, one write()
            self._write_all(data)
            return len(data)
        partial += data
        end = partial.rfind(b"\n") + 1
        if end:
            self._write_lines(bytes(partial[:end]))
            del partial[:end]
        if len(partial) > LONGEST_PARTIAL:
            self.flush()
        return len(data)

    def flush(self) -> None:
        """Write the partial line too: flush() is asked for (print(..., flush=True), a progress bar, exit)."""
        if self.partial:
            self._write_all(bytes(self.partial))
            self.partial.clear()

    def _write_lines(self, lines: bytes) -> None:
        """Whole lines (ending in a newline): in writes of at most ATOMIC bytes; a longer line alone."""
        start = 0
        while start < len(lines):
            end = lines.rfind(b"\n", start, start + ATOMIC) + 1
            if end <= start:  # one line longer than ATOMIC
                end = lines.index(b"\n", start) + 1
            self._write_all(lines[start:end])
            start = end

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


def whole_lines() -> None:
    """Replace sys.stdout and sys.stderr with text streams over WholeLines on the same descriptors."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # None, or not a real file (closed by the caller)
            continue
        stream.flush()
        setattr(sys, name, io.TextIOWrapper(WholeLines(fd), encoding=stream.encoding, errors=stream.errors,
                                            write_through=True))
