"""The upstream client: one request, tried against a route's mirrors in order, with auth.

For each upstream of a :class:`~proxy.upstream.rules.Route`, in order:

1. Send the request with the auth it wants, and answer a registry's 401 once
   (:mod:`proxy.upstream.exchange`, with tokens from :mod:`proxy.upstream.tokens`). A 401 that
   remains is relayed to the client with its challenge, so a client holding credentials can do
   the dance.
2. Follow redirects (blob GETs often go to object storage) by hand, dropping
   ``Authorization`` whenever the next hop is another origin (:mod:`proxy.upstream.sender`).
3. A connection error, a timeout, a 5xx or a 429 moves on to the next upstream
   (:mod:`proxy.upstream.failover`). A peer's 4xx (401, 403, 404, 406, ...) is an answer like a
   registry's: relayed, and the peer stays up. A peer is on the LAN, so its timeouts are
   ``cluster.connect_timeout`` and, for silence, :mod:`proxy.upstream.liveness`' probe after
   ``cluster.read_timeout``; one that failed is skipped for ``cluster.down_seconds``.

What failed, and the one word (``cause``) that says so for each upstream tried, is
:mod:`proxy.upstream.transport`'s vocabulary; the TLS of each registry is
:mod:`proxy.upstream.connections`'. The names the rest of the proxy uses are all importable from
here.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

import aiohttp
from yarl import URL

from proxy.metrics import Metrics
from proxy.settings import ClusterSettings, UpstreamSettings
from proxy.upstream.auth import CredentialStore
from proxy.upstream.connections import TLS
from proxy.upstream.egress import AddressRefused, EgressPolicy, GuardedResolver
from proxy.upstream.exchange import Exchange
from proxy.upstream.failover import Downtime, Failover
from proxy.upstream.liveness import PeerWatch, peer_patience
from proxy.upstream.peer_auth import PEER_HEADER, PeerAuth
from proxy.upstream.peer_checks import Lie, is_tag
from proxy.upstream.response import UpstreamResponse
from proxy.upstream.rules import Route, Upstream
from proxy.upstream.sender import Sender, refused_error
from proxy.upstream.socket_body import TAKE_OVER_RATE, BlockPool, SocketReads
from proxy.upstream.transport import Attempts


class UpstreamClient:
    """The way out, as the rest of the proxy sees it: :meth:`open` a request on a route, and
    the peers' standing (:meth:`mark_down`, :meth:`distrust`, :meth:`down_among`). Each
    upstream is tried by :class:`~proxy.upstream.failover.Failover`; this class wires the
    parts together and holds what every request shares (the Via pseudonym, the peer watch)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: UpstreamSettings,
        credentials: CredentialStore,
        metrics: Metrics,
        tls: Mapping[tuple[str, int], TLS] | None = None,
        egress: EgressPolicy | None = None,
        *,
        peer_session: aiohttp.ClientSession | None = None,
        peer_name: str = "client",
        take_over_rate: float = TAKE_OVER_RATE,
        resolver: GuardedResolver | None = None,
        peer_auth: PeerAuth | None = None,
        cluster: ClusterSettings | None = None,
        probe_session: aiohttp.ClientSession | None = None,
    ) -> None:
        cluster = cluster or ClusterSettings()
        self._peer_auth = peer_auth or PeerAuth(None)
        self._resolver = resolver
        self._egress = egress or EgressPolicy(())
        # This instance's name in the Via header of what it sends: a request that comes back
        # with it has looped (a redirect, or a mirror pointed back at this proxy).
        self.pseudonym = f"detour-{secrets.token_hex(6)}"
        self.via = f"1.1 {self.pseudonym}"
        # A silent peer is probed, and waited on only while it answers (proxy.upstream.liveness).
        self.peers = PeerWatch(
            probe_session,
            self._egress,
            metrics,
            probe_after=cluster.read_timeout,
            longest=peer_patience(settings),
            headers={PEER_HEADER: peer_name, "Via": self.via},
        )
        # Requests to the site's other Detours (proxy.cluster.peering): their own connections, from
        # this instance's advertised address, which is how a peer knows a peer.
        self._sender = Sender(
            session,
            peer_session or session,
            metrics,
            self._egress,
            dict(tls or {}),
            via=self.via,
            max_redirects=settings.max_redirects,
            peers=self.peers,
        )
        self._downtime = Downtime(metrics, cluster.down_seconds)
        exchange = Exchange(
            self._sender, credentials, metrics, self._peer_auth, peer_name, settings, cluster
        )
        self._failover = Failover(
            exchange, self._downtime, self._egress, self.peers, self._peer_auth, metrics
        )
        # For the blob bodies read by Detour itself (proxy.upstream.socket_body).
        self.socket_reads = SocketReads(
            BlockPool(),
            settings.read_timeout,
            take_over_rate,
            peer_read_timeout=cluster.read_timeout,
        )

    async def open(
        self,
        route: Route,
        method: str,
        suffix: str,
        *,
        headers: Mapping[str, str] | None = None,
        client_auth: str | None = None,
        fallback: bool = False,
    ) -> UpstreamResponse:
        """Send ``method`` for ``<repository>/<suffix>`` to the first upstream that answers.

        Returns the first response that is neither a 5xx nor a 429 (the caller judges 2xx,
        3xx and 4xx); raises when every upstream failed. ``fallback`` is for callers with a
        cached answer to fall back on: registries that failed to connect or timed out in the
        last :data:`~proxy.upstream.failover.DOWN_SECONDS` are not tried, and a silent one is
        given up on after ``connect_timeout`` rather than ``read_timeout``.

        Each failed attempt is logged once, as a warning; the error raised lists them all in
        its detail, and, when there was one upstream, says in its message what failed.
        """
        tried = Attempts(str(route.name))
        for upstream in route.upstreams:
            if upstream.origin:
                self._egress.check_registry(upstream.registry)
        upstreams = route.upstreams
        if fallback:  # an answer of its own to fall back on: no other peer's copy is wanted
            upstreams = tuple(u for u in upstreams if not u.cached_only)
        if upstreams and upstreams[0].peer:
            await self._check_addresses(route)
            if self._peer_auth.required and not self._peer_auth.signing and is_tag(suffix):
                # No secret to ask with, so no tag answer could be taken: not asked at all.
                upstreams = tuple(u for u in upstreams if not u.peer)
        for upstream in upstreams:
            answer = await self._failover.ask(
                upstream, tried, method, suffix, dict(headers or {}), client_auth, fallback
            )
            if answer is not None:
                response, private, body = answer
                watch = self.peers if upstream.peer else None
                return UpstreamResponse(upstream, response, private, self.socket_reads, body, watch)
        raise tried.error()

    async def _check_addresses(self, route: Route) -> None:
        """Before a peer is asked on a route's behalf: the egress policy's address check of
        its registries, here, so a name this instance refuses never reaches a peer (which
        would refuse it too, or, configured otherwise, fetch it). Refused when every registry
        of the route is."""
        if self._resolver is None:
            return
        refusal: AddressRefused | None = None
        for upstream in route.upstreams:
            if upstream.peer:
                continue
            if self._egress.named_registry(upstream.registry):
                return
            url = URL(upstream.base_url)
            try:
                await self._resolver.check(url.raw_host or "", url.port or 443)
            except AddressRefused as exc:
                refusal = refusal or exc
                continue
            return
        if refusal is not None:
            registry = next(u.registry for u in route.upstreams if not u.peer)
            raise refused_error(registry, refusal, first=True)

    def mark_down(self, upstream: Upstream) -> None:
        """``upstream`` failed: skipped for a while by requests that can do without it (all
        requests, for a peer; those with a cached answer to fall back on, for a registry)."""
        self._downtime.mark(upstream)

    def down_among(self, names: Iterable[str]) -> int:
        """How many of ``names`` (the peers) are taken as down now (see :meth:`mark_down`)."""
        return self._downtime.among(names)

    def distrust(self, upstream: Upstream, reason: Lie, words: str) -> None:
        """A peer sent what no Detour of the site sends (:mod:`proxy.upstream.peer_checks`):
        marked down at once, counted and logged."""
        self._downtime.distrust(upstream, reason, words)
