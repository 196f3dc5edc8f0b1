"""The master's HTTP server for /metrics, /healthz and /readyz (balancer/scrape.py) on real loopback sockets."""

from __future__ import annotations

import asyncio
import gzip
import logging
import subprocess
import sys

import pytest

from balancer import scrape
from balancer.scrape import ScrapeServer

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


def test_connections_past_the_cap_are_closed_and_the_cap_frees_up(monkeypatch):
    monkeypatch.setattr(scrape, "MAX_CONNECTIONS", 3)

    async def test(port, server):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        while len(server.clients) < 3:  # each is registered once its handler runs
            await asyncio.sleep(0.01)
        assert await exchange(port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n") == b""  # the 4th: closed unanswered
        for _, writer in held:
            writer.close()
        while server.clients:
            await asyncio.sleep(0.01)
        got = responses(await exchange(port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert got[0][0] == "HTTP/1.1 200 OK"

    run(test)


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
