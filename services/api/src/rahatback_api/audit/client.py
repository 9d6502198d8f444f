"""The client's address: the connecting peer, or what a trusted reverse proxy says it forwarded for."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from starlette.types import Scope

from rahatback_api.settings import ConfigurationError

Networks = tuple[IPv4Network | IPv6Network, ...]


def parse_trusted_proxies(entries: list[str]) -> Networks:
    try:
        return tuple(ip_network(entry.strip(), strict=False) for entry in entries)
    except ValueError as exc:
        raise ConfigurationError(
            f"RAHATBACK_TRUSTED_PROXIES must list IP addresses or CIDR networks: {exc}"
        ) from exc


def _is_ip(value: str) -> bool:
    try:
        ip_address(value)
    except ValueError:
        return False
    return True


def _trusted(value: str, networks: Networks) -> bool:
    try:
        address = ip_address(value)
    except ValueError:
        return False
    return any(address in network for network in networks)


def client_address(scope: Scope, trusted: Networks) -> str | None:
    """X-Forwarded-For is believed only when the peer is a trusted proxy, and then only as far back as
    the hops our own proxies added: the first address from the right that is not one of ours is the
    client. Anything to its left was written by the client and proves nothing."""
    client = scope.get("client")
    peer: str | None = client[0] if client else None
    if peer is None or not trusted or not _trusted(peer, trusted):
        return peer
    forwarded = b",".join(value for name, value in scope["headers"] if name == b"x-forwarded-for")
    hops = [hop.strip() for hop in forwarded.decode("latin-1").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_ip(hop):
            return peer  # a proxy of ours writes addresses; garbage means the chain can't be read
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer
