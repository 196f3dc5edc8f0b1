"""Control-channel message format shared by the master and its workers."""

from __future__ import annotations

import array
import json
import os
import socket
import struct

# One message is one SOCK_SEQPACKET datagram: a type byte, then a type-specific body.
# Handoff and refuse are packed binary; rare ones are JSON. Acks and closes are not messages at all: the worker
# publishes them as counters on its ack board (balancer/board.py).
HANDOFF = 0x48  # 'H' master->worker: ids + families, fds attached via SCM_RIGHTS
DRAIN = 0x44  # 'D' master->worker: stop taking connections, finish in-flight, exit
READY = 0x59  # 'Y' worker->master: backend loaded, serving
REFUSE = 0x52  # 'R' worker->master: these ids were not taken; master re-dispatches them
BEAT = 0x42  # 'B' worker->master: heartbeat carrying a stats snapshot (JSON)
BOOT_ERROR = 0x45  # 'E' worker->master: the backend could not be loaded (JSON text)
# Master <-> zygote (--preload); the zygote says READY or BOOT_ERROR as a worker does, once its import is over.
IDLE = 0x49  # 'I' worker->master: asked to, says it has nothing running now (balancer/holding.py); no body
FORK = 0x46  # 'F' master->zygote: fork a worker (JSON: token, settings), its channel end and board attached
FORKED = 0x50  # 'P' zygote->master: the worker's pid (JSON: token, pid, or token, error)
FORK_REFUSED = 0x4E  # 'N' zygote->master: not safe to fork (JSON: token, reason); the master spawns instead
# Keep-alive rebalancing (workers/rebalance.py, balancer/parking.py): an idle keep-alive connection goes back to
# the master, which hands its next request to a free worker.
RETURN = 0x4B  # 'K' worker->master: one idle keep-alive connection, its fd attached (family, client address)
RESUMED = 0x80  # set in a handoff's family byte: a connection that served before; no PROXY header comes again
# master->worker: the ack boards of the other ready workers (fds attached, at most MAX_FDS_PER_MSG a message;
# body: 1 when the first of a set, which replaces the last), so a worker sees which of them is free
PEERS = 0x57  # 'W'

# Both ends size their buffers from these; the receiver's fd room must cover the sender's batch,
# otherwise the kernel truncates (MSG_CTRUNC) and closes the surplus fds.
MAX_FDS_PER_MSG = 64
MAX_MSG_BYTES = 256 * 1024
# Master->worker messages are small: a handoff of MAX_FDS_PER_MSG ids is 3 + 5 * 64 = 323 bytes.
MASTER_MSG_BYTES = 4096
FD_ROOM = socket.CMSG_SPACE(MAX_FDS_PER_MSG * array.array("i").itemsize)

# Plain ints: IntFlag arithmetic on every call showed up in profiles of the master's hot path.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_SEND_FLAGS = int(socket.MSG_DONTWAIT)
_TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)
_SOL_SOCKET, _SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)

_COUNT = struct.Struct("<BH")


class ProtocolError(ValueError):
    """A control message that does not parse."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """Return (master_end, worker_end) of a non-blocking SEQPACKET socketpair."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master_end.setblocking(False)
    return master_end, worker_end


def encode_handoff(ids: list[int], families: list[int], peers: list[bytes] | None = None) -> bytes:
    """Pack the ids and address families of a batch of fds; peers: one client address per RESUMED family."""
    n = len(ids)
    body = _COUNT.pack(HANDOFF, n) + array.array("I", ids).tobytes() + bytes(families)
    if peers:  # each a length byte and the address text (b"" when the connection has no PROXY client)
        body += b"".join(bytes((len(peer),)) + peer for peer in peers)
    return body


def decode_handoff(msg: bytes) -> tuple[list[int], list[int], list[bytes]]:
    """Unpack a handoff body into ids, families and the client address of each RESUMED one, in order.

    A handoff with RESUMED families and no address bytes at all (the C path sends none) gives b"" for each.
    """
    if len(msg) < _COUNT.size:
        raise ProtocolError("short handoff")
    _, n = _COUNT.unpack_from(msg)
    end = _COUNT.size + 4 * n
    if len(msg) < end + n:
        raise ProtocolError(f"handoff of {n} ids has {len(msg)} bytes")
    ids = array.array("I")
    ids.frombytes(msg[_COUNT.size:end])
    families = list(msg[end:end + n])
    at = end + n
    if at == len(msg):  # the common case: new connections only (max(): C speed), or resumed without addresses
        if not n or max(families) < RESUMED:
            return ids.tolist(), families, []
        return ids.tolist(), families, [b""] * sum(1 for family in families if family & RESUMED)
    peers: list[bytes] = []
    for _ in range(sum(1 for family in families if family & RESUMED)):
        if at >= len(msg) or at + 1 + msg[at] > len(msg):
            raise ProtocolError("handoff's client addresses are cut short")
        peers.append(msg[at + 1:at + 1 + msg[at]])
        at += 1 + msg[at]
    if at != len(msg):
        raise ProtocolError(f"handoff of {n} ids has {len(msg) - at} bytes too many")
    return ids.tolist(), families, peers


