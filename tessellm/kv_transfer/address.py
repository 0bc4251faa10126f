"""Network addresses of the KV-transfer connectors: hosts, and ``host:port`` with IPv6.

A ``host:port`` (kv_peer, allowed_producers entries, a producer's "where")::

    "10.0.0.5:14579"      host 10.0.0.5, port 14579
    "Node-A:14579"        host node-a (host names compare case-blind), port 14579
    "[fe80::1]:14579"     host fe80::1 (IPv6 in brackets, as in a URL), port 14579
    "fe80::1:14579"       refused: a bare IPv6 address leaves no telling where the port starts

A host alone (kv_bind, kv_host, a request's remote_host) may be a bare IPv6 address or one in
brackets: it holds no port. Inside, hosts are kept bare and lower-case (``host_key``); an
address is written back with brackets around an IPv6 host (``join_host_port``), the form
ZeroMQ's ``tcp://`` endpoints take.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Optional

V4_WILDCARDS = ("0.0.0.0", "*")  # binds that listen on every IPv4 interface (ZeroMQ: "*")
V6_WILDCARD = "::"  # every IPv6 interface (a bracketed or long form comes here through host_key)
WILDCARDS = (*V4_WILDCARDS, V6_WILDCARD)  # binds that name no address a peer could reach
# Probes of the outward route (a UDP connect sends nothing): a private IPv4 address, and an
# address of IPv6's documentation prefix (2001:db8::/32), reached through the default route.
_V4_PROBE, _V6_PROBE = "10.255.255.255", "2001:db8::1"


def _unbracket(host: str) -> Optional[str]:
    """``host`` without IPv6 brackets, lower-case (an IPv6 address in its short form, so equal
    addresses compare equal); None: brackets around no IPv6 address, or a colon in a host that
    is no IPv6 address."""
    bracketed = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if bracketed else host
    if ":" not in bare:
        return None if bracketed else host.lower()
    try:
        return str(ipaddress.IPv6Address(bare))
    except ValueError:
        return None


def host_key(host: str, what: str) -> str:
    """A host (name, IPv4, or IPv6 bare or in brackets) bare and lower-case; ValueError naming
    ``what`` for one that is none of those."""
    key = _unbracket(host) if isinstance(host, str) and host and not any(c.isspace() for c in host) else None
    if key is None:
        raise ValueError(f"{what} must be a host name or address (an IPv6 address bare or in "
                         f"brackets, e.g. 'fe80::1' or '[fe80::1]'), got {host!r}.")
    return key


def split_host_port(address, what: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` as (bare lower-case host, port); ValueError naming
    ``what`` for anything else, a bare IPv6 address with a port among them."""
    example = f"e.g. '10.0.0.5:14579' or '[fe80::1]:14579'; got {address!r}"
    if not isinstance(address, str):
        raise ValueError(f"{what} must be 'host:port', {example}.")
    host, sep, port = address.rpartition(":")
    if not host.startswith("[") and ":" in host:
        raise ValueError(f"{what} {address!r} is ambiguous: a bare IPv6 address leaves no telling "
                         "where the port starts; write the address in brackets, '[ADDRESS]:PORT' "
                         "(e.g. '[fe80::1]:14579').")
    # ASCII digits only: str.isdigit takes "²" (int() refuses it) and "١٤" (int() reads 14)
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be 'host:port' with a port 1-65535, {example}.")
    return host_key(host, what), int(port)


def join_host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets (``[fe80::1]:14579``)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def is_ipv6(host: str) -> bool:
    """The host (bare or in brackets) is an IPv6 address."""
    return ":" in host


def producer_key(entry, what: str) -> str:
    """An ``allowed_producers`` entry as it is compared: ``host`` or ``host:port``, bare host
    lower-case, an IPv6 one in brackets (``[fe80::1]``, ``[fe80::1]:14579``); a bare IPv6
    entry is refused (``split_host_port``: is its last group a port?)."""
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"{what} entries are 'host' or 'host:port' strings, got {entry!r}.")
    if entry.startswith("[") and entry.endswith("]") or entry.count(":") == 0:
        host = host_key(entry, what)
        return f"[{host}]" if is_ipv6(host) else host
    host, port = split_host_port(entry, what)
    return join_host_port(host, port)


def reachable_host(bind: str) -> str:
    """The address a producer hands back (``remote_host``) when no ``kv_host`` is given: ``bind``
    itself, or for a wildcard bind the address of this host's outward interface in the bind's
    family (the source address of a UDP socket's route; nothing is sent): IPv4 for ``0.0.0.0``
    (the host's name where it has no IPv4 route), IPv6 for ``::``. ``bind``: as ``host_key``
    has it. ValueError telling to set ``kv_host`` for ``::`` on a host with no global IPv6 route
    (a link-local address is no address a peer can be handed)."""
    if bind in V4_WILDCARDS:
        try:
            return _route_source(socket.AF_INET, _V4_PROBE)
        except OSError:
            return socket.gethostname()
    if bind != V6_WILDCARD:
        return bind
    try:
        address = _route_source(socket.AF_INET6, _V6_PROBE)
    except OSError as exc:
        address, why = None, f"no IPv6 route ({exc.strerror or exc})"
    else:
        why = f"only the link-local address {address}"
    if address is None or ipaddress.IPv6Address(address.split("%")[0]).is_link_local:
        raise ValueError(f"ZmqPeerConnector's kv_bind '::' listens on every IPv6 interface, but this "
                         f"host has {why} to hand consumers; set kv_host to the address they reach "
                         "this producer at (e.g. '2001:db8::5'), or bind one address.")
    return address


def _route_source(family: int, probe: str) -> str:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((probe, 1))
        return s.getsockname()[0]
