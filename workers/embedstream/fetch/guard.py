"""Which addresses a reference may be fetched from: the SSRF guard.

A reference comes from a message, so its host is the producer's choice. Before any connection the
host is resolved and every address it resolves to is checked; one refused address refuses the fetch
(a name that resolves to a public and a private address could be answered by either). The fetch then
connects to the address that was checked, not to the name again, so a second resolution (DNS
rebinding) cannot swap it. Redirects are followed one hop at a time, each hop checked the same way.

Refused unless ``fetch.allowed_networks`` contains them: every address that is not globally
routable (loopback, link-local with the cloud metadata address 169.254.169.254, private, shared
100.64/10, unspecified, reserved, documentation ranges), multicast, and IPv6 addresses that carry
one of those (IPv4-mapped ``::ffff:127.0.0.1``, NAT64 ``64:ff9b::/96``). Host literals are read as
the C resolver reads them, so ``2130706433``, ``0x7f000001`` and ``127.1`` are 127.0.0.1 here too.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses a connection could go to (strings, as getaddrinfo gives them).
Resolver = Callable[[str, int], Sequence[str]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_INET_ATON_FORM = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.IGNORECASE)


class Refused(Exception):
    """The reference must not be fetched; the message says why (a dead letter's reason is fetch_refused)."""


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def literal(host: str) -> IPAddress | None:
    """The address a host that is an IP literal stands for, in any form the C resolver accepts; else None."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        pass
    if _INET_ATON_FORM.match(bare):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


class AddressGuard:
    def __init__(self, allowed_networks: Sequence[str] = (), resolver: Resolver = system_resolver) -> None:
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
        self._resolve = resolver

    def why_refused(self, address: IPAddress) -> str | None:
        if any(address in net for net in self._allowed if net.version == address.version):
            return None
        for inner in _embedded_ipv4(address):
            why = self.why_refused(inner)
            if why is not None:
                return f"{address} carries {inner}: {why}"
        if address.is_multicast:
            return f"{address} is multicast"
        if not address.is_global:
            kind = next(
                (name for name in ("loopback", "link_local", "private", "unspecified", "reserved")
                 if getattr(address, f"is_{name}")),
                "not globally routable",
            )  # fmt: skip
            return f"{address} is {kind.replace('_', '-')} (fetch.allowed_networks does not name it)"
        return None

    def address_for(self, host: str, port: int) -> str:
        """The checked address to connect to for ``host``; raises Refused (or OSError when the name is unknown)."""
        fixed = literal(host)
        addresses = (
            [fixed]
            if fixed is not None
            else [ipaddress.ip_address(a.split("%", 1)[0]) for a in self._resolve(host, port)]
        )
        if not addresses:
            raise OSError(f"{host} resolves to no address")
        for address in addresses:
            why = self.why_refused(address)
            if why is not None:
                named = "" if fixed is not None else f"{host} resolves to "
                raise Refused(f"{named}{why}")
        return str(addresses[0])


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.teredo is not None:
        found.append(address.teredo[1])
    return found
