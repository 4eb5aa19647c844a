"""The upstream client: one request, tried against a route's mirrors in order, with auth.

For each upstream of a :class:`~proxy.rules.Route`:

1. Send the request, with a cached bearer token, Basic credentials already known to be
   wanted, or (passthrough) the client's own ``Authorization`` when no credentials are
   configured for that registry.
2. On a 401 from the registry: parse ``WWW-Authenticate``; for ``Bearer`` get a token from the
   realm (anonymously or with the registry's credentials; one refresh per key however many
   requests met the 401), for ``Basic`` use the credentials; retry once. A 401 that remains is
   relayed to the client with its challenge, so a client holding credentials can do the dance.
3. Follow redirects (blob GETs often go to object storage) by hand, dropping
   ``Authorization`` whenever the next hop is another origin.
4. A connection error, a timeout, a 5xx or a 429 moves on to the next upstream.

Transport exceptions are translated here into :mod:`proxy.errors` types, at this boundary:
nothing from aiohttp's client reaches the handlers.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from yarl import URL

from proxy import __version__
from proxy.auth import (
    Challenge,
    Credentials,
    CredentialStore,
    Token,
    TokenCache,
    TokenResponse,
    parse_challenges,
    token_from_response,
)
from proxy.errors import (
    DetourError,
    UpstreamDenied,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.metrics import Metrics
from proxy.rules import Route, Upstream
from proxy.settings import UpstreamSettings

USER_AGENT = f"detour/{__version__}"
# After a connection error or timeout, a registry counts as down this long for requests that
# have a cached answer to fall back on (tag revalidation), so an edge site whose uplink is cut
# serves from disk at once instead of waiting out a connect timeout on every tag.
DOWN_SECONDS = 30.0
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_TOKEN_RESPONSE = 1 << 20


@contextmanager
def transport_errors(what: str) -> Iterator[None]:
    """Turn aiohttp client and timeout exceptions into :class:`UpstreamError` types."""
    try:
        yield
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamTimeout(f"timed out talking to {what}", {"upstream": what}) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnreachable(
            f"cannot reach {what}", {"upstream": what, "error": type(exc).__name__}
        ) from exc


@dataclass
class UpstreamResponse:
    """An open response from one upstream. Close it (``async with``) when done."""

    upstream: Upstream
    response: aiohttp.ClientResponse
    private: bool  # fetched with the client's own credentials: never cache
    attempts: list[dict[str, str]] = field(default_factory=list)

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self.response.headers

    @property
    def where(self) -> str:
        return f"{self.upstream.registry}/{self.upstream.repository}"

    async def read(self, limit: int, what: str = "response") -> bytes:
        """The whole body, read to its end (a body over a real link arrives in many reads),
        refusing one longer than ``limit`` without reading more than ``limit + 1`` bytes."""
        length = self.response.content_length
        if length is not None and length > limit:
            raise self._too_large(what, limit)
        body = bytearray()
        with transport_errors(self.where):
            while chunk := await self.response.content.read(limit + 1 - len(body)):
                body += chunk
                if len(body) > limit:
                    raise self._too_large(what, limit)
        if length is not None and len(body) != length:
            raise UpstreamInvalid(
                f"upstream {what} was cut short",
                {"upstream": self.where, "expected": length, "received": len(body)},
            )
        return bytes(body)

    def _too_large(self, what: str, limit: int) -> UpstreamInvalid:
        return UpstreamInvalid(
            f"upstream {what} is larger than Detour's limit of {limit} bytes",
            {"upstream": self.where, "limit": limit},
        )

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        with transport_errors(self.where):
            async for chunk in self.response.content.iter_chunked(size):
                yield chunk

    def refusal(self, not_found: DetourError) -> DetourError:
        """The error for an answer other than the one asked for: ``not_found`` for a 404, the
        upstream's own refusal (and its challenge, for the client to answer) for a 401 or 403,
        and a bad reply for anything else."""
        if self.status == 404:
            return not_found
        if self.status in (401, 403):
            challenge = self.headers.get("WWW-Authenticate")
            return UpstreamDenied(
                self.status,
                "upstream refused access",
                {"upstream": self.where},
                headers={"WWW-Authenticate": challenge} if challenge else None,
            )
        return UpstreamInvalid(f"upstream answered {self.status}", {"upstream": self.where})

    def close(self) -> None:
        self.response.release()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()


def client_timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    """No limit on a whole transfer (blobs are big); limits on connecting and on silence."""
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=read)


def _origin(url: URL) -> tuple[str | None, str | None, int | None]:
    return url.scheme, url.host, url.port


def _retryable(status: int) -> bool:
    return status >= 500 or status == 429


class UpstreamClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: UpstreamSettings,
        credentials: CredentialStore,
        metrics: Metrics,
    ) -> None:
        self._session = session
        self._settings = settings
        self._credentials = credentials
        self._metrics = metrics
        self._tokens = TokenCache()
        self._basic_registries: set[str] = set()
        self._down_until: dict[str, float] = {}
        self._quick_timeout = client_timeout(settings.connect_timeout, settings.connect_timeout)

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
        """
        attempts: list[dict[str, str]] = []
        timed_out = False
        last_status: int | None = None
        for upstream in route.upstreams:
            if fallback and self._down_until.get(upstream.registry, 0.0) > time.monotonic():
                attempts.append({"upstream": upstream.registry, "error": "recently down"})
                continue
            try:
                response, private = await self._exchange(
                    upstream, method, suffix, dict(headers or {}), client_auth, fallback
                )
            except UpstreamTimeout:
                timed_out = True
                self._down_until[upstream.registry] = time.monotonic() + DOWN_SECONDS
                attempts.append({"upstream": upstream.registry, "error": "timeout"})
                continue
            except UpstreamUnreachable:
                self._down_until[upstream.registry] = time.monotonic() + DOWN_SECONDS
                attempts.append({"upstream": upstream.registry, "error": "unreachable"})
                continue
            self._down_until.pop(upstream.registry, None)
            if _retryable(response.status):
                last_status = response.status
                attempts.append({"upstream": upstream.registry, "error": str(response.status)})
                response.release()
                continue
            return UpstreamResponse(upstream, response, private, attempts)
        detail = {"name": str(route.name), "attempts": attempts}
        if last_status == 429 and len(attempts) == 1:
            raise UpstreamDenied(429, "upstream rate limit reached", detail)
        if timed_out and last_status is None:
            raise UpstreamTimeout("every upstream timed out", detail)
        raise UpstreamUnreachable("no upstream could serve the request", detail)

    async def _exchange(
        self,
        upstream: Upstream,
        method: str,
        suffix: str,
        headers: dict[str, str],
        client_auth: str | None,
        quick: bool,
    ) -> tuple[aiohttp.ClientResponse, bool]:
        url = URL(f"{upstream.base_url}/{suffix}", encoded=True)
        limits = self._quick_timeout if quick else None
        scope = f"repository:{upstream.repository}:pull"
        creds = self._credentials.lookup(upstream.registry)
        if creds is None and client_auth is not None:
            # Passthrough: the client's credentials, and the upstream's 401 goes back to it.
            response = await self._send(
                upstream.registry, method, url, headers, client_auth, limits
            )
            return response, True

        used = self._tokens.get(upstream.registry, scope)
        auth: str | None = None
        if used is not None:
            auth = f"Bearer {used.value}"
        elif creds is not None and upstream.registry in self._basic_registries:
            auth = creds.basic()
        response = await self._send(upstream.registry, method, url, headers, auth, limits)
        if response.status != 401 or _origin(response.url) != _origin(url):
            return response, False

        challenges = parse_challenges(",".join(response.headers.getall("WWW-Authenticate", [])))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            token = await self._token(upstream.registry, scope, bearer, creds, used)
            if token is None:
                return response, False  # relay the challenge
            auth = f"Bearer {token.value}"
        elif basic is not None and creds is not None:
            self._basic_registries.add(upstream.registry)
            auth = creds.basic()
        else:
            return response, False
        response.release()
        return await self._send(upstream.registry, method, url, headers, auth, limits), False

    async def _token(
        self,
        registry: str,
        scope: str,
        challenge: Challenge,
        creds: Credentials | None,
        used: Token | None,
    ) -> Token | None:
        """A fresh token for (registry, scope), fetching one unless another request just did."""
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
            query = {"scope": challenge.params.get("scope") or scope}
            if "service" in challenge.params:
                query["service"] = challenge.params["service"]
            auth = creds.basic() if creds is not None else None
            response = await self._send(registry, "GET", realm.update_query(query), {}, auth)
            async with UpstreamResponse(Upstream(registry, ""), response, False) as answer:
                if response.status in (401, 403):
                    outcome = "refused"
                    self._metrics.token_requests.labels(registry, outcome).inc()
                    if creds is None:
                        return None  # anonymous pulls refused: the client may hold credentials
                    raise UpstreamDenied(
                        response.status,
                        "the registry's token service refused the configured credentials",
                        {"registry": registry},
                    )
                if response.status != 200:
                    self._metrics.token_requests.labels(registry, "error").inc()
                    raise UpstreamInvalid(
                        f"token service answered {response.status}", {"registry": registry}
                    )
                body = await answer.read(MAX_TOKEN_RESPONSE, "token response")
            try:
                token = token_from_response(cast(TokenResponse, json.loads(body)))
            except (ValueError, TypeError, AttributeError):
                token = None
            if token is None:
                self._metrics.token_requests.labels(registry, "error").inc()
                raise UpstreamInvalid("token service sent no token", {"registry": registry})
            self._metrics.token_requests.labels(registry, "issued").inc()
            self._tokens.put(registry, scope, token)
            return token

    async def _send(
        self,
        registry: str,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        auth: str | None,
        limits: aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        """One request, following redirects; ``auth`` never leaves the first origin."""
        first_origin = _origin(url)
        for _ in range(self._settings.max_redirects + 1):
            sent: dict[str, Any] = {
                "User-Agent": USER_AGENT,
                "Accept-Encoding": "identity",
                **headers,
            }
            if auth is not None and _origin(url) == first_origin:
                sent["Authorization"] = auth
            started = time.monotonic()
            try:
                with transport_errors(registry):
                    response = await self._session.request(
                        method,
                        url,
                        headers=sent,
                        allow_redirects=False,
                        timeout=limits or self._session.timeout,
                    )
            except UpstreamError as exc:
                status = "timeout" if isinstance(exc, UpstreamTimeout) else "error"
                self._metrics.upstream_requests.labels(registry, status).inc()
                raise
            self._metrics.upstream_latency.labels(registry).observe(time.monotonic() - started)
            self._metrics.upstream_requests.labels(registry, str(response.status)).inc()
            location = response.headers.get("Location")
            if response.status not in REDIRECT_STATUSES or not location:
                return response
            response.release()
            url = url.join(URL(location))
            if response.status == 303:
                method = "GET"
        raise UpstreamInvalid("too many redirects", {"registry": registry})
