"""The upstream client: one request, tried against a route's mirrors in order, with auth.

For each upstream of a :class:`~proxy.upstream.rules.Route`:

1. Send the request, with a cached bearer token, Basic credentials already known to be
   wanted, or (passthrough) the client's own ``Authorization`` when no credentials are
   configured for that registry.
2. On a 401 from the registry: parse ``WWW-Authenticate``; for ``Bearer`` get a token from the
   realm (anonymously or with the registry's credentials; one refresh per key however many
   requests met the 401: :mod:`proxy.upstream.tokens`), for ``Basic`` use the credentials; retry
   once. A 401 that remains is relayed to the client with its challenge, so a client holding
   credentials can do the dance.
3. Follow redirects (blob GETs often go to object storage) by hand, dropping
   ``Authorization`` whenever the next hop is another origin (:mod:`proxy.upstream.sender`).
4. A connection error, a timeout, a 5xx or a 429 moves on to the next upstream. A peer's 4xx
   (401, 403, 404, 406, ...) is an answer like a registry's: relayed, and the peer stays up.
   A peer is on the LAN, so its timeouts are ``cluster.connect_timeout`` and, for silence,
   :mod:`proxy.upstream.liveness`' probe after ``cluster.read_timeout``; one that failed is skipped
   for ``cluster.down_seconds``.

What failed, and the one word (``cause``) that says so for each upstream tried, is
:mod:`proxy.upstream.transport`'s vocabulary; the TLS of each registry is
:mod:`proxy.upstream.connections`'. The names the rest of the proxy uses are all importable from
here.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping

import aiohttp
from yarl import URL

from proxy.errors import UpstreamInvalid, UpstreamTimeout, UpstreamUnreachable
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.settings import ClusterSettings, UpstreamSettings
from proxy.upstream.auth import Credentials, CredentialStore, Token, TokenCache, parse_challenges
from proxy.upstream.connections import TLS, client_timeout
from proxy.upstream.direct_body import TAKE_OVER_RATE, BlockPool, DirectReads
from proxy.upstream.egress import AddressRefused, EgressPolicy, GuardedResolver
from proxy.upstream.liveness import PeerWatch, peer_patience
from proxy.upstream.peer_auth import PEER_HEADER, PROOF_HEADER, TREE_HEADER, PeerAuth
from proxy.upstream.peer_checks import Lie, PeerLied, checked_manifest, is_tag, manifest_digest
from proxy.upstream.response import UpstreamResponse
from proxy.upstream.rules import Route, Upstream
from proxy.upstream.sender import Sender, origin, refused_error
from proxy.upstream.tokens import TokenFetcher
from proxy.upstream.transport import Attempts

log = get_logger("detour.upstream")

# After a connection error or timeout, a registry counts as down this long for requests that
# have a cached answer to fall back on (tag revalidation), so an edge site whose uplink is cut
# serves from disk at once instead of waiting out a connect timeout on every tag. (A peer: for
# cluster.down_seconds, for every request.)
DOWN_SECONDS = 30.0


def _retryable(status: int) -> bool:
    return status >= 500 or status == 429


class UpstreamClient:
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
        self._peer_name = peer_name
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
        self._credentials = credentials
        self._metrics = metrics
        self._tokens = TokenCache()
        self._fetcher = TokenFetcher(self._sender, self._tokens, metrics)
        self._basic_registries: set[str] = set()
        self._down_until: dict[str, float] = {}
        self._peer_down = cluster.down_seconds
        self._quick_timeout = client_timeout(settings.connect_timeout, settings.connect_timeout)
        self._quick_peer_timeout = client_timeout(cluster.connect_timeout, settings.connect_timeout)
        # A peer asked only for a copy it holds answers at once, or not at all: it is not
        # waited on as one fetching for this instance is (it may be waiting on this instance).
        self._held_copy_timeout = client_timeout(cluster.connect_timeout, cluster.read_timeout)
        # For the blob bodies read by Detour itself (proxy.upstream.direct_body).
        self.direct = DirectReads(
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
        last :data:`DOWN_SECONDS` are not tried, and a silent one is given up on after
        ``connect_timeout`` rather than ``read_timeout``.

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
            answer = await self._try(
                upstream, tried, method, suffix, dict(headers or {}), client_auth, fallback
            )
            if answer is not None:
                response, private, body = answer
                watch = self.peers if upstream.peer else None
                return UpstreamResponse(upstream, response, private, self.direct, body, watch)
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
        self._down_until[upstream.registry] = time.monotonic() + self._down_seconds(upstream)

    def _down_seconds(self, upstream: Upstream) -> float:
        return self._peer_down if upstream.peer else DOWN_SECONDS

    def down_among(self, names: Iterable[str]) -> int:
        """How many of ``names`` (the peers) are taken as down now (see :meth:`mark_down`)."""
        now = time.monotonic()
        return sum(1 for name in names if self._down_until.get(name, 0.0) > now)

    def distrust(self, upstream: Upstream, reason: Lie, words: str) -> None:
        """A peer sent what no Detour of the site sends (:mod:`proxy.upstream.peer_checks`):
        marked down at once, counted and logged."""
        self.mark_down(upstream)
        self._metrics.peers_bypassed.labels(reason).inc()
        log.warning("peer_bypassed", peer=upstream.registry, reason=reason, error=words)

    async def _try(
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
        down = self._down_until.get(registry, 0.0) > time.monotonic()
        if down and (fallback or upstream.peer):  # a peer that failed lately: skipped
            tried.skipped(registry, self._down_seconds(upstream))
            self._count_peer(upstream, "skipped")
            return None
        try:
            response, private = await self._exchange(
                upstream, method, suffix, headers, client_auth, fallback
            )
        except (UpstreamTimeout, UpstreamUnreachable) as exc:
            if not (upstream.cached_only and isinstance(exc, UpstreamTimeout)):
                self.mark_down(upstream)  # (one asked for a copy it holds and slow: not down)
            tried.failed(registry, exc)
            self._count_peer(upstream, "failed")
            return None
        except UpstreamInvalid as exc:
            if not upstream.peer:
                raise
            self.distrust(upstream, "redirect", exc.reason)  # no Detour answers one
            tried.failed(registry, exc)
            self._count_peer(upstream, "failed")
            return None
        self._down_until.pop(registry, None)
        if upstream.cached_only and response.status not in (200, 206):
            # Asked only for a copy it holds: anything else (its 504, or the 403 of a peer this
            # very request has already passed through) is no answer for the client. Not down.
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
                self.distrust(upstream, lie.reason, lie.words)
                error = UpstreamInvalid(
                    f"{registry} {lie.words}", cause="protocol", reason=lie.words
                )
                tried.failed(registry, error)
                self._count_peer(upstream, "failed")
                return None
            except (UpstreamTimeout, UpstreamUnreachable) as exc:
                response.release()
                self.mark_down(upstream)
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
            return await self.peers.patiently(upstream.registry, checked)
        if self._peer_auth.required and is_tag(suffix):
            proof = sent.get(PROOF_HEADER)
            if not self._peer_auth.check_answer(proof, response.status, response.headers):
                raise PeerLied("unproven_tag", "answered a tag without proof of the site's secret")
        return None

    def _count_peer(self, upstream: Upstream, result: str) -> None:
        if upstream.peer:
            self._metrics.peer_requests.labels(result).inc()

    async def _exchange(
        self,
        upstream: Upstream,
        method: str,
        suffix: str,
        headers: dict[str, str],
        client_auth: str | None,
        quick: bool,
    ) -> tuple[aiohttp.ClientResponse, bool]:
        """The request to one upstream, with its auth: the response, and whether it was
        fetched with the client's own credentials."""
        url = URL(f"{upstream.base_url}/{suffix}", encoded=True)
        limits = None
        if quick:
            limits = self._quick_peer_timeout if upstream.peer else self._quick_timeout
        registry = upstream.registry
        if upstream.peer:  # never with credentials: private content stays off the peers
            headers[PEER_HEADER] = self._peer_name
            if upstream.cached_only:
                headers["Cache-Control"] = "only-if-cached"
            if upstream.tree:
                headers[TREE_HEADER] = upstream.tree
            proof = self._peer_auth.sign_request(method, url.raw_path_qs, self._peer_name)
            if proof is not None:
                headers[PROOF_HEADER] = proof
            if upstream.cached_only:
                limits = self._held_copy_timeout
            response = await self._sender.send(
                registry,
                method,
                url,
                headers,
                None,
                limits,
                peer=True,
                patient=not upstream.cached_only,
            )
            return response, False
        scope = f"repository:{upstream.repository}:pull"
        creds = self._credentials.lookup(registry)
        if creds is None and client_auth is not None:
            # Passthrough: the client's credentials, and the upstream's 401 goes back to it.
            response = await self._sender.send(registry, method, url, headers, client_auth, limits)
            return response, True

        used = self._tokens.get(registry, scope)
        auth: str | None = None
        if used is not None:
            auth = f"Bearer {used.value}"
        elif creds is not None and registry in self._basic_registries:
            auth = creds.basic()
        response = await self._sender.send(registry, method, url, headers, auth, limits)
        if response.status != 401 or origin(response.url) != origin(url):
            return response, False
        auth = await self._answer(registry, scope, response, creds, used)
        if auth is None:
            return response, False  # relay the challenge
        response.release()
        return await self._sender.send(registry, method, url, headers, auth, limits), False

    async def _answer(
        self,
        registry: str,
        scope: str,
        unauthorized: aiohttp.ClientResponse,
        creds: Credentials | None,
        used: Token | None,
    ) -> str | None:
        """The ``Authorization`` that answers a 401's challenge, or None to relay it."""
        header = ",".join(unauthorized.headers.getall("WWW-Authenticate", []))
        challenges = parse_challenges(header)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            secure = unauthorized.url.scheme == "https"
            token = await self._fetcher.token(registry, scope, bearer, creds, used, secure=secure)
            return None if token is None else f"Bearer {token.value}"
        if basic is not None and creds is not None:
            self._basic_registries.add(registry)
            return creds.basic()
        return None
