"""One request to one upstream, with the auth that upstream wants.

A registry is sent a cached bearer token, Basic credentials already known to be wanted, or
(passthrough) the client's own ``Authorization`` when no credentials are configured for it. Its
401 is answered once: ``Bearer`` with a token from the challenge's realm (one refresh per key
however many requests met the 401: :mod:`proxy.upstream.tokens`), ``Basic`` with the
credentials; a 401 that remains is relayed, so a client holding credentials can do the dance.

A peer is never sent credentials, so private content stays off the peers: it is sent this
instance's peer mark and, with ``cluster.secret_dir``, the request's proof
(:mod:`proxy.upstream.peer_auth`), under the LAN's timeouts. This is the request alone; which
upstream is asked, and what its answer means, is :mod:`proxy.upstream.failover`'s.
"""

from __future__ import annotations

import aiohttp
from yarl import URL

from proxy.metrics import Metrics
from proxy.settings import ClusterSettings, UpstreamSettings
from proxy.upstream.auth import Credentials, CredentialStore, Token, TokenCache, parse_challenges
from proxy.upstream.connections import client_timeout
from proxy.upstream.peer_auth import PEER_HEADER, PROOF_HEADER, TREE_HEADER, PeerAuth
from proxy.upstream.rules import Upstream
from proxy.upstream.sender import Sender, origin
from proxy.upstream.tokens import TokenFetcher


class Exchange:
    """Sends a request to one upstream with its auth (see the module)."""

    def __init__(
        self,
        sender: Sender,
        credentials: CredentialStore,
        metrics: Metrics,
        peer_auth: PeerAuth,
        peer_name: str,
        settings: UpstreamSettings,
        cluster: ClusterSettings,
    ) -> None:
        self._sender = sender
        self._credentials = credentials
        self._peer_auth = peer_auth
        self._peer_name = peer_name
        self._tokens = TokenCache()
        self._fetcher = TokenFetcher(sender, self._tokens, metrics)
        self._basic_registries: set[str] = set()
        self._quick_timeout = client_timeout(settings.connect_timeout, settings.connect_timeout)
        self._quick_peer_timeout = client_timeout(cluster.connect_timeout, settings.connect_timeout)
        # A peer asked only for a copy it holds answers at once, or not at all: it is not
        # waited on as one fetching for this instance is (it may be waiting on this instance).
        self._held_copy_timeout = client_timeout(cluster.connect_timeout, cluster.read_timeout)

    async def send(
        self,
        upstream: Upstream,
        method: str,
        suffix: str,
        headers: dict[str, str],
        client_auth: str | None,
        quick: bool,
    ) -> tuple[aiohttp.ClientResponse, bool]:
        """The request to one upstream, with its auth: the response, and whether it was
        fetched with the client's own credentials. A peer's marks are added to ``headers``."""
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
