"""Bearer tokens fetched from a registry's token service (the realm of its challenge).

A token is asked for anonymously or with the registry's credentials, once per (registry,
scope) however many requests met the 401 at the same time: the others wait on the key's lock
and take the token the first one got (:class:`proxy.upstream.auth.TokenCache`). A realm never
goes from https down to http.
"""

from __future__ import annotations

from typing import cast

from yarl import URL

from proxy.errors import UpstreamDenied, UpstreamInvalid
from proxy.metrics import Metrics
from proxy.reference import parse_json
from proxy.upstream.auth import (
    Challenge,
    Credentials,
    Token,
    TokenCache,
    TokenResponse,
    token_from_response,
)
from proxy.upstream.response import UpstreamResponse
from proxy.upstream.rules import Upstream
from proxy.upstream.sender import Sender

MAX_TOKEN_RESPONSE = 1 << 20


class TokenFetcher:
    """Fills a :class:`TokenCache` from the token services, counting what each answered."""

    def __init__(self, sender: Sender, tokens: TokenCache, metrics: Metrics) -> None:
        self._sender = sender
        self._tokens = tokens
        self._metrics = metrics

    async def token(
        self,
        registry: str,
        scope: str,
        challenge: Challenge,
        creds: Credentials | None,
        used: Token | None,
        *,
        secure: bool = False,
    ) -> Token | None:
        """A fresh token for (registry, scope), fetching one unless another request just did.

        None when the token service refused an anonymous request: the challenge goes back to
        the client, which may hold credentials of its own. A challenge met over https
        (``secure``) whose realm is http is refused: neither the credentials nor the token
        ever travel in clear where the registry itself did not.
        """
        async with self._tokens.lock(registry, scope):
            replaced = self._tokens.replaced(registry, scope, used)
            if replaced is not None:
                return replaced
            realm = URL(challenge.params.get("realm", ""))
            if realm.scheme not in ("http", "https") or not realm.host:
                raise UpstreamInvalid(
                    "upstream sent a bearer challenge without a usable realm",
                    {"registry": registry},
                )
            if secure and realm.scheme != "https":
                raise UpstreamInvalid(
                    "the registry, reached over https, sent a token realm over plain http; "
                    "Detour never sends credentials or tokens in clear. Set "
                    f"registries.{registry}.insecure: true only if the registry itself is "
                    "reached over http",
                    {"registry": registry, "realm_scheme": realm.scheme},
                    cause="protocol",
                    reason="token realm downgrades https to http",
                )
            query = {"scope": challenge.params.get("scope") or scope}
            if "service" in challenge.params:
                query["service"] = challenge.params["service"]
            body = await self._ask(registry, realm.update_query(query), creds)
            if body is None:
                return None
            try:
                token = token_from_response(cast(TokenResponse, parse_json(body)))
            except (ValueError, TypeError, AttributeError):
                token = None
            if token is None:
                self._count(registry, "error")
                raise UpstreamInvalid("token service sent no token", {"registry": registry})
            self._count(registry, "issued")
            self._tokens.put(registry, scope, token)
            return token

    async def _ask(self, registry: str, url: URL, creds: Credentials | None) -> bytes | None:
        """The token service's answer to ``url``: its body, or None for an anonymous refusal."""
        auth = creds.basic() if creds is not None else None
        response = await self._sender.send(registry, "GET", url, {}, auth, chosen_by_upstream=True)
        async with UpstreamResponse(Upstream(registry, ""), response, False) as answer:
            if response.status in (401, 403):
                self._count(registry, "refused")
                if creds is None:
                    return None  # anonymous pulls refused: the client may hold credentials
                raise UpstreamDenied(
                    response.status,
                    "the registry's token service refused the configured credentials",
                    {"registry": registry},
                )
            if response.status != 200:
                self._count(registry, "error")
                raise UpstreamInvalid(
                    f"token service answered {response.status}", {"registry": registry}
                )
            return await answer.read(MAX_TOKEN_RESPONSE, "token response")

    def _count(self, registry: str, outcome: str) -> None:
        self._metrics.token_requests.labels(self._metrics.registry_label(registry), outcome).inc()
