"""TLS through the real CLI, with real clients: curl, openssl s_client, aiohttp, Python's ssl, wrk.

Certificates are made per module with the openssl command (tests/tlscerts.py): a CA, a server certificate for
localhost it signs, a client certificate, and a second server certificate to rotate to.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import warnings

import aiohttp
import pytest

from tests.harness import Balancer
from tests.test_abuse import metric_sum
from tests.test_metrics import wait_until
from tests.test_startup import assert_nothing_left, assert_one_error_line, start_failing
from tests.tlscerts import make_ca, make_signed

pytestmark = pytest.mark.timeout(60)
APP = ("--backend", "edgeapp:handler")
GET = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """CA, server (CN=localhost), rotated server (CN=rotated) and client certificates, as paths."""
    where = tmp_path_factory.mktemp("certs")
    ca = make_ca(where)
    return {"ca": ca[0], "server": make_signed(where, "server", "localhost", ca),
            "rotated": make_signed(where, "rotated", "rotated", ca),
            "client": make_signed(where, "client", "test-client", ca, server=False),
            "stranger": make_signed(where, "stranger", "stranger", make_ca(where, "other-ca"), server=False)}


def tls_args(pair, *more: str) -> tuple[str, ...]:
    return ("--certfile", str(pair[0]), "--keyfile", str(pair[1]), *more)


def client_context(certs, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def tls_get(port: int, ctx: ssl.SSLContext, timeout: float = 10) -> tuple[str, dict]:
    """One request on a new TLS connection: (the server certificate's CN, the JSON answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            cn = dict(rdn[0] for rdn in s.getpeercert()["subject"])["commonName"]
            s.sendall(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            return cn, json.loads(read_response(s)[1])


def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True when the server ends a new TLS connection without an HTTP answer (in the handshake, or right after)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(GET)
            return s.recv(65536) == b""  # TLS 1.3: the server's verdict on a client certificate comes after
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def read_response(s) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP/1.1 response with a Content-Length, read off s."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(body) < length:
        body += s.recv(65536)
    return head, body


def test_https_with_curl_openssl_and_aiohttp(certs):
    with Balancer(*APP, "--workers", "2", *tls_args(certs["server"])) as b:
        curl = subprocess.run(["curl", "-sS", "--cacert", str(certs["ca"]), f"https://localhost:{b.port}/"],
                              capture_output=True, text=True, timeout=20)
        assert curl.returncode == 0, curl.stderr
        seen = json.loads(curl.stdout)
        assert seen["scheme"] == "https" and seen["remote"] == "127.0.0.1"
        assert seen["alpn"] == "http/1.1"  # curl offers h2 too when built with it

        s_client = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{b.port}", "-alpn", "h2,http/1.1",
                                   "-CAfile", str(certs["ca"]), "-verify_hostname", "localhost"],
                                  input="", capture_output=True, text=True, timeout=20)
        out = s_client.stdout
        protocol = re.search(r"Protocol\s*: (TLSv[\d.]+)", out) or re.search(r"New, (TLSv[\d.]+),", out)
        assert protocol and protocol.group(1) in ("TLSv1.2", "TLSv1.3"), out
        assert "ALPN protocol: http/1.1" in out, out  # offered h2 first: told http/1.1
        assert re.search(r"subject=\s*CN\s*=\s*localhost", out), out
        assert "Verify return code: 0 (ok)" in out, out

        async def with_aiohttp() -> list[dict]:
            ctx = client_context(certs)
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            connector = aiohttp.TCPConnector(ssl=ctx)
            async with aiohttp.ClientSession(connector=connector) as session:
                answers = []
                for _ in range(6):  # keep-alive: one handshake, several requests
                    async with session.get(f"https://localhost:{b.port}/") as r:
                        assert r.status == 200
                        answers.append(await r.json())
                return answers

        answers = asyncio.run(with_aiohttp())
        assert {a["scheme"] for a in answers} == {"https"} and {a["tls"] for a in answers} <= {"TLSv1.2", "TLSv1.3"}
        assert {a["alpn"] for a in answers} == {"http/1.1"}
        assert len({a["pid"] for a in answers}) == 1  # one kept-alive connection

        plain = subprocess.run(["curl", "-sS", "-m", "5", f"http://127.0.0.1:{b.port}/"], capture_output=True,
                               text=True, timeout=20)
        assert plain.returncode != 0 and not plain.stdout  # plain HTTP to the TLS port gets no HTTP answer
        wait_until(lambda: metric_sum(b, "balancer_worker_tls_handshake_errors_total") == 1, 10,
                   "the plain-HTTP request counted as a failed handshake")


