"""One upstream of a route tried, and which upstreams are down: the client's failover.

A connection error, a timeout, a 5xx or a 429 moves on to the next upstream. A peer's 4xx (401,
403, 404, 406, ...) is an answer like a registry's: relayed, and the peer stays up. A peer's 200
is checked before it is taken (:mod:`proxy.upstream.peer_checks`); one that lies is distrusted:
marked down at once, counted and logged.

An upstream that failed to connect or timed out is marked down (:class:`Downtime`): a peer is
skipped by every request for ``cluster.down_seconds``, a registry for :data:`DOWN_SECONDS` by
the requests that have a cached answer to fall back on. Each peer asked is counted by result in
``detour_peer_requests_total``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import aiohttp

from proxy.errors import UpstreamInvalid, UpstreamTimeout, UpstreamUnreachable
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.upstream.egress import EgressPolicy
from proxy.upstream.exchange import Exchange
from proxy.upstream.liveness import PeerWatch
from proxy.upstream.peer_auth import LOOP_HEADER, PROOF_HEADER, PeerAuth
from proxy.upstream.peer_checks import Lie, PeerLied, checked_manifest, is_tag, manifest_digest
from proxy.upstream.rules import Upstream
from proxy.upstream.transport import Attempts

log = get_logger("detour.upstream")

# After a connection error or timeout, a registry counts as down this long for requests that
# have a cached answer to fall back on (tag revalidation), so an edge site whose uplink is cut
# serves from disk at once instead of waiting out a connect timeout on every tag. (A peer: for
# cluster.down_seconds, for every request.)
DOWN_SECONDS = 30.0


def _retryable(status: int) -> bool:
    return status >= 500 or status == 429


class Downtime:
    """The upstreams that failed lately, by registry, and until when each counts as down."""

    def __init__(self, metrics: Metrics, peer_down: float) -> None:
        self._metrics = metrics
        self._peer_down = peer_down  # cluster.down_seconds
        self._down_until: dict[str, float] = {}

    def mark(self, upstream: Upstream) -> None:
        """``upstream`` failed: skipped for a while by requests that can do without it (all
        requests, for a peer; those with a cached answer to fall back on, for a registry)."""
        self._down_until[upstream.registry] = time.monotonic() + self.seconds(upstream)

    def clear(self, upstream: Upstream) -> None:
        """``upstream`` answered: up again."""
        self._down_until.pop(upstream.registry, None)

    def seconds(self, upstream: Upstream) -> float:
        """How long ``upstream`` counts as down once it failed."""
        return self._peer_down if upstream.peer else DOWN_SECONDS

    def is_down(self, upstream: Upstream) -> bool:
        return self._down_until.get(upstream.registry, 0.0) > time.monotonic()

    def among(self, names: Iterable[str]) -> int:
        """How many of ``names`` (the peers) are taken as down now."""
        now = time.monotonic()
        return sum(1 for name in names if self._down_until.get(name, 0.0) > now)

    def distrust(self, upstream: Upstream, reason: Lie, words: str) -> None:
        """A peer sent what no Detour of the site sends (:mod:`proxy.upstream.peer_checks`):
        marked down at once, counted and logged."""
        self.mark(upstream)
        self._metrics.peers_bypassed.labels(reason).inc()
        log.warning("peer_bypassed", peer=upstream.registry, reason=reason, error=words)


class Failover:
    """Tries one upstream of a route, and judges whether its answer is the one to relay."""

    def __init__(
        self,
        exchange: Exchange,
        downtime: Downtime,
        egress: EgressPolicy,
        peers: PeerWatch,
        peer_auth: PeerAuth,
        metrics: Metrics,
    ) -> None:
        self._exchange = exchange
        self._downtime = downtime
        self._egress = egress
        self._peers = peers
        self._peer_auth = peer_auth
        self._metrics = metrics

    async def ask(
        self,
        upstream: Upstream,
        tried: Attempts,
        method: str,
        suffix: str,
        headers: dict[str, str],
        client_auth: str | None,
        fallback: bool,
    ) -> tuple[aiohttp.ClientResponse, bool, bytes | None] | None:
        """One upstream's answer, whether it is private, and its body if it was read here (a
        peer's manifest by digest, verified), or None (what failed is in ``tried``) when the
        next upstream is to be tried."""
        registry = upstream.registry
        down = self._downtime.is_down(upstream)
        if down and (fallback or upstream.peer):  # a peer that failed lately: skipped
            tried.skipped(registry, self._downtime.seconds(upstream))
            self._count_peer(upstream, "skipped")
            return None
        try:
            response, private = await self._exchange.send(
                upstream, method, suffix, headers, client_auth, fallback
            )
        except (UpstreamTimeout, UpstreamUnreachable) as exc:
            if not (upstream.cached_only and isinstance(exc, UpstreamTimeout)):
                self._downtime.mark(upstream)  # (one asked for a copy it holds and slow: not down)
            tried.failed(registry, exc)
            self._count_peer(upstream, "failed")
            return None
        except UpstreamInvalid as exc:
            if not upstream.peer:
                raise
            self._downtime.distrust(upstream, "redirect", exc.reason)  # no Detour answers one
            tried.failed(registry, exc)
            self._count_peer(upstream, "failed")
            return None
        self._downtime.clear(upstream)
        held_only = upstream.cached_only and response.status not in (200, 206)
        if held_only or (upstream.peer and LOOP_HEADER in response.headers):
            # Asked only for a copy it holds: anything else (its 504, or the 403 of a peer this
            # very request has already passed through) is no answer for the client; nor is a
            # loop's 403 from any peer (two nodes that placed a blob in different trees). Not
            # down: the next source is asked.
            tried.refused_by_peer(registry, response.status)
            self._count_peer(upstream, "not_held")
            response.release()
            return None
        if _retryable(response.status):
            self._count_peer(upstream, "failed")
            named = self._egress.named_registry(registry)
            tried.overloaded(registry, response.status, response.reason, named=named)
            response.release()
            return None
        body = None
        if upstream.peer and response.status == 200:
            try:
                body = await self._checked(upstream, method, suffix, headers, response)
            except PeerLied as lie:
                response.release()
                self._downtime.distrust(upstream, lie.reason, lie.words)
                error = UpstreamInvalid(
                    f"{registry} {lie.words}", cause="protocol", reason=lie.words
                )
                tried.failed(registry, error)
                self._count_peer(upstream, "failed")
                return None
            except (UpstreamTimeout, UpstreamUnreachable) as exc:
                response.release()
                self._downtime.mark(upstream)
                tried.failed(registry, exc)
                self._count_peer(upstream, "failed")
                return None
        self._count_peer(upstream, "served")
        return response, private, body

    async def _checked(
        self,
        upstream: Upstream,
        method: str,
        suffix: str,
        sent: Mapping[str, str],
        response: aiohttp.ClientResponse,
    ) -> bytes | None:
        """A peer's 200, checked (:mod:`proxy.upstream.peer_checks`): a manifest by digest read
        and verified (its body returned); a tag's answer proven, with ``cluster.secret_dir``;
        anything else as it is (None)."""
        digest = manifest_digest(method, suffix)
        if digest is not None:
            checked = checked_manifest(upstream.registry, digest, response)
            return await self._peers.patiently(upstream.registry, checked)
        if self._peer_auth.required and is_tag(suffix):
            proof = sent.get(PROOF_HEADER)
            if not self._peer_auth.check_answer(proof, response.status, response.headers):
                raise PeerLied("unproven_tag", "answered a tag without proof of the site's secret")
        return None

    def _count_peer(self, upstream: Upstream, result: str) -> None:
        if upstream.peer:
            self._metrics.peer_requests.labels(result).inc()
