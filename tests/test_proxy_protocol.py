"""PROXY protocol v1 and v2 through the real CLI on raw sockets, and the header reader on socketpairs."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import ssl
import time

import pytest

from tests.harness import Balancer, fd_count
from tests.test_abuse import metric_sum
from tests.test_metrics import wait_until
from tests.tlscerts import make_ca, make_signed
from balancer_workers.proxyproto import MORE, V2_SIGNATURE, ClientGone, HeaderReader, ProxyHeaderError

pytestmark = pytest.mark.timeout(60)
APP = ("--backend", "edgeapp:handler", "--proxy-protocol")
GET = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def v2(command: int = 1, family: int = 0x11, body: bytes | None = None, version: int = 2) -> bytes:
    """A v2 header; by default PROXY TCP4 from 10.0.0.7:7777 to 1.1.1.1:443, with a TLV after the addresses."""
    if body is None:
        body = bytes([10, 0, 0, 7, 1, 1, 1, 1]) + (7777).to_bytes(2, "big") + (443).to_bytes(2, "big")
        body += b"\x04\x00\x03abc"  # a TLV (type 4, NOOP): to be skipped
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + len(body).to_bytes(2, "big") + body


def v2_tcp6(src: str, port: int) -> bytes:
    body = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address("::1").packed + port.to_bytes(2, "big")
            + (443).to_bytes(2, "big"))
    return v2(family=0x21, body=body)


def exchange(port: int, *parts: bytes, pause: float = 0.0, timeout: float = 10) -> bytes:
    """Send parts on a new connection (pausing between them), return all the server sent until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        for i, part in enumerate(parts):
            if i and pause:
                time.sleep(pause)
            try:
                s.sendall(part)
            except OSError:
                break
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                return data
            data += chunk
    return data


def seen(answer: bytes) -> dict:
    """The edge app's JSON from a 200 answer."""
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


# ---- the reader on a socketpair: pure protocol, no server -------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("header, address", [
    (b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n", ("192.0.2.1", 56324)),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n", ("2001:db8::1", 1)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
    (v2(), ("10.0.0.7", 7777)),
    (v2_tcp6("2001:db8::7", 8888), ("2001:db8::7", 8888)),
    (v2(command=0), None),  # LOCAL: the proxy's own health check
    (v2(family=0x00, body=b""), None),
    (v2(family=0x31, body=b"/a" + bytes(214)), None),
])
def test_reader_takes_the_header_and_not_a_byte_more(header, address):
    # Blocking sockets, as the worker gets them from the master: a read that waited would hang the test.
    for step in (len(header), 1):  # all at once, and trickled byte by byte
        a, b = socket.socketpair()
        with a, b:
            reader = HeaderReader()
            result = MORE
            for i in range(0, len(header), step):
                assert result is MORE
                a.sendall(header[i:i + step] + (GET if i + step >= len(header) else b""))
                result = reader.read(b)
            assert result == address
            assert b.recv(1000) == GET  # what follows is left for TLS or HTTP


@pytest.mark.timeout(10)
@pytest.mark.parametrize("header", [
    b"GET / HTTP/1.1\r\n\r\n",  # no header at all
    b"PROXY TCP4 1.2.3.4\r\n",
    b"PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\n",
    b"PROXY TCP4 2001:db8::1 1.1.1.1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.1.1.1 70000 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.1.1.1 -1 2\r\n",
    b"PROXY TCP9 1.2.3.4 1.1.1.1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.1.1.1 1 2\n",  # LF alone: no CRLF within 107 bytes
    b"PROXY " + b"A" * 120,
    b"PROXY TCP4 \xff.2.3.4 1.1.1.1 1 2\r\n",
    v2(version=1),
    v2(command=2),
    v2(family=0x11, body=b"\x0a\x00\x00\x07"),  # TCP4 addresses cut short
    v2(family=0x12),  # datagrams
    V2_SIGNATURE[:11] + b"X" + bytes(4),
])
def test_reader_refuses_malformed_headers(header):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(header)
        a.shutdown(socket.SHUT_WR)  # a header cut short ends in EOF, which is malformed too
        reader = HeaderReader()
        with pytest.raises(ProxyHeaderError):
            while reader.read(b) is MORE:
                pass


@pytest.mark.timeout(10)
def test_reader_never_waits_for_bytes():
    a, b = socket.socketpair()  # blocking, as accepted fds come from the master
    with a, b:
        reader = HeaderReader()
        assert reader.read(b) is MORE  # nothing yet
        a.sendall(b"PROXY TCP4 ")
        assert reader.read(b) is MORE and reader.read(b) is MORE
        a.sendall(V2_SIGNATURE[:4])  # v1 begun: its rest must follow, "\r\n\r\n" is not it
        with pytest.raises(ProxyHeaderError):
            reader.read(b)
    a, b = socket.socketpair()
    with a, b:
        reader = HeaderReader()
        a.sendall(v2()[:20])
        assert reader.read(b) is MORE and reader.read(b) is MORE  # v2 length known, its addresses not all here


@pytest.mark.timeout(10)
def test_reader_tells_a_silent_close_from_a_cut_header():
    for sent, error in ((b"", ClientGone), (b"PROXY TCP4 1.2", ProxyHeaderError), (V2_SIGNATURE[:5], ProxyHeaderError)):
        a, b = socket.socketpair()
        with a, b:
            a.sendall(sent)
            a.close()
            reader = HeaderReader()
            with pytest.raises(error):
                while reader.read(b) is MORE:
                    pass


# ---- the real CLI ---------------------------------------------------------------------------------------


