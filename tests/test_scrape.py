"""The master's HTTP server for /metrics, /healthz and /readyz (balancer/scrape.py) on real loopback sockets."""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from balancer import scrape
from balancer.scrape import ScrapeServer
from tests.harness import Balancer
from tests.test_integration import _tcp_sockets, wait_until

pytestmark = pytest.mark.timeout(30)
BIG = b"# a metrics page\n" * 200  # past GZIP_MIN_BYTES


async def ok(headers):
    """A route answering 200 with a fixed body."""
    return 200, "text/plain", b"ok\n"


async def big(headers):
    """A route answering with a body worth compressing, its content type taken from Accept."""
    return 200, headers.get("accept", "text/plain") or "text/plain", BIG


async def broken(headers):
    """A route with a bug."""
    raise RuntimeError("route bug")


def run(test, **routes):
    """Start a ScrapeServer with routes (plus /ok, /big, /broken), run test(port), close it."""
    async def main():
        server = ScrapeServer({"/ok": ok, "/big": big, "/broken": broken, **routes})
        host, port = await server.start("127.0.0.1", 0)
        assert host == "127.0.0.1" and port > 0
        try:
            return await asyncio.wait_for(test(port, server), 20)
        finally:
            await server.close()

    return asyncio.run(main())


async def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes, then read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        data = await reader.read()  # EOF: the server closed
    except ConnectionResetError:  # what a connection past the cap gets
        data = b""
    writer.close()
    return data


