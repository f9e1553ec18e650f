"""Which addresses a sandbox target may be dialled at (SPEC §4.1).

A sandbox's address comes from cluster state (pod IPs, `status.serviceFQDN`) or from DNS; both
can be steered by whoever controls a Sandbox's status or a Service in a sandbox namespace (an
ExternalName is one `kubectl apply` away). So every address is checked before it is dialled,
after resolution, and the gateway then dials exactly the address it checked (no second lookup
that a rebinding DNS server could answer differently).

Refused: the cloud metadata endpoints by name, and the special-purpose ranges that never hold a
pod (this host, link-local, multicast, documentation, reserved ...). IPv6 forms that carry an
IPv4 address (IPv4-mapped, NAT64, 6to4, IPv4-compatible) are judged by the IPv4 address they
carry. Loopback only in local runs (`allow_loopback`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Mapping

from gateway.config.loader import override_for

# Cloud instance-metadata and platform endpoints: reachable from every pod that is not
# firewalled, and each hands out credentials or instance secrets.
METADATA_ENDPOINTS = {
    "169.254.169.254": "AWS / GCP / Azure / OpenStack / Oracle instance metadata",
    "169.254.170.2": "AWS ECS task metadata and credentials",
    "169.254.169.123": "AWS time sync",
    "169.254.169.253": "AWS VPC DNS",
    "fd00:ec2::254": "AWS instance metadata (IPv6)",
    "fd00:ec2::23": "AWS VPC DNS (IPv6)",
    "fd20:ce::254": "GCP instance metadata (IPv6)",
    "100.100.100.200": "Alibaba Cloud instance metadata",
    "168.63.129.16": "Azure WireServer / platform DNS",
    "192.0.0.192": "Oracle Cloud instance metadata (legacy)",
}

# Special-purpose ranges (RFC 6890 and the IANA registries) no sandbox pod should live in, plus
# provider ranges around the endpoints above. Shared address space (100.64.0.0/10, RFC 6598)
# is where Alibaba Cloud puts its metadata and other platform services: refused as a whole,
# so a cluster whose pod network uses it cannot be served (its pods would answer 503).
DENIED_NETWORKS = {
    "0.0.0.0/8": "this network",
    "169.254.0.0/16": "IPv4 link-local (metadata services)",
    "100.64.0.0/10": "shared address space (Alibaba Cloud metadata 100.100.100.200)",
    "192.0.0.0/24": "IETF protocol assignments",
    "192.0.2.0/24": "documentation (TEST-NET-1)",
    "198.18.0.0/15": "benchmarking",
    "198.51.100.0/24": "documentation (TEST-NET-2)",
    "203.0.113.0/24": "documentation (TEST-NET-3)",
    "224.0.0.0/4": "multicast",
    "240.0.0.0/4": "reserved, broadcast",
    "::/128": "unspecified",
    "::/96": "IPv4-compatible (deprecated)",
    "100::/64": "discard-only",
    "64:ff9b:1::/48": "local-use NAT64",
    "2001::/32": "Teredo",
    "2001:db8::/32": "documentation",
    "fd00:ec2::/32": "AWS metadata services (IPv6)",
    "fd20:ce::/32": "GCP metadata services (IPv6)",
    "fe80::/10": "IPv6 link-local",
    "fec0::/10": "site-local (deprecated)",
    "ff00::/8": "multicast",
}
_METADATA = frozenset(ipaddress.ip_address(a) for a in METADATA_ENDPOINTS)
_DENIED = tuple(ipaddress.ip_network(n) for n in DENIED_NETWORKS)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 (SIIT): ::ffff:0:a.b.c.d
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

RESOLVE_TIMEOUT = 5.0
RESOLVED_SECONDS = 5.0  # how long a resolution is reused: bounds lookups per sandbox name
MAX_RESOLVED = 10_000
MAX_LOOKUPS = 32  # resolver threads busy at once; more requests for new names wait their turn


class AddressRefused(Exception):
    """A destination that must not be dialled; `code` is the error body's code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def carried_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, when it is one of the forms that carry one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _IPV4_TRANSLATED:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_allowed(text: str, *, allow_loopback: bool) -> bool:
    """May this literal address be dialled? False for anything that is not an IP address."""
    if "%" in text:  # a zone id: link-local by definition
        return False
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        inner = carried_ipv4(address)
        if inner is not None:
            return address_allowed(str(inner), allow_loopback=allow_loopback)
    if any(address in network for network in _LOOPBACK):
        return allow_loopback
    return address not in _METADATA and not any(address in network for network in _DENIED)


class Destinations:
    """Resolves sandbox host names (after `--resolve` overrides) to checked addresses."""

    def __init__(self, *, allow_loopback: bool, overrides: Mapping[str, tuple[str, int]] | None = None):
        self.allow_loopback = allow_loopback
        self.overrides = overrides or {}
        # (host, port) -> (expires at, (ip, port) to dial | (error code, message)): plain values
        self._resolved: dict[tuple[str, int], tuple[float, tuple]] = {}
        self._pending: dict[tuple[str, int], asyncio.Future] = {}  # one lookup per name at a time
        self._lookups: asyncio.Semaphore | None = None

    def __len__(self) -> int:
        """Resolutions remembered (at most MAX_RESOLVED)."""
        return len(self._resolved)

    def allowed(self, ip: str) -> bool:
        return address_allowed(ip, allow_loopback=self.allow_loopback)

    def cached(self, host: str, port: int) -> tuple[str, int] | None:
        """The checked address of a recent resolution; AddressRefused if it was refused; None
        when the name must be resolved (resolve())."""
        found = self._resolved.get((host, port))
        if found is None or found[0] < asyncio.get_running_loop().time():
            return None
        return _outcome(found[1])

    async def resolve(self, host: str, port: int) -> tuple[str, int]:
        """The (ip, port) to dial for host:port; AddressRefused when the name does not resolve
        or any address it resolves to is refused."""
        key = (host, port)
        pending = self._pending.get(key)
        if pending is not None:
            return _outcome(await asyncio.shield(pending))
        loop = asyncio.get_running_loop()
        pending = self._pending[key] = loop.create_future()
        try:
            if self._lookups is None:
                self._lookups = asyncio.Semaphore(MAX_LOOKUPS)
            async with self._lookups:
                outcome = await self._lookup(host, port)
            if len(self._resolved) >= MAX_RESOLVED:
                self._resolved.clear()
            self._resolved[key] = (loop.time() + RESOLVED_SECONDS, outcome)
            pending.set_result(outcome)
        finally:
            del self._pending[key]
            if not pending.done():  # this request was cancelled mid-lookup: its waiters get a 502, not a hang
                pending.set_result(("sandbox_unresolved", "The sandbox's address could not be resolved."))
        return _outcome(outcome)

    async def _lookup(self, host: str, port: int) -> tuple:
        override = override_for(self.overrides, host, port)
        if override is not None:
            host, port = override
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            try:
                async with asyncio.timeout(RESOLVE_TIMEOUT):
                    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, TimeoutError, UnicodeError):
                return ("sandbox_unresolved", "The sandbox's address could not be resolved.")
            addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not addresses:
            return ("sandbox_unresolved", "The sandbox's address could not be resolved.")
        if not all(self.allowed(a) for a in addresses):
            return ("address_not_allowed", "The sandbox's address is not one the gateway may dial.")
        return (addresses[0], port)


def _outcome(outcome: tuple) -> tuple[str, int]:
    if isinstance(outcome[1], str):
        raise AddressRefused(*outcome)
    return outcome
