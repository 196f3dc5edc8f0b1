"""PROXY protocol v1 (text) and v2 (binary) headers: read off the socket before TLS or HTTP, and parsed.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt. The reader never takes a byte past the
header, so what follows (a TLS ClientHello, an HTTP request) stays in the kernel for whoever reads next.
"""

from __future__ import annotations

import ipaddress
import socket

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included ("PROXY TCP6 " + two full IPv6 addresses + two ports)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, 2-byte length
V2_TCP4, V2_TCP6, V2_UNSPEC, V2_UNIX_STREAM = 0x11, 0x21, 0x00, 0x31
MORE = object()  # read() result: the header is not complete yet; call again when the socket is readable
# Accepted fds come in blocking (the master accepts without SOCK_NONBLOCK; aiohttp's transport sets the flag
# later): each recv says MSG_DONTWAIT itself, as a blocking one would stall the worker's whole event loop.
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
TAKE = socket.MSG_DONTWAIT


class ProxyHeaderError(ValueError):
    """The connection did not start with a well-formed PROXY header."""


class ClientGone(Exception):
    """The peer closed before sending a byte: a TCP health check, not a protocol error."""


def _port(text: str) -> int:
    if not (text.isdigit() and text.isascii() and len(text) <= 5 and int(text) <= 65535):
        raise ProxyHeaderError(f"bad port {text!r}")
    return int(text)


def parse_v1(line: bytes) -> tuple[str, int] | None:
    """The source (host, port) of a v1 line ending in CRLF; None for UNKNOWN (keep the socket's own peer)."""
    try:
        parts = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    if len(parts) < 2 or parts[0] != "PROXY":
        raise ProxyHeaderError("not a PROXY header")
    if parts[1] == "UNKNOWN":  # the proxy does not know the client: the rest of the line is to be ignored
        return None
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ProxyHeaderError(f"bad v1 header {line[:60]!r}")
    version = 4 if parts[1] == "TCP4" else 6
    try:
        source, dest = ipaddress.ip_address(parts[2]), ipaddress.ip_address(parts[3])
    except ValueError:
        raise ProxyHeaderError(f"bad v1 address in {line[:60]!r}") from None
    if source.version != version or dest.version != version:
        raise ProxyHeaderError(f"v1 {parts[1]} with an IPv{6 if version == 4 else 4} address")
    port = _port(parts[4])
    _port(parts[5])
    return str(source), port


def v2_length(fixed: bytes) -> int:
    """Bytes that follow a v2 header's fixed 16; ProxyHeaderError for a bad signature, version or command."""
    if fixed[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("bad v2 signature")
    if fixed[12] >> 4 != 2:
        raise ProxyHeaderError(f"unsupported v2 version {fixed[12] >> 4}")
    if fixed[12] & 0x0F not in (0, 1):  # LOCAL, PROXY; the spec says drop anything else
        raise ProxyHeaderError(f"unsupported v2 command {fixed[12] & 0x0F}")
    return int.from_bytes(fixed[14:16], "big")


def parse_v2(header: bytes) -> tuple[str, int] | None:
    """The source (host, port) of a complete v2 header; None when it names none (LOCAL, UNSPEC, unix)."""
    v2_length(header)
    if header[12] & 0x0F == 0:  # LOCAL: the proxy's own connection (a health check): its real peer stands
        return None
    family, body = header[13], header[V2_FIXED:]
    if family == V2_TCP4:
        if len(body) < 12:
            raise ProxyHeaderError("v2 TCP4 addresses truncated")
        return str(ipaddress.IPv4Address(body[0:4])), int.from_bytes(body[8:10], "big")
    if family == V2_TCP6:
        if len(body) < 36:
            raise ProxyHeaderError("v2 TCP6 addresses truncated")
        return str(ipaddress.IPv6Address(body[0:16])), int.from_bytes(body[32:34], "big")
    if family in (V2_UNSPEC, V2_UNIX_STREAM):
        return None
    raise ProxyHeaderError(f"unsupported v2 family/transport 0x{family:02x}")  # datagrams, unknown families


class HeaderReader:
    """Reads one PROXY header off a stream socket, in as many calls as it takes to arrive; never blocks."""

    __slots__ = ("buf", "total")

    def __init__(self) -> None:
        self.buf = b""  # header bytes taken off the socket so far
        self.total = 0  # v2: the header's full length once known (V2_FIXED until the length field is in)

    def read(self, sock: socket.socket):
        """(host, port), None (keep the socket's peer) or MORE; ProxyHeaderError, ClientGone or OSError."""
        try:
            return self._read(sock)
        except BlockingIOError:  # all that arrived is taken: what was read so far is kept for the next call
            return MORE

    def _read(self, sock: socket.socket):
        while True:
            buf = self.buf
            if self.total:  # v2 is length-delimited: ask for exactly what is missing
                chunk = sock.recv(self.total - len(buf), TAKE)
                if not chunk:
                    raise ProxyHeaderError("closed inside a v2 header")
                buf = self.buf = buf + chunk
                if len(buf) < self.total:
                    return MORE
                if self.total == V2_FIXED:
                    self.total += v2_length(buf)
                    if self.total > V2_FIXED:
                        continue
                return parse_v2(buf)
            # v1 ends at its CRLF, which only a peek can find without reading past it.
            peek = sock.recv(V1_MAX - len(buf), PEEK)
            if not peek:
                if buf:
                    raise ProxyHeaderError("closed inside a v1 header")
                raise ClientGone
            seen = buf + peek
            if seen[:1] == b"\r":
                if seen[:12] != V2_SIGNATURE[:len(seen[:12])]:
                    raise ProxyHeaderError("bad v2 signature")
                self.total = V2_FIXED
                continue
            if seen[:6] != V1_PREFIX[:len(seen[:6])]:
                raise ProxyHeaderError("not a PROXY header")
            end = seen.find(b"\r\n")
            if end < 0:
                if len(seen) >= V1_MAX:
                    raise ProxyHeaderError(f"v1 header without CRLF in {V1_MAX} bytes")
                self.buf = buf + sock.recv(len(peek), TAKE)  # all of it is header: take it, so the socket reads empty
                return MORE
            want = end + 2 - len(buf)
            taken = sock.recv(want, TAKE)  # what the peek showed, up to the CRLF and not one byte more
            if len(taken) != want:
                raise ProxyHeaderError("v1 header shorter than peeked")
            return parse_v1(buf + taken)
