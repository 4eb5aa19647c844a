"""The cluster tier: the Detours of a site share one WAN fetch per blob, manifest and tag.

Every blob digest, manifest digest and tag has an *owner* among the peers, by rendezvous
(highest-random-weight) hashing: each peer scores ``sha256(peer, key)`` and the highest wins, so
a peer joining or leaving moves only its own share of the keys. A miss on a node goes to the
owner first (unless the node is the owner): the owner answers from its cache or does the one
upstream fetch, with its own single flight, and the node verifies and caches what it receives
while streaming it to its client. The owner's answer comes over the same registry API, so
nothing new can go wrong in between: digests are checked on the node as on any upstream.

* **Routes.** :meth:`Peering.route` puts the peers :meth:`~Peering.ahead` of this instance for
  the key in front of a route's upstreams (:class:`~proxy.upstream.rules.Upstream` with
  ``peer=True``): for a manifest or tag, the owner and the next peer in rendezvous order; for a
  blob, its parent in a tree of ``cluster.fan_out`` children a node laid over the same order,
  then the nodes above it up to the owner, then the owner's successor. So a blob that every
  node wants at once leaves each node at most ``fan_out`` times, streamed as it arrives, and
  the WAN still carries it once. The upstream client tries them in order and skips one that
  failed lately, so an owner that times out, answers 5xx or breaks mid-stream costs one
  attempt, and the next peer, then the upstream, serve. An owner's 4xx (401, 403, 404, 406)
  is an answer, relayed, and the owner stays up; a name this instance's egress policy refuses
  is refused before any peer is asked.
* **The last resort.** With ``cluster.ask_all_peers``, every other peer stands behind the
  upstreams, asked only for a copy it holds (``Cache-Control: only-if-cached``, answered 504
  when it has none): a site whose uplink is down loses nothing any live node holds.
* **Marking.** Requests to a peer carry :data:`PEER_HEADER`; one that arrives with it and a valid
  proof of the site's secret (:mod:`proxy.upstream.peer_auth`; without ``cluster.secret_dir``: from
  an address in the peer set) is a peer request. A peer's request for a blob goes on up the
  tree (:meth:`Peering.relay`: to peers ranked above this one, so it never comes back; the
  others only for what they hold, which they never forward); for anything else it is never
  forwarded to another peer. Any other request is a client's, whatever its source address.
* **Private content** (a request with the client's own credentials) never goes to a peer.
* **Membership.** ``cluster.peers`` is a list of ``host:port`` or one ``dns:<name>:<port>``,
  resolved again every ``cluster.refresh`` (a headless Service over the DaemonSet's ready
  pods), as are the secrets. An instance whose ``advertise`` is not in the set is a pure client
  of it (a hub).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace

from proxy.cluster.layers import ImageLayers, Place
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.settings import ClusterSettings
from proxy.upstream.egress import EgressPolicy
from proxy.upstream.peer_auth import PEER_HEADER, PeerAuth
from proxy.upstream.rules import Route, Upstream

__all__ = ["PEER_HEADER", "Peering", "rendezvous"]

log = get_logger("detour.cluster")


def rendezvous(peers: Iterable[str], key: str) -> list[str]:
    """``peers`` from the owner of ``key`` down: highest ``sha256(peer, key)`` first."""

    def score(peer: str) -> bytes:
        return hashlib.sha256(f"{peer}\n{key}".encode()).digest()

    return sorted(peers, key=score, reverse=True)


def blob_key(digest: object) -> str:
    return f"blob {digest}"


def manifest_key(digest: object) -> str:
    return f"manifest {digest}"


def tag_key(name: object, tag: str) -> str:
    return f"tag {name}:{tag}"


def _split(peer: str) -> tuple[str, int]:
    host, _, port = peer.rpartition(":")
    return host.strip("[]"), int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Peering:
    """The peer set, kept current, and the routes that go through it."""

    def __init__(
        self,
        settings: ClusterSettings,
        metrics: Metrics,
        egress: EgressPolicy | None = None,
        auth: PeerAuth | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._egress = egress
        self.auth = auth or PeerAuth(None)
        self.advertise = settings.advertise
        self.peers: tuple[str, ...] = ()
        self._addresses: frozenset[str] = frozenset()  # what peers connect from
        self.layers = ImageLayers()  # each layer's place in its image, for its tree
        if isinstance(settings.peers, list):
            self._set(settings.peers, self._static_addresses(settings.peers))

    @property
    def enabled(self) -> bool:
        return bool(self._settings.peers)

    @property
    def member(self) -> bool:
        """Whether this instance owns a share of the keys (not a pure client of the set)."""
        return self.advertise is not None and self.advertise in self.peers

    @staticmethod
    def _static_addresses(peers: Iterable[str]) -> set[str]:
        found = set()
        for peer in peers:
            host = _split(peer)[0]
            with contextlib.suppress(ValueError):
                found.add(str(ipaddress.ip_address(host)))
        return found

    def _set(self, peers: Iterable[str], addresses: Iterable[str]) -> None:
        ordered = tuple(sorted(set(peers)))
        if ordered != self.peers:
            log.info("peers_changed", peers=list(ordered), size=len(ordered))
        self.peers = ordered
        self._addresses = frozenset(addresses)
        self._metrics.peers.set(len(ordered))
        if self._egress is not None:
            self._egress.set_peers(ordered)

    async def refresh(self) -> None:
        """Resolve the peer set again: the records of a ``dns:`` name, or the addresses of
        static peers given by name. A failed lookup keeps the set as it was. The secrets are
        read again too (a mounted Secret changes in place)."""
        if self.auth.required:
            await asyncio.to_thread(self.auth.load)
        loop = asyncio.get_running_loop()
        spec = self._settings.peers
        if isinstance(spec, str):
            name, _, port_text = spec.removeprefix("dns:").rpartition(":")
            port = int(port_text)
            try:
                infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("peers_not_resolved", name=name, error=str(exc))
                return
            hosts = {str(info[4][0]) for info in infos}
            self._set((_join(host, port) for host in hosts), hosts)
            return
        addresses = self._static_addresses(spec)
        for peer in spec:
            host, port = _split(peer)
            if str(host) in addresses:
                continue
            with contextlib.suppress(OSError):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                addresses.update(str(info[4][0]) for info in infos)
        self._set(spec, addresses)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Keep the peer set current while the app runs."""
        await self.refresh()

        async def follow() -> None:
            while True:
                await asyncio.sleep(self._settings.refresh)
                await self.refresh()

        task = asyncio.create_task(follow(), name="peer set")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def trusted(self, remote: str | None) -> bool:
        """Whether a request marked as a peer's comes from an address in the peer set."""
        return remote is not None and remote in self._addresses

    def from_peer(
        self, method: str, target: str, name: str, proof: str | None, remote: str | None
    ) -> bool:
        """Whether a request marked as peer ``name``'s is one: with ``cluster.secret_dir``, by
        its proof alone; without, by its source address."""
        if self.auth.required:
            return self.auth.check_request(method, target, name, proof, remote)
        return self.trusted(remote)

    def ahead(self, key: str, *, tree: bool = False, place: Place | None = None) -> list[str]:
        """The peers to ask for ``key`` before the upstream, at most ``cluster.peers_tried``,
        all ranked above this instance in rendezvous order (none when it owns the key).

        Without ``tree``: the owner, then its successor (which fetches once for everyone when
        the owner is gone). With ``tree`` (blobs), the ranking is a tree of ``cluster.fan_out``
        children a node: this instance asks its parent first, then the nodes above it up to the
        owner, then the owner's successor; so the owner serves ``fan_out`` nodes, and every
        node at most ``fan_out`` more, however large the site. A layer's ``place`` in its image
        lays the tree over the image's order, turned so that layers take turns at being
        parents (:mod:`proxy.cluster.layers`). A pure client of the set (a hub's client) has
        no place in the tree and asks the owner and its successor."""
        ranked = self.ranked(key, place)
        if self.advertise not in ranked:
            return ranked[: self._settings.peers_tried]
        place_here = ranked.index(self.advertise)
        ahead: list[str] = []
        if tree:
            parent = place_here
            while parent > 0:
                parent = (parent - 1) // self._settings.fan_out
                ahead.append(ranked[parent])
        elif place_here > 0:
            ahead.append(ranked[0])
        if place_here > 1 and ranked[1] not in ahead:
            ahead.append(ranked[1])
        return ahead[: self._settings.peers_tried]

    def ranked(self, key: str, place: Place | None = None) -> list[str]:
        """The peers in ``key``'s rendezvous order; for a layer with a ``place``, the order of
        its image turned by the layer's index times the number of parents in a tree of
        ``cluster.fan_out`` (nodes 0 to ``(n - 2) // fan_out``), so that the parents of one
        layer are leaves in the next few."""
        if place is None:
            return rendezvous(self.peers, key)
        ranked = rendezvous(self.peers, f"image {place.image}")
        if len(ranked) < 2:
            return ranked
        parents = (len(ranked) - 2) // self._settings.fan_out + 1
        turn = place.index * parents % len(ranked)
        return ranked[turn:] + ranked[:turn]

    def owner(self, key: str) -> str | None:
        ranked = rendezvous(self.peers, key)
        return ranked[0] if ranked else None

    def route(
        self,
        route: Route,
        key: str,
        *,
        tree: bool = False,
        place: Place | None = None,
        skip: str = "",
    ) -> Route:
        """``route`` with the peers :meth:`ahead` for ``key`` in front of its upstreams and,
        with ``cluster.ask_all_peers``, every other peer behind them, asked only for a copy
        it holds: the last resort of a site whose uplink is down. The peers ahead are told
        the layer's ``place``, so that they place themselves in the same tree."""
        ahead = [peer for peer in self.ahead(key, tree=tree, place=place) if peer != skip]
        told = place.header() if place is not None else ""
        peers = tuple(self._peer(peer, route, tree=told) for peer in ahead)
        rest: tuple[Upstream, ...] = ()
        if self._settings.ask_all_peers:
            asked = {*ahead, self.advertise, skip}
            others = (peer for peer in rendezvous(self.peers, key) if peer not in asked)
            rest = tuple(self._peer(peer, route, cached_only=True) for peer in others)
        if not peers and not rest:
            return route
        return replace(route, upstreams=peers + route.upstreams + rest)

    def relay(
        self, route: Route, key: str, place: Place | None = None, *, asked_by: str = ""
    ) -> Route:
        """For a peer's request for a blob: ``route`` through the tree as for a client's, laid
        as the asking peer laid it (its ``place``, or none: the blob's digest). The peers ahead
        are ranked above this instance, so a relayed request never comes back; and the peer
        that asked, ``asked_by``, is never asked (two nodes that placed a blob differently
        must not ask each other). The others, behind the upstreams, are asked only for what
        they hold, which never goes further. An instance that is no member of the set goes to
        the upstream alone."""
        if not self.member:
            return route
        return self.route(route, key, tree=True, place=place, skip=asked_by)

    @staticmethod
    def _peer(peer: str, route: Route, *, cached_only: bool = False, tree: str = "") -> Upstream:
        repository = route.name.path_form()
        return Upstream(
            peer, repository, insecure=True, peer=True, cached_only=cached_only, tree=tree
        )
