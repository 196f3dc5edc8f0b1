"""Client addresses behind a proxy: X-Forwarded-*, RFC 7239 Forwarded, trusted peers only, through the real CLI."""

from __future__ import annotations

import http.client
import json
from types import MappingProxyType

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from balancer.trusted import TrustedPeers
from balancer_workers.forwarded import client_hop, from_forwarded, from_x_forwarded, strip_port
from tests.harness import Balancer, unix_request

pytestmark = pytest.mark.timeout(60)
BARE, APPLICATION = ("--backend", "whoisapp:whois"), ("--backend", "whoisapp:application")


def get(b: Balancer, headers: dict | None = None, source: str = "127.0.0.1", path: str = "/x?q=1"):
    """One request from source (any loopback address); (response, the JSON the handler answered)."""
    conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10, source_address=(source, 0))
    conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 200, body
    return resp, json.loads(body)


def get_unix(path: str, headers: dict) -> dict:
    """One request over a unix socket, raw."""
    data = unix_request(path, "/u", headers)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    return json.loads(body)


# ---- the rules, on their own -------------------------------------------------------------------------

def headers(**values) -> CIMultiDictProxy:
    return CIMultiDictProxy(CIMultiDict((k.replace("_", "-"), v) for k, v in values.items()))


def test_hop_forms_and_the_right_most_untrusted_hop():
    assert [strip_port(h) for h in ("1.2.3.4:80", "[2001:db8::1]:443", "2001:db8::1", " 10.0.0.1 ")] == \
        ["1.2.3.4", "2001:db8::1", "2001:db8::1", "10.0.0.1"]
    trusted = TrustedPeers("10.0.0.0/8, 127.0.0.1")
    # The client wrote "6.6.6.6" itself; the proxies (10.x, trusted) appended the rest.
    assert client_hop(["6.6.6.6", "1.2.3.4", "10.0.0.2", "10.0.0.1"], trusted) == 1
    assert client_hop(["10.0.0.3", "10.0.0.2"], trusted) == 0  # all trusted: the left-most
    assert client_hop(["6.6.6.6", "1.2.3.4"], TrustedPeers("*")) == 0  # "*": the left-most, as uvicorn
    assert from_x_forwarded(headers(X_Forwarded_For="garbage, 10.0.0.9"), trusted)[0] is None  # no made-up address


def test_per_hop_lists_align_with_the_chosen_hop():
    trusted = TrustedPeers("10.0.0.0/8")
    aligned = headers(X_Forwarded_For="1.2.3.4, 10.0.0.1", X_Forwarded_Proto="https, http",
                      X_Forwarded_Host="outer.example, inner.local")
    assert from_x_forwarded(aligned, trusted) == ("1.2.3.4", "https", "outer.example")
    single = headers(X_Forwarded_For="1.2.3.4, 10.0.0.1", X_Forwarded_Proto="https")  # set once, by the outer one
    assert from_x_forwarded(single, trusted) == ("1.2.3.4", "https", None)
    assert from_x_forwarded(headers(X_Forwarded_Proto="https"), trusted) == (None, "https", None)


def test_forwarded_elements_quoted_ipv6_and_the_client_element():
    trusted = TrustedPeers("10.0.0.0/8")
    elements = [MappingProxyType(e) for e in (
        {"for": "6.6.6.6", "proto": "http", "host": "forged"},
        {"for": "[2001:db8:cafe::17]:4711", "proto": "https", "host": "example.com"},
        {"for": "10.0.0.1", "proto": "http", "host": "inner"},
    )]
    assert from_forwarded(elements, trusted) == ("2001:db8:cafe::17", "https", "example.com")
    assert from_forwarded([MappingProxyType({"for": "unknown", "proto": "https"})], trusted) == (None, "https", None)


# ---- through the real CLI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [BARE, APPLICATION], ids=["bare-handler", "application"])
def test_trusted_peer_sets_remote_scheme_host_for_every_backend_kind(backend):
    # default --forwarded-allow-ips 127.0.0.1: we are trusted; the host is believed with --forwarded-host only
    with Balancer("--workers", "1", "--forwarded-host", *backend) as b:
        resp, seen = get(b, {"X-Forwarded-For": "203.0.113.7, 127.0.0.1", "X-Forwarded-Proto": "https",
                             "X-Forwarded-Host": "shop.example:8443"})
        assert seen["remote"] == "203.0.113.7"
        assert (seen["scheme"], seen["secure"], seen["host"]) == ("https", True, "shop.example:8443")
        assert seen["url"] == "https://shop.example:8443/x?q=1"
        if backend == APPLICATION:  # middlewares see the same request
            assert resp.getheader("X-Middleware-Remote") == "203.0.113.7"
        _, seen = get(b, {"Forwarded": 'for="[2001:db8:cafe::17]:4711";proto=https;host="api.example", '
                                       "for=127.0.0.1;proto=http"})
        assert (seen["remote"], seen["scheme"], seen["host"]) == ("2001:db8:cafe::17", "https", "api.example")
        _, seen = get(b)  # no proxy headers: the socket's view
        assert (seen["remote"], seen["scheme"], seen["secure"]) == ("127.0.0.1", "http", False)
        assert seen["host"] == f"127.0.0.1:{b.port}"


