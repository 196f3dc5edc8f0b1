"""The state a master hands its next image across execve: versioned JSON in a memfd, fds named by number.

Two parts. `carried` is what any later release must be able to read, whatever else changed: the fds that
survive the exec (listeners, each worker's pid, slot, channel and board) and the command line. Everything
else (counters, per-worker detail, supervisor and metrics state) is read only when `version` is this
release's: a new image that finds another version adopts the listeners and rolls the old workers as the
previous generation instead (balancer/upgrade.py).
"""

from __future__ import annotations

import json
import os

VERSION = 1  # raise on any change to the meaning of a field outside `carried`
# For tests: the version an old image writes, to play an image of another release (the reader keeps VERSION).
WRITE_VERSION_ENV = "BALANCER_UPGRADE_WRITE_VERSION"
ENV = "BALANCER_UPGRADE_STATE"  # names the memfd for the new image; taken out of the environment at once
MAX_SIZE = 16 << 20  # a state bigger than this is not ours


class StateError(ValueError):
    """The state cannot be read: not JSON, not an object, or missing what every version carries."""


def encode(state: dict) -> bytes:
    """The state as bytes; it must carry 'version' and 'carried'."""
    if not isinstance(state.get("version"), int) or not isinstance(state.get("carried"), dict):
        raise StateError("a state needs an integer 'version' and a 'carried' object")
    return json.dumps(state, separators=(",", ":")).encode()


def decode(data: bytes) -> dict:
    """The state from bytes; StateError unless it has a version and the carried part every version has."""
    try:
        state = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateError(f"not a state: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("version"), int):
        raise StateError("not a state: no version")
    carried = state.get("carried")
    if not isinstance(carried, dict) or not isinstance(carried.get("listeners"), list) \
            or not isinstance(carried.get("workers"), list):
        raise StateError("not a state: no listeners or workers")
    return state


def written_version() -> int:
    """The version this image writes: VERSION, unless a test plays another release."""
    try:
        return int(os.environ.get(WRITE_VERSION_ENV, VERSION))
    except ValueError:
        return VERSION


def compatible(state: dict) -> bool:
    """True when every part of the state means what this release thinks it means."""
    return state.get("version") == VERSION


def write_memfd(data: bytes) -> int:
    """A memfd holding data, inheritable (it must survive execve), positioned at 0."""
    fd = os.memfd_create("balancer-upgrade-state", 0)  # no MFD_CLOEXEC: the next image reads it
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_memfd(fd: int) -> bytes:
    """Everything in the memfd at fd, from its start; the fd is closed."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_SIZE:
                raise StateError(f"state larger than {MAX_SIZE} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def take_from_environ(environ: dict | None = None) -> dict | None:
    """The state named by $BALANCER_UPGRADE_STATE (removed from the environment), or None when there is none.

    The variable is taken out first: the workers this image starts must not see it.
    """
    environ = os.environ if environ is None else environ
    text = environ.pop(ENV, None)
    if text is None:
        return None
    try:
        fd = int(text)
    except ValueError:
        raise StateError(f"${ENV} is not an fd number: {text!r}") from None
    try:
        data = read_memfd(fd)
    except OSError as exc:
        raise StateError(f"cannot read the state at fd {fd}: {exc.strerror}") from None
    return decode(data)
