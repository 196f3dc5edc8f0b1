"""The client's address and scheme (and, opted in, host) from proxy headers, believed only from trusted peers."""

from __future__ import annotations

import re

from aiohttp import hdrs

from balancer.trusted import TrustedPeers, parse_ip

# istr: a case-insensitive lookup with a plain str folds its case on every call, one per request here.
X_FOR, X_PROTO, X_HOST = hdrs.X_FORWARDED_FOR, hdrs.X_FORWARDED_PROTO, hdrs.X_FORWARDED_HOST
SCHEMES = frozenset(("http", "https"))
# A host[:port] as a proxy forwards it: a name or IPv4 address, or a bracketed IPv6 one. Anything else is
# dropped rather than handed to yarl, which would raise on it in request.url (a 500 for the handler).
HOST_RE = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,253})|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def strip_port(hop: str) -> str:
    """'1.2.3.4:5' -> '1.2.3.4', '[::1]:5' -> '::1', '::1' -> '::1' (a bare IPv6 address keeps its colons)."""
    hop = hop.strip()
    if hop.startswith("["):
        return hop[1:hop.find("]")] if "]" in hop else hop
    if hop.count(":") == 1:
        return hop.split(":", 1)[0]
    return hop


def client_hop(hosts: list[str], trusted: TrustedPeers) -> int:
    """Index of the client in a hop list (client first, nearest proxy last): the right-most untrusted hop.

    Each proxy appends the address it was connected from, so everything right of the first untrusted hop
    (walking from our peer outwards) was written by proxies we trust; what lies left of it came from the
    client and may be forged. All hops trusted (or "*"): the left-most, as uvicorn does.
    """
    if trusted.everyone:
        return 0
    for i in range(len(hosts) - 1, -1, -1):
        if not trusted.host_trusted(strip_port(hosts[i])):
            return i
    return 0


def same_hop(values: list[str], hops: int, chosen: int) -> str:
    """The entry of a per-hop list (X-Forwarded-Proto, -Host) written for the chosen X-Forwarded-For hop.

    Proxies that append to every header keep the lists aligned; one that sets a single value (nginx's
    $scheme) leaves a shorter list, whose left-most entry is then the outermost proxy's.
    """
    return values[max(0, len(values) - (hops - chosen))]


def split_list(headers, name: str) -> list[str]:
    """Every comma-separated entry of every header line called name, stripped, empty ones dropped."""
    return [item.strip() for line in headers.getall(name, ()) for item in line.split(",") if item.strip()]


def from_x_forwarded(headers, trusted: TrustedPeers) -> tuple[str | None, str | None, str | None]:
    """(remote, scheme, host) from X-Forwarded-For, -Proto and -Host; None where a header says nothing usable."""
    hops = split_list(headers, X_FOR)
    chosen = client_hop(hops, trusted) if hops else 0
    remote = client_address(hops[chosen]) if hops else None
    protos, hosts = split_list(headers, X_PROTO), split_list(headers, X_HOST)
    scheme = same_hop(protos, len(hops) or 1, chosen) if protos else None
    host = same_hop(hosts, len(hops) or 1, chosen) if hosts else None
    return remote, scheme, host


def from_forwarded(elements, trusted: TrustedPeers) -> tuple[str | None, str | None, str | None]:
    """(remote, scheme, host) from RFC 7239 Forwarded elements (aiohttp's request.forwarded, client first).

    The element naming the client (its for=, chosen as for X-Forwarded-For) was written by the proxy the
    client talked to, so its proto= and host= are what the client asked for.
    """
    if not elements:
        return None, None, None
    element = elements[client_hop([e.get("for", "") for e in elements], trusted)]
    for_ = element.get("for")
    return client_address(for_) if for_ else None, element.get("proto"), element.get("host")


def client_address(hop: str) -> str | None:
    """The hop's address in canonical form, None for "unknown", an obfuscated name (_x) or garbage."""
    ip = parse_ip(strip_port(hop))
    return None if ip is None else str(ip)


class ProxyHeaders:
    """Rewrites request.remote, .scheme (and .secure), and .host when asked to, from trusted peers' proxy headers.

    The host is opt-in (--forwarded-host), as in uvicorn, which believes only X-Forwarded-For and -Proto: a
    proxy that passes a client's X-Forwarded-Host through untouched (nginx does unless told otherwise) would
    let the client choose request.host, and with it pass a same-origin check such as a WebSocket's.
    """

    def __init__(self, allow_ips: str, host: bool = False) -> None:
        self.trusted = TrustedPeers(allow_ips)
        self.host = host

    def wrap(self, make_request):
        """aiohttp's request factory, returning a clone that carries the forwarded values when there are any.

        The request factory is where aiohttp makes the one request object everything sees: the handler,
        every middleware, the access log and the error log. A request without proxy headers costs three
        header lookups here (four with --forwarded-host).
        """
        trusted, rewrite, host = self.trusted, self.rewrite, self.host

        def make_forwarded_request(message, payload, protocol, writer, task):
            request = make_request(message, payload, protocol, writer, task)
            headers = message.headers
            if (X_FOR in headers or hdrs.FORWARDED in headers or X_PROTO in headers or host and X_HOST in headers) \
                    and trusted.peer_trusted(protocol.peername):
                return rewrite(request)
            return request

        return make_forwarded_request

    def rewrite(self, request):
        """request, or a clone of it with remote, scheme and host taken from its proxy headers."""
        headers = request.headers
        # X-Forwarded-* first: the proxies most used append or set X-Forwarded-For and pass a client's own
        # Forwarded header through untouched, so that one is believed only when no X-Forwarded-* is there.
        if X_FOR in headers or X_PROTO in headers or self.host and X_HOST in headers:
            remote, scheme, host = from_x_forwarded(headers, self.trusted)
        else:
            remote, scheme, host = from_forwarded(request.forwarded, self.trusted)
        changes = {}
        if remote is not None:
            changes["remote"] = remote
        if scheme is not None and scheme.lower() in SCHEMES:
            changes["scheme"] = scheme.lower()
        if host is not None and self.host and HOST_RE.fullmatch(host):
            changes["host"] = host
        return request.clone(**changes) if changes else request
