"""--forwarded-allow-ips: which peers may tell us who the client is (proxy headers, PROXY protocol)."""

from __future__ import annotations

import functools
import ipaddress

EVERYONE = "*"
CACHED_HOSTS = 1024  # distinct peer addresses whose verdict is remembered (proxies are few, clients many)


def parse_allow_ips(spec: str) -> tuple[bool, tuple]:
    """(everyone, networks) from "127.0.0.1,10.0.0.0/8,::1" or "*"; ValueError names a bad entry."""
    everyone = False
    networks = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item == EVERYONE:
            everyone = True
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"bad --forwarded-allow-ips entry {item!r}: expected an IP address, a CIDR network "
                              "such as 10.0.0.0/8, or *") from None
    return everyone, tuple(networks)


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in text (an IPv6 zone and IPv4-mapped form allowed), None if it is not one."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return ip


class TrustedPeers:
    """The set of peers named by --forwarded-allow-ips; unix-socket peers are always in it."""

    def __init__(self, spec: str) -> None:
        self.everyone, self.networks = parse_allow_ips(spec)
        # Verdicts per address text, computed once: a proxy sends every request from the same few addresses.
        self.host_trusted = functools.lru_cache(maxsize=CACHED_HOSTS)(self._host_trusted)

    def _host_trusted(self, host: str) -> bool:
        """True if host (an address as text) is in one of the networks; a name or garbage never is."""
        ip = parse_ip(host)
        return ip is not None and any(ip in net for net in self.networks)

    def peer_trusted(self, peername) -> bool:
        """True for a socket peer we believe: in the list, or on a unix socket (its mode decides who connects)."""
        if self.everyone or not isinstance(peername, (tuple, list)):
            return True
        return self.host_trusted(peername[0])