def test_untrusted_peer_cannot_spoof_and_access_log_shows_the_real_client(tmp_path):
    sock_path = str(tmp_path / "edge.sock")
    spoof = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example",
             "Forwarded": "for=7.7.7.7;proto=https;host=evil2.example"}
    # Only 127.0.0.2 is trusted: a client on 127.0.0.1 is just a client.
    with Balancer("--workers", "1", "--forwarded-allow-ips", "127.0.0.2", "--access-log",
                  "--bind", f"unix:{sock_path}", *BARE) as b:
        mark = b.mark()
        _, seen = get(b, spoof, source="127.0.0.1", path="/spoof")
        assert (seen["remote"], seen["scheme"], seen["secure"]) == ("127.0.0.1", "http", False)
        assert seen["host"] == f"127.0.0.1:{b.port}"
        assert b.wait_for(r'^(\S+) - - \[.*"GET /spoof ', start=mark).group(1) == "127.0.0.1"

        # From the trusted proxy: the right-most hop it does not trust is the client; what the client wrote
        # to the left of it (6.6.6.6) is ignored.
        _, seen = get(b, {"X-Forwarded-For": "6.6.6.6, 198.51.100.4"}, source="127.0.0.2", path="/proxied")
        assert seen["remote"] == "198.51.100.4"
        assert b.wait_for(r'^(\S+) - - \[.*"GET /proxied ', start=mark).group(1) == "198.51.100.4"

        # A unix-socket peer is trusted: who may connect is the socket's mode and group.
        seen = get_unix(sock_path, {"X-Forwarded-For": "192.0.2.55", "X-Forwarded-Proto": "https"})
        assert (seen["remote"], seen["scheme"]) == ("192.0.2.55", "https")


def test_no_proxy_headers_ignores_them_even_from_trusted_peers():
    with Balancer("--workers", "1", "--no-proxy-headers", *BARE) as b:
        _, seen = get(b, {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https",
                          "Forwarded": "for=203.0.113.8"})
        assert (seen["remote"], seen["scheme"]) == ("127.0.0.1", "http")


def test_forwarded_host_is_believed_only_when_asked_for():
    # uvicorn's default: a trusted proxy's X-Forwarded-For and -Proto count, but a Host the client chose (an
    # X-Forwarded-Host nginx passed through) must not pass a same-origin check that compares with request.host.
    forged = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    with Balancer("--workers", "1", *BARE) as b:
        real = f"127.0.0.1:{b.port}"
        _, seen = get(b, forged)
        assert (seen["remote"], seen["scheme"], seen["host"]) == ("203.0.113.7", "https", real)
        assert seen["url"] == f"https://{real}/x?q=1"
        _, seen = get(b, {"Forwarded": 'for=203.0.113.8;proto=https;host="evil.example"'})
        assert (seen["remote"], seen["scheme"], seen["host"]) == ("203.0.113.8", "https", real)
        # X-Forwarded-Host alone is no X-Forwarded-* header that counts: Forwarded is still read.
        _, seen = get(b, {"X-Forwarded-Host": "evil.example", "Forwarded": "for=203.0.113.9"})
        assert (seen["remote"], seen["host"]) == ("203.0.113.9", real)
        _, seen = get(b, {"X-Forwarded-Host": "evil.example"})
        assert (seen["remote"], seen["host"]) == ("127.0.0.1", real)
    with Balancer("--workers", "1", *BARE, env={"BALANCER_FORWARDED_HOST": "1"}) as b:  # opted in
        _, seen = get(b, forged)
        assert (seen["remote"], seen["scheme"], seen["host"]) == ("203.0.113.7", "https", "evil.example")


def test_forwarded_host_needs_proxy_headers():
    from tests.test_config_sources import assert_one_error, balancer

    assert_one_error(balancer("config", "--no-proxy-headers", "--forwarded-host"),
                     "--forwarded-host needs --proxy-headers")