def test_a_tls_1_1_client_is_refused(certs):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(certs["ca"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer TLS 1.1, whatever the system says
    with Balancer(*APP, "--workers", "1", *tls_args(certs["server"])) as b:
        assert refused(b.port, old)
        cn, seen = tls_get(b.port, client_context(certs))  # and the worker serves on
        assert cn == "localhost" and seen["tls"] in ("TLSv1.2", "TLSv1.3")
        wait_until(lambda: metric_sum(b, "balancer_worker_tls_handshake_errors_total") == 1, 10,
                   "the refused handshake counted")


def test_a_silent_client_is_cut_at_the_header_timeout(certs):
    with Balancer(*APP, "--workers", "1", "--header-timeout", "1", *tls_args(certs["server"])) as b:
        with socket.create_connection(("127.0.0.1", b.port), timeout=8) as s:
            started = time.monotonic()
            try:
                assert s.recv(1) == b""  # no ClientHello: the worker closes at the deadline
            except ConnectionResetError:
                pass
            waited = time.monotonic() - started
        assert 0.7 < waited < 3, waited
        wait_until(lambda: metric_sum(b, "balancer_worker_header_timeouts_total") == 1, 10,
                   "the cut handshake counted as a header timeout")
        assert metric_sum(b, "balancer_worker_tls_handshake_errors_total") == 0
        assert tls_get(b.port, client_context(certs))[0] == "localhost"


def test_client_certificates_required(certs):
    args = tls_args(certs["server"], "--ca-certs", str(certs["ca"]), "--cert-reqs", "2")
    with Balancer(*APP, "--workers", "1", *args) as b:
        cn, seen = tls_get(b.port, client_context(certs, certs["client"]))
        assert cn == "localhost" and seen["client_cn"] == "test-client"
        curl = subprocess.run(["curl", "-sS", "--cacert", str(certs["ca"]), "--cert", str(certs["client"][0]),
                               "--key", str(certs["client"][1]), f"https://localhost:{b.port}/"],
                              capture_output=True, text=True, timeout=20)
        assert curl.returncode == 0 and json.loads(curl.stdout)["client_cn"] == "test-client", curl.stderr
        for cert in (None, certs["stranger"]):  # no certificate; one signed by a CA the server does not know
            assert refused(b.port, client_context(certs, cert))
        nocert = subprocess.run(["curl", "-sS", "--cacert", str(certs["ca"]), f"https://localhost:{b.port}/"],
                                capture_output=True, text=True, timeout=20)
        assert nocert.returncode != 0 and not nocert.stdout
        wait_until(lambda: metric_sum(b, "balancer_worker_tls_handshake_errors_total") == 3, 10,
                   "three refused client certificates counted")


@pytest.mark.parametrize("case", ["missing certfile", "missing keyfile", "key of another certificate",
                                  "not a certificate"])
def test_a_bad_certificate_or_key_is_one_line_and_exit_2(tmp_path, certs, case):
    cert, key = str(certs["server"][0]), str(certs["server"][1])
    args, message = {
        "missing certfile": (("--certfile", str(tmp_path / "nope.pem"), "--keyfile", key),
                             f"cannot read --certfile {tmp_path / 'nope.pem'}: No such file or directory"),
        "missing keyfile": (("--certfile", cert, "--keyfile", str(tmp_path / "nope.key")),
                            f"cannot read --keyfile {tmp_path / 'nope.key'}: No such file or directory"),
        "key of another certificate": (("--certfile", cert, "--keyfile", str(certs["rotated"][1])),
                                       "key values mismatch"),
        "not a certificate": (("--certfile", key, "--keyfile", key), f"cannot load --certfile {key}"),
    }[case]
    r, mark = start_failing(tmp_path, *args)
    assert_one_error_line(r, 2, message)
    assert_nothing_left(tmp_path, mark)


def test_sighup_serves_a_rotated_certificate_and_keeps_established_connections(tmp_path, certs):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(certs["server"][0].read_bytes())
    key.write_bytes(certs["server"][1].read_bytes())
    ctx = client_context(certs)
    with Balancer(*APP, "--workers", "2", "--certfile", str(cert), "--keyfile", str(key)) as b:
        assert tls_get(b.port, ctx)[0] == "localhost"
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as old:
            old.sendall(GET)
            before = json.loads(read_response(old)[1])["pid"]
            # Rotate as certbot does: new files in place, then a reload.
            cert.write_bytes(certs["rotated"][0].read_bytes())
            key.write_bytes(certs["rotated"][1].read_bytes())
            mark = b.mark()
            b.signal(signal.SIGHUP)
            b.wait_for("rolling reload done", 30, start=mark)
            cn, fresh = tls_get(b.port, ctx)
            assert cn == "rotated" and fresh["pid"] != before
            old.sendall(GET)  # its worker, replaced and draining, still answers on the connection made before
            head, body = read_response(old)
            assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["pid"] == before
            assert re.search(rb"(?i)\r\nconnection: close", head)  # and then lets it go
            assert old.getpeercert()["subject"] == ((("commonName", "localhost"),),)

        # A broken certificate on disk: the replacement cannot boot, the reload stops, the old workers serve on.
        cert.write_text("not a certificate\n")
        mark = b.mark()
        b.signal(signal.SIGHUP)
        b.wait_for(r"reload stopped at slot=\d.*old workers keep serving", 30, start=mark)
        assert "cannot load --certfile" in b.log()
        assert tls_get(b.port, ctx)[0] == "rotated"


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk missing (apt-get install wrk)")
def test_wrk_over_https_without_errors(certs):
    with Balancer(*APP, "--workers", "2", *tls_args(certs["server"])) as b:
        for extra in ((), ("-H", "Connection: close")):  # keep-alive, and a handshake per request
            r = subprocess.run(["wrk", "-t1", "-c8", "-d1s", *extra, f"https://127.0.0.1:{b.port}/"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            done = re.search(r"(\d+) requests in", r.stdout)
            assert done and int(done.group(1)) > 20, r.stdout
            assert "Socket errors" not in r.stdout and "Non-2xx" not in r.stdout, r.stdout
        assert metric_sum(b, "balancer_worker_tls_handshake_errors_total") == 0