def test_v1_and_v2_headers_set_the_client_address_for_the_handler_and_the_access_log():
    with Balancer(*APP, "--workers", "2", "--access-log") as b:
        cases = [
            ((b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n" + GET,), "192.0.2.1"),
            ((b"PROXY TCP6 2001:db8::1 2001:db8::2 1 443\r\n", GET), "2001:db8::1"),  # header alone, then HTTP
            ((v2() + GET,), "10.0.0.7"),
            ((v2_tcp6("2001:db8::7", 8888), GET), "2001:db8::7"),
            ((v2(command=0) + GET,), "127.0.0.1"),  # LOCAL: the real peer
            ((b"PROXY UNKNOWN\r\n" + GET,), "127.0.0.1"),
        ]
        for parts, remote in cases:
            mark = b.mark()
            answer = seen(exchange(b.port, *parts, pause=0.05))
            assert answer["remote"] == remote and answer["peer"] == "127.0.0.1", (parts, answer)
            b.wait_for(rf"^{re.escape(remote)} - - \[.*\"GET / HTTP/1.1\" 200", 10, start=mark)
        assert metric_sum(b, "balancer_worker_proxy_protocol_errors_total") == 0


def test_malformed_headers_close_the_connection_and_are_counted():
    bad = [GET, b"PROXY TCP4 1.2.3.4\r\n" + GET, b"PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\n" + GET,
           v2(version=1) + GET, v2(family=0x12) + GET, b"PROXY " + b"A" * 120]
    with Balancer(*APP, "--workers", "2") as b:
        for _ in range(4):  # both workers have served a connection: what they open lazily is open
            seen(exchange(b.port, v2() + GET))
        workers = b.worker_pids()
        fds = sum(fd_count(pid) for pid in workers)
        for raw in bad * 5:
            assert exchange(b.port, raw) == b"", raw  # closed without an HTTP answer
        wait_until(lambda: metric_sum(b, "balancer_worker_proxy_protocol_errors_total") == 5 * len(bad), 10,
                   f"{5 * len(bad)} bad PROXY headers counted")
        wait_until(lambda: sum(fd_count(pid) for pid in workers) <= fds, 10, "no fd left open")
        b.wait_for("bad PROXY header from 127.0.0.1: ", 10)
        assert seen(exchange(b.port, v2() + GET))["remote"] == "10.0.0.7"  # the workers serve on
        assert metric_sum(b, "balancer_worker_bad_requests_total") == 0


def test_an_untrusted_peer_is_served_as_itself_and_its_proxy_header_is_not_believed():
    with Balancer(*APP, "--workers", "1", "--forwarded-allow-ips", "10.9.9.9") as b:
        assert seen(exchange(b.port, GET))["remote"] == "127.0.0.1"  # a direct client: no header needed
        for spoof in (b"PROXY TCP4 6.6.6.6 1.1.1.1 1 2\r\n" + GET, v2() + GET):
            answer = exchange(b.port, spoof)
            # aiohttp's parser refuses it as HTTP (quoting the line): the handler never saw a request
            assert re.match(rb"HTTP/1\.[01] 400 ", answer) and b'"remote"' not in answer, answer[:300]
        wait_until(lambda: metric_sum(b, "balancer_worker_bad_requests_total") == 2, 10, "both counted as bad requests")
        assert metric_sum(b, "balancer_worker_proxy_protocol_errors_total") == 0


def test_a_header_trickled_slower_than_the_header_timeout_is_cut():
    header = b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n"
    with Balancer(*APP, "--workers", "1", "--header-timeout", "1") as b:
        with socket.create_connection(("127.0.0.1", b.port), timeout=8) as silent:
            started = time.monotonic()
            # The one worker serves others while the silent connection waits for its header...
            assert seen(exchange(b.port, header + GET))["remote"] == "192.0.2.1"
            assert time.monotonic() - started < 0.7
            assert silent.recv(1) == b""  # ...and cuts it at the deadline
            assert 0.7 < time.monotonic() - started < 2.5
        wait_until(lambda: metric_sum(b, "balancer_worker_header_timeouts_total") == 1, 10, "the cut counted")
        started = time.monotonic()
        answer = exchange(b.port, *(header[i:i + 2] for i in range(0, len(header), 2)), GET, pause=0.1)
        waited = time.monotonic() - started
        assert answer == b"" and 0.7 < waited < 2.5, (answer, waited)  # 2.3 s to send it all: cut at 1 s
        wait_until(lambda: metric_sum(b, "balancer_worker_header_timeouts_total") == 2, 10, "the cut counted")
        assert metric_sum(b, "balancer_worker_proxy_protocol_errors_total") == 0
        # The same header a little faster than the deadline is served.
        assert seen(exchange(b.port, header[:20], header[20:], GET, pause=0.3))["remote"] == "192.0.2.1"


def test_tls_after_the_proxy_header(tmp_path):
    ca = make_ca(tmp_path)
    cert, key = make_signed(tmp_path, "server", "localhost", ca)
    ctx = ssl.create_default_context(cafile=str(ca[0]))
    with Balancer(*APP, "--workers", "1", "--certfile", str(cert), "--keyfile", str(key)) as b:
        for header, remote in ((v2_tcp6("2001:db8::9", 9999), "2001:db8::9"),
                               (b"PROXY TCP4 192.0.2.5 198.51.100.1 5 443\r\n", "192.0.2.5")):
            with socket.create_connection(("127.0.0.1", b.port), timeout=10) as raw:
                raw.sendall(header)
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(GET)
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
            answer = seen(data)
            assert answer["remote"] == remote and answer["scheme"] == "https", answer
        assert exchange(b.port, b"PROXY TCP4 nonsense\r\n") == b""
        wait_until(lambda: metric_sum(b, "balancer_worker_proxy_protocol_errors_total") == 1, 10, "counted")