def encode_return(family: int, peer: bytes = b"") -> bytes:
    """Pack a RETURN message: the returned fd's family and its PROXY client's address (b"": none)."""
    return bytes((RETURN, family)) + peer


def decode_return(msg: bytes) -> tuple[int, bytes]:
    """Unpack a RETURN message into (family, client address)."""
    if len(msg) < 2 or msg[1] & RESUMED or len(msg) > 2 + 255:
        raise ProtocolError("bad return message")
    return msg[1], msg[2:]


def pack_peer(peer) -> bytes:
    """A PROXY client's (host, port) as a handoff carries it; b"" for none."""
    if not peer:
        return b""
    return f"{peer[0]} {peer[1]}".encode()[:255]


def unpack_peer(text: bytes) -> tuple[str, int] | None:
    """The (host, port) pack_peer() made; None for none."""
    if not text:
        return None
    host, _, port = text.decode(errors="replace").rpartition(" ")
    return host, int(port) if port.isdigit() else 0


def encode_refuse(ids: list[int]) -> bytes:
    """Pack a REFUSE message: the ids of a handoff the worker did not take."""
    return _COUNT.pack(REFUSE, len(ids)) + array.array("I", ids).tobytes()


def decode_refuse(msg: bytes) -> list[int]:
    """Unpack a REFUSE message into its ids."""
    if len(msg) < _COUNT.size:
        raise ProtocolError("short refuse")
    _, n = _COUNT.unpack_from(msg)
    if len(msg) != _COUNT.size + 4 * n:
        raise ProtocolError(f"refuse of {n} ids has {len(msg)} bytes")
    ids = array.array("I")
    ids.frombytes(msg[_COUNT.size:])
    return ids.tolist()


def encode_json(kind: int, body: object) -> bytes:
    """Pack a rare message whose body is JSON."""
    return bytes((kind,)) + json.dumps(body, separators=(",", ":")).encode()


def decode_json(msg: bytes) -> object:
    """Unpack a JSON-bodied message."""
    try:
        return json.loads(msg[1:])
    except ValueError as exc:
        raise ProtocolError(f"bad json body: {exc}") from None


def send_fds(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    """Send one message with fds attached; raises BlockingIOError when the channel is full."""
    anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([payload], anc, _SEND_FLAGS)


def inbox(size: int = MAX_MSG_BYTES) -> bytearray:
    """A receive buffer for recv_message, allocated once per reader and reused for every message."""
    return bytearray(size)


def recv_message(sock: socket.socket, buf: bytearray | None = None) -> tuple[bytes, list[int], bool]:
    """Receive one message into buf: (payload, fds, truncated). Fds arrive close-on-exec.

    Into a reused buffer: recvmsg(MAX_MSG_BYTES) allocates 256 KiB per call, which cost 12 us per message
    (15.3 vs 2.8 us per recvmsg, measured), paid by a worker for nearly every handoff.
    """
    if buf is None:
        buf = inbox()
    n, anc, flags, _ = sock.recvmsg_into([buf], FD_ROOM, _RECV_FLAGS)
    msg = bytes(memoryview(buf)[:n])
    if not anc:
        return msg, [], bool(flags & _TRUNCATED)
    fds: list[int] = []
    for level, kind, data in anc:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return msg, fds, bool(flags & _TRUNCATED)


END = (b"", [], False)  # what receive() returns once the peer has closed and everything it sent is read


def receive(sock: socket.socket, buf: bytearray | None = None) -> tuple[bytes, list[int], bool] | None:
    """recv_message for a read loop: None when nothing waits now, END once the channel is over.

    A peer that closed with our messages unread makes the first recvmsg fail with ECONNRESET *before* the
    messages it had sent us are returned: reading on past one reset gets them (a REFUSE, a final heartbeat),
    then EOF. A second reset in a row is the end. Other errors propagate.
    """
    for _ in range(2):
        try:
            return recv_message(sock, buf)
        except BlockingIOError:
            return None
        except ConnectionResetError:
            continue
    return END


def close_all(fds: list[int]) -> None:
    """Close every fd, ignoring ones already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
