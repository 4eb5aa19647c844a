"""Where Detour may connect: the operator's choice, never a client's.

In path mode a client names any registry. Detour contacts it only if:

* ``allowed_registries`` (globs) is empty or matches it, or the operator named it; and
* each address it connects to is public, unless the operator named that host and port.

A registry is *named* when a ``redirects`` rule sends names to it or from it, or it has an
entry under ``registries``; a name without a port stands for ports 443 and 80 only. Loopback,
private, link-local, shared (CGNAT) and other non-global addresses, where a cloud's metadata
service, the kubelet and ClusterIPs live, are reached only for a named registry. Detour's own
listening port on a loopback or unspecified address is never reached, named or not.

The address check runs in the client session's resolver (:class:`GuardedResolver`), on the
addresses actually connected to, so DNS rebinding can't get round it; URLs whose host is an IP
literal (which aiohttp never resolves) are checked by :meth:`EgressPolicy.check_url`, on the
first hop and on every redirect and token realm.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
import time
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from proxy.errors import RegistryDenied
from proxy.reference import api_host
from proxy.setting_types import split_host_port
from proxy.settings import Settings, named_registries

DEFAULT_PORTS = (443, 80)


class AddressRefused(OSError):
    """Every address of a host is one Detour may not connect to."""

    def __init__(self, host: str, port: int, addresses: Iterable[str]) -> None:
        self.host = host
        self.port = port
        self.addresses = sorted(set(addresses))
        super().__init__(f"{host}:{port} resolves only to addresses Detour may not reach")


def _split(registry: str) -> tuple[str, int | None]:
    """``host[:port]`` → (lower-case host without brackets, port or None)."""
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        return host.lower(), int(rest[1:]) if rest.startswith(":") else None
    host, sep, port = registry.rpartition(":")
    if sep and port.isdigit():
        return host.lower(), int(port)
    return registry.lower(), None


def is_public(address: str) -> bool:
    """Whether an IP address is globally routable (not loopback, private, link-local, ...)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class EgressPolicy:
    """Which registries a client may name, and which addresses Detour may connect to."""

    def __init__(
        self,
        named: Iterable[str],
        allowed: Iterable[str] = (),
        listen: tuple[str, int] | None = None,
    ) -> None:
        self._registries = frozenset(named)
        self._hosts: set[tuple[str, int | None]] = set()
        for registry in self._registries:
            host, port = _split(registry)
            self._hosts.add((host, port))
            self._hosts.add((_split(api_host(registry))[0], port))
        self._allowed = [pattern.lower() for pattern in allowed]
        self._listen = listen
        self._peers: frozenset[tuple[str, int]] = frozenset()

    def set_peers(self, peers: Iterable[str]) -> None:
        """The site's other Detours (``host:port``, kept current by proxy.cluster.peering):
        reachable on their own addresses and ports, as if named."""
        found = set()
        for peer in peers:
            host, _, port = peer.rpartition(":")
            found.add((host.strip("[]").lower(), int(port)))
        self._peers = frozenset(found)

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressPolicy:
        listen = split_host_port(settings.listen, 7439)
        return cls(named_registries(settings), settings.allowed_registries, listen)

    def named_registry(self, registry: str) -> bool:
        return registry in self._registries

    def check_registry(self, registry: str) -> None:
        """Refuse a registry that ``allowed_registries`` (when set) doesn't admit, unless the
        operator named it."""
        if not self._allowed or registry in self._registries:
            return
        if any(fnmatch.fnmatchcase(registry, pattern) for pattern in self._allowed):
            return
        raise RegistryDenied(
            f"Detour may not pull from {registry}: allowed_registries does not admit it; "
            "add a pattern there, or name the registry in redirects or registries",
            {"registry": registry},
        )

    def admits(self, host: str, port: int, address: str) -> bool:
        """Whether connecting to ``address`` for ``host:port`` is allowed."""
        if self._is_self(address, port):
            return False
        return self._named(host, port) or is_public(address)

    def _named(self, host: str, port: int) -> bool:
        host = host.lower().strip("[]")
        if (host, port) in self._hosts or (host, port) in self._peers:
            return True
        return port in DEFAULT_PORTS and (host, None) in self._hosts

    def _is_self(self, address: str, port: int) -> bool:
        if self._listen is None or port != self._listen[1]:
            return False
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        listen = self._listen[0]
        if ip.is_unspecified or address == listen:
            return True
        return listen in ("0.0.0.0", "::", "") and ip.is_loopback

    def check_url(self, url: URL) -> None:
        """For a URL whose host is an IP literal (never resolved): the same check, now."""
        host = (url.raw_host or "").strip("[]")
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a host name: the resolver checks each address it resolves to
        port = url.port or (443 if url.scheme == "https" else 80)
        if not self.admits(host, port, host):
            raise AddressRefused(host, port, [host])


# How long, and for how many hosts, :meth:`GuardedResolver.check` remembers that a host passed.
CHECKED_SECONDS = 60.0
CHECKED_HOSTS = 1024


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses the policy admits for the host."""

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or DefaultResolver()
        self._passed: dict[tuple[str, int], float] = {}  # until when

    async def check(self, host: str, port: int) -> None:
        """Raise :class:`AddressRefused` unless Detour may connect to ``host:port``: before a
        request for it goes anywhere else (to a peer, which would connect on its behalf).
        A host that passed is not looked up again for ``CHECKED_SECONDS``."""
        key = (host.lower(), port)
        if self._passed.get(key, 0.0) > time.monotonic():
            return
        literal = host.strip("[]")
        try:
            ipaddress.ip_address(literal.split("%", 1)[0])
        except ValueError:
            try:
                await self.resolve(host, port, socket.AF_UNSPEC)
            except AddressRefused:
                raise
            except OSError:
                return  # does not resolve: the request fails its own way, where it goes
        else:
            if not self._policy.admits(literal, port, literal):
                raise AddressRefused(host, port, [literal])
        if len(self._passed) >= CHECKED_HOSTS:
            self._passed.clear()
        self._passed[key] = time.monotonic() + CHECKED_SECONDS

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if self._policy.admits(host, port, r["host"])]
        if not kept:
            raise AddressRefused(host, port, [r["host"] for r in found])
        return kept

    async def close(self) -> None:
        await self._inner.close()