def responses(data: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """Split raw HTTP/1.1 responses framed by Content-Length: (status line, headers, body) each."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        size = int(headers["content-length"])
        out.append((lines[0], headers, rest[:size]))
        data = rest[size:]
    return out


def test_keepalive_pipelining_and_connection_close():
    async def test(port, server):
        raw = (b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n"
               b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
               b"GET /ok?name=x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
               b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")  # after Connection: close: never answered
        got = responses(await exchange(port, raw))
        assert [r[0] for r in got] == ["HTTP/1.1 200 OK", "HTTP/1.1 404 Not Found",
                                       "HTTP/1.1 405 Method Not Allowed", "HTTP/1.1 200 OK"]
        assert got[0][2] == b"ok\n" and got[2][1]["allow"] == "GET, HEAD"
        assert got[3][1]["connection"] == "close"
        # HTTP/1.0 without keep-alive: one answer, then the server closes
        got = responses(await exchange(port, b"GET /ok HTTP/1.0\r\n\r\n"))
        assert len(got) == 1 and got[0][0].endswith("200 OK")

    run(test)


def test_chunked_with_a_content_length_is_answered_then_closed_and_expect_gets_100():
    async def test(port, server):
        # RFC 9112 6.1: the chunks frame the body, and the connection ends after the reply
        smuggled = (b"GET /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                    b"0\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        got = responses(await exchange(port, smuggled))
        assert [r[0] for r in got] == ["HTTP/1.1 200 OK"] and got[0][1]["connection"] == "close"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n"
                     b"Connection: close\r\n\r\n")
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"abc")
        got = responses(await reader.read())
        assert got[0][0] == "HTTP/1.1 200 OK"
        writer.close()

    run(test)


def test_head_sends_the_get_headers_and_no_body():
    async def test(port, server):
        data = await exchange(port, b"HEAD /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and body == b""
        assert f"Content-Length: {len(BIG)}".encode() in head

    run(test)


@pytest.mark.parametrize("accept_encoding,compressed", [("gzip", True), ("deflate, gzip;q=0.5", True),
                                                         ("gzip;q=0", False), ("", False)])
def test_gzip_only_when_asked(accept_encoding, compressed):
    async def test(port, server):
        extra = f"Accept-Encoding: {accept_encoding}\r\n".encode() if accept_encoding else b""
        raw = b"GET /big HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n" + extra
        got = responses(await exchange(port, raw + b"Connection: close\r\n\r\n"))
        (status, headers, body), = got
        assert headers["content-type"] == "application/openmetrics-text"  # the route saw the header
        assert headers["vary"] == "Accept-Encoding"  # either way: a cache must not serve one form for the other
        if compressed:
            assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == BIG
        else:
            assert "content-encoding" not in headers and body == BIG

    run(test)


@pytest.mark.parametrize("raw,status", [
    (b"BLAH\r\n\r\n", "400"),
    (b"GET /ok HTTP/1.1\r\nno colon here\r\n\r\n", "400"),
    (b"GET /ok HTTP/1.1\r\n\r\n", "400"),  # HTTP/1.1 without Host
    (b"GET http://example.com/ok HTTP/1.1\r\nHost: x\r\n\r\n", "400"),  # absolute form: no proxying
    (b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 * 1024) + b"\r\n\r\n", "431"),
    (b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 100000, "413"),
    (b"GET /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "501"),
    (b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n", "413"),  # said, not sent: at once
    (b"GET /ok HTTP/2.0\r\nHost: x\r\n\r\n", "505"),
])
def test_malformed_requests_get_an_error_and_the_server_lives_on(raw, status):
    async def test(port, server):
        got = await exchange(port, raw)
        assert got.split(b" ", 2)[1].decode() == status, got[:200]
        assert b"Connection: close" in got
        again = responses(await exchange(port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert again[0][0] == "HTTP/1.1 200 OK"

    run(test)


def test_a_failing_route_is_a_500_and_the_connection_goes_on(caplog):
    async def test(port, server):
        raw = (b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        with caplog.at_level(logging.ERROR, logger="balancer"):
            got = responses(await exchange(port, raw))
        assert [r[0] for r in got] == ["HTTP/1.1 500 Internal Server Error", "HTTP/1.1 200 OK"]
        assert any(r.exc_info and "route bug" in str(r.exc_info[1]) for r in caplog.records)

    run(test)


def test_idle_and_slow_clients_are_let_go(monkeypatch):
    monkeypatch.setattr(scrape, "IDLE_TIMEOUT", 0.3)
    monkeypatch.setattr(scrape, "FIRST_REQUEST_TIMEOUT", 0.3)

    async def test(port, server):
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await exchange(port, b"") == b""  # sent nothing: closed without a word
        partial = await exchange(port, b"GET /ok HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        assert partial.startswith(b"HTTP/1.1 408 ")
        # a keep-alive connection idle after its request is closed too
        got = responses(await exchange(port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert [r[0] for r in got] == ["HTTP/1.1 200 OK"]
        assert loop.time() - began < 5
        while server.clients:  # each handler ends once the client's FIN is read after its own
            await asyncio.sleep(0.01)

    run(test)


def test_a_new_connection_is_served_in_the_place_of_the_one_idle_longest(monkeypatch):
    monkeypatch.setattr(scrape, "MAX_CONNECTIONS", 3)

    async def kept_alive(port) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection answered once, left open for its next request."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200 OK")
        return reader, writer

    async def test(port, server):
        # the first has been answered and waits for its next request; the other two never sent one
        held = [await kept_alive(port)] + [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        while len(server.idle) < 3:  # each is registered once its handler runs
            await asyncio.sleep(0.01)
        for i in range(4):  # each newcomer is answered in the place of the one idle longest, in that order
            held.append(await kept_alive(port))
            assert await asyncio.wait_for(held[i][0].read(), 2) == b""  # ended without a word
            assert len(server.clients) == 3
        assert all(not reader.at_eof() for reader, _ in held[4:])
        for _, writer in held:
            writer.close()

    run(test)


def test_past_the_cap_of_connections_being_answered_a_new_one_is_refused(monkeypatch):
    monkeypatch.setattr(scrape, "MAX_CONNECTIONS", 3)
    release = asyncio.Event()

    async def hold(headers):
        await release.wait()
        return 200, "text/plain", b"held\n"

    async def test(port, server):
        held = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            held.append((reader, writer))
        while len(server.clients) < 3 or server.idle:  # all three in their route: none is idle
            await asyncio.sleep(0.01)
        assert await exchange(port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n") == b""  # closed unanswered
        release.set()
        for reader, writer in held:
            assert responses(await reader.read())[0][2] == b"held\n"
            writer.close()
        while server.clients:
            await asyncio.sleep(0.01)
        got = responses(await exchange(port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert got[0][0] == "HTTP/1.1 200 OK"

    run(test, **{"/hold": hold})


def test_a_new_connection_has_less_time_for_its_first_request_than_a_kept_one(monkeypatch):
    monkeypatch.setattr(scrape, "FIRST_REQUEST_TIMEOUT", 0.3)
    monkeypatch.setattr(scrape, "IDLE_TIMEOUT", 10)

    async def test(port, server):
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await exchange(port, b"") == b""  # sent nothing: closed at the first-request deadline
        assert loop.time() - began < 2
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200 OK")
        await asyncio.sleep(0.8)  # kept alive past the first-request deadline: it has IDLE_TIMEOUT now
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert responses(await reader.read())[0][0] == "HTTP/1.1 200 OK"
        writer.close()

    run(test)


def test_a_client_that_does_not_read_its_reply_is_let_go(monkeypatch):
    monkeypatch.setattr(scrape, "IDLE_TIMEOUT", 0.5)
    huge = b"x" * (32 << 20)  # far more than the socket buffers take: the write must wait for the reader

    async def flood(headers):
        return 200, "text/plain", huge

    async def test(port, server):
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
        writer.transport.pause_reading()
        writer.write(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
        began = loop.time()
        while not server.clients:
            await asyncio.sleep(0.01)
        while server.clients:  # the server gives up on it, though it is not idle
            await asyncio.sleep(0.01)
        assert loop.time() - began < 5
        writer.close()

    run(test, **{"/flood": flood})


def test_close_ends_a_scrape_in_progress():
    started = asyncio.Event()

    async def forever(headers):
        started.set()
        await asyncio.Event().wait()

    async def main():
        server = ScrapeServer({"/forever": forever})
        _, port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)
        began = asyncio.get_running_loop().time()
        await server.close()
        assert asyncio.get_running_loop().time() - began < 1.5 and not server.clients
        assert await asyncio.wait_for(reader.read(), 5) == b""
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(main())


def test_the_master_does_not_import_aiohttp():
    # The reason scrape.py exists: a master with its metrics endpoint on carries no aiohttp web stack.
    code = ("import sys, asyncio\n"
            "from balancer import master, metrics, scrape, control, supervisor\n"
            "assert 'aiohttp' not in sys.modules, sorted(m for m in sys.modules if 'aiohttp' in m)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_after_an_error_reply_the_client_may_finish_sending_without_a_reset():
    # A client still uploading when it is answered 413 must be able to read the answer: closing on unread
    # input resets the connection, and a reset can destroy the reply before the client reads it.
    async def test(port, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 200_000)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in head
        size = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert await reader.readexactly(size) == b"body too large\n"
        assert await reader.read() == b""  # the server's FIN: it has shut its side, and must still be reading
        writer.write(b"a" * 100_000)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    run(test)


def test_idle_connections_to_a_real_master_do_not_starve_its_probes():
    # Anyone who reaches the metrics port could get a pod restarted by holding its connections: the
    # liveness probe points there. Room is made for newcomers, and the idle ones close at their deadline.
    with Balancer("--workers", "1") as b:
        host, port = b.metrics_address.rsplit(":", 1)
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(200)]
        try:
            listeners = 2  # the app's and the metrics port
            wait_until(lambda: _tcp_sockets(b.pid) >= listeners + scrape.MAX_CONNECTIONS, 10, "the master to take them")
            assert _tcp_sockets(b.pid) <= listeners + scrape.MAX_CONNECTIONS + 1  # bounded: the eldest made way
            for path, body in (("/healthz", b"ok\n"), ("/readyz", b"ready: 1 workers\n")):
                began = time.monotonic()
                with urllib.request.urlopen(f"http://{b.metrics_address}{path}", timeout=5) as resp:
                    assert resp.status == 200 and resp.read() == body
                assert time.monotonic() - began < 1, path
            began = time.monotonic()
            for sock in idle:  # every idle one is closed without a word, by the deadline at the latest
                assert sock.recv(1) == b""
            assert time.monotonic() - began < scrape.FIRST_REQUEST_TIMEOUT + 3
        finally:
            for sock in idle:
                sock.close()
        assert "Traceback" not in b.log(), b.log()

