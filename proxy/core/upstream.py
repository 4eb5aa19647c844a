"""The upstream client: one request, tried against a route's mirrors in order, with auth.

For each upstream of a :class:`~proxy.core.rules.Route`:

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
nothing from aiohttp's client reaches the handlers. Each carries a ``cause``, one word that says
what failed; every upstream tried is listed in the error's detail with its cause, and each
failed attempt is logged once, as a warning (``upstream_attempt_failed``)::

    dns           the host name does not resolve
    refused       nothing listens on the port
    tls           TLS handshake failed: untrusted certificate, wrong host name, not TLS at all
    connect       any other failure to connect (no route to host, network unreachable)
    timeout       no connection within connect_timeout, or silence longer than read_timeout
    disconnected  the connection dropped before the answer was complete
    protocol      the answer was not HTTP that aiohttp could read
    http          the upstream answered 5xx or 429 (the entry has its ``status``)
    down          not tried: it failed less than DOWN_SECONDS ago (only with ``fallback``)

TLS is per host: ``registries.<host>.ca_file`` adds a PEM bundle to the system's trust store
for that registry's API host, ``tls_verify: false`` turns verification off for it. A redirect to
another host (object storage) or a token realm on another host is verified as usual, unless
that host has a ``registries`` entry of its own.
"""

from __future__ import annotations

import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict, cast

import aiohttp
from yarl import URL

from proxy import __version__
from proxy.bodies import read_capped
from proxy.core.auth import (
    Challenge,
    Credentials,
    CredentialStore,
    Token,
    TokenCache,
    TokenResponse,
    parse_challenges,
    token_from_response,
)
from proxy.core.egress import AddressRefused, EgressPolicy
from proxy.core.rules import Route, Upstream
from proxy.errors import (
    DetourError,
    RegistryDenied,
    UpstreamDenied,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.reference import api_host, parse_json
from proxy.settings import ConfigError, RegistrySettings, UpstreamSettings

log = get_logger("detour.upstream")

USER_AGENT = f"detour/{__version__}"
# Marks a request from one of the site's Detours to another (see proxy.cluster.peering).
PEER_HEADER = "X-Detour-Peer"
# The Via header of the client request being served, if any: what this proxy sends upstream
# carries it on, with its own entry added, so a loop through Detours is seen wherever it closes.
INCOMING_VIA: ContextVar[str | None] = ContextVar("incoming_via", default=None)
# After a connection error or timeout, a registry counts as down this long for requests that
# have a cached answer to fall back on (tag revalidation), so an edge site whose uplink is cut
# serves from disk at once instead of waiting out a connect timeout on every tag.
DOWN_SECONDS = 30.0
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_TOKEN_RESPONSE = 1 << 20

Cause = Literal[
    "dns", "refused", "tls", "connect", "timeout", "disconnected", "protocol", "http", "down"
]
# What aiohttp's per-request ``ssl`` takes: a context, or False for no verification.
TLS = ssl.SSLContext | Literal[False]
# OpenSSL's "[SSL: CODE] " before its words and " (_ssl.c:1006)" after them.
_SSL_NOISE = re.compile(r"^\[[A-Za-z0-9_]+: [A-Za-z0-9_]+\]\s*|\s*\(_ssl\.c:\d+\)$")


class Attempt(TypedDict):
    """One upstream tried, in the ``attempts`` of an error's detail."""

    upstream: str  # the registry, as in settings' ``registries`` keys
    cause: Cause
    error: str  # what failed, in words: "certificate verify failed: unable to get ..."
    host: NotRequired[str]  # where, when not the registry itself: a redirect, a token realm
    status: NotRequired[int]  # cause "http": the upstream's status


def _tls_words(error: OSError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    text = str(error.strerror or error)
    return _SSL_NOISE.sub("", text) or type(error).__name__


def _os_words(error: OSError) -> str:
    return str(error.strerror or error) or type(error).__name__


def _explain(exc: Exception) -> tuple[Cause, str]:
    """The cause of a transport exception, and what failed in words. Never the URL: a signed
    object-storage URL carries credentials in its query."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "timeout", "timed out connecting"
    if isinstance(exc, TimeoutError):  # aiohttp's SocketTimeoutError too
        return "timeout", "timed out waiting for data"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns", _os_words(exc.os_error)
    if isinstance(exc, aiohttp.ClientSSLError):
        return "tls", _tls_words(exc.os_error)
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "refused", "connection refused"
        return "connect", _os_words(exc.os_error)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected", "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "disconnected", "the response body was cut short"
    if isinstance(exc, aiohttp.ClientOSError):
        return "disconnected", _os_words(exc)
    if isinstance(exc, aiohttp.ClientResponseError):
        return "protocol", f"invalid HTTP response: {exc.message[:200]}"
    if isinstance(exc, aiohttp.InvalidURL):
        return "protocol", "invalid URL"
    return "protocol", type(exc).__name__


_MESSAGES: dict[Cause, str] = {
    "dns": "cannot resolve {host}: {error}",
    "refused": "{host} refused the connection",
    "tls": "TLS handshake with {host} failed: {error}",
    "connect": "cannot connect to {host}: {error}",
    "timeout": "{host} {error}",
    "disconnected": "{host} dropped the connection: {error}",
    "protocol": "bad reply from {host}: {error}",
}


@contextmanager
def transport_errors(what: str, host: str | None = None) -> Iterator[None]:
    """Turn aiohttp client and timeout exceptions into :class:`UpstreamError` types.

    ``what`` is the upstream (a registry, or registry/repository) and ``host`` the host actually
    contacted, when it is not the upstream's own.
    """
    try:
        yield
    except (TimeoutError, aiohttp.ClientError) as exc:
        refused = getattr(exc, "os_error", None)
        if isinstance(refused, AddressRefused):
            raise refused from None  # the egress policy said no: see UpstreamClient._send
        cause, error = _explain(exc)
        detail: dict[str, str] = {"upstream": what, "cause": cause, "error": error}
        if host is not None:
            detail["host"] = host
        message = _MESSAGES.get(cause, "{host}: {error}").format(host=host or what, error=error)
        kind = UpstreamTimeout if cause == "timeout" else UpstreamUnreachable
        raise kind(message, detail, cause=cause, reason=error) from exc


def _host_key(url: URL) -> tuple[str, int]:
    """(host, port) with the scheme's default port filled in."""
    return url.host or "", url.port or 0


def _api_key(registry: str, scheme: str = "https") -> tuple[str, int]:
    return _host_key(URL(f"{scheme}://{api_host(registry)}"))


def _log_failure(route: Route, attempt: Attempt) -> None:
    log.warning("upstream_attempt_failed", name=str(route.name), **attempt)


def _failure(route: Route, registry: str, exc: UpstreamError) -> Attempt:
    """The attempts entry for a transport failure (see :func:`transport_errors`), logged."""
    attempt: Attempt = {"upstream": registry, "cause": cast(Cause, exc.cause), "error": exc.reason}
    if isinstance(exc.detail, dict) and isinstance(exc.detail.get("host"), str):
        attempt["host"] = exc.detail["host"]
    _log_failure(route, attempt)
    return attempt


def registry_tls(registries: Mapping[str, RegistrySettings]) -> dict[tuple[str, int], TLS]:
    """The TLS of each registry that sets ``ca_file`` or ``tls_verify``, by its API host and
    port. ``ca_file`` is added to the system's trust store, so a public certificate still
    verifies. Reads the files: call it off the event loop.

    Raises :class:`ConfigError` naming the key when a ``ca_file`` is not a readable PEM bundle.
    """
    contexts: dict[tuple[str, int], TLS] = {}
    for registry, conf in registries.items():
        key = _api_key(registry)
        if not conf.tls_verify:
            contexts[key] = False
        elif conf.ca_file is not None:
            context = ssl.create_default_context()
            try:
                context.load_verify_locations(cafile=conf.ca_file)
            except (OSError, ssl.SSLError) as exc:
                words = _tls_words(exc) if isinstance(exc, ssl.SSLError) else _os_words(exc)
                raise ConfigError(
                    f"registries.{registry}.ca_file: cannot use {conf.ca_file} "
                    f"as a PEM certificate bundle: {words}"
                ) from None
            context.set_alpn_protocols(("http/1.1",))  # as aiohttp's own contexts
            contexts[key] = context
    return contexts


@dataclass
class UpstreamResponse:
    """An open response from one upstream. Close it (``async with``) when done."""

    upstream: Upstream
    response: aiohttp.ClientResponse
    private: bool  # fetched with the client's own credentials: never cache

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
        with transport_errors(self.where):
            body = await read_capped(self.response.content, limit)
        if body is None:
            raise self._too_large(what, limit)
        if length is not None and len(body) != length:
            raise UpstreamInvalid(
                f"upstream {what} was cut short",
                {"upstream": self.where, "expected": length, "received": len(body)},
            )
        return body

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
        return UpstreamInvalid(
            f"upstream answered {self.status // 100}xx", {"upstream": self.where}, cause="http"
        )

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
        tls: Mapping[tuple[str, int], TLS] | None = None,
        egress: EgressPolicy | None = None,
        *,
        peer_session: aiohttp.ClientSession | None = None,
        peer_name: str = "client",
    ) -> None:
        self._session = session
        # Requests to the site's other Detours (proxy.cluster.peering): their own connections, from
        # this instance's advertised address, which is how a peer knows a peer.
        self._peer_session = peer_session or session
        self._peer_name = peer_name
        self._egress = egress or EgressPolicy(())
        # This instance's name in the Via header of what it sends: a request that comes back
        # with it has looped (a redirect, or a mirror pointed back at this proxy).
        self.pseudonym = f"detour-{secrets.token_hex(6)}"
        self.via = f"1.1 {self.pseudonym}"
        self._settings = settings
        self._credentials = credentials
        self._metrics = metrics
        self._tls = dict(tls or {})  # see registry_tls
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

        Each failed attempt is logged once, as a warning; the error raised lists them all in
        its detail, and, when there was one upstream, says in its message what failed.
        """
        attempts: list[Attempt] = []
        messages: list[str] = []
        timed_out = False
        last_status: int | None = None
        for upstream in route.upstreams:
            if upstream.origin:
                self._egress.check_registry(upstream.registry)
        for upstream in route.upstreams:
            registry = upstream.registry
            down = self._down_until.get(registry, 0.0) > time.monotonic()
            if down and (fallback or upstream.peer):  # a peer that failed lately: skipped
                error = f"failed less than {DOWN_SECONDS:.0f}s ago; not tried"
                attempts.append({"upstream": registry, "cause": "down", "error": error})
                messages.append(f"{registry} {error}")
                self._count_peer(upstream, "skipped")
                continue
            try:
                response, private = await self._exchange(
                    upstream, method, suffix, dict(headers or {}), client_auth, fallback
                )
            except (UpstreamTimeout, UpstreamUnreachable) as exc:
                timed_out = timed_out or isinstance(exc, UpstreamTimeout)
                self.mark_down(upstream)
                attempts.append(_failure(route, registry, exc))
                messages.append(exc.message)
                self._count_peer(upstream, "failed")
                continue
            if upstream.peer and response.status not in (200, 206, 404) and response.status < 500:
                # The owner refused (a 4xx other than "unknown"): skip it for a while.
                self.mark_down(upstream)
                attempt: Attempt = {
                    "upstream": registry,
                    "cause": "http",
                    "error": f"peer answered {response.status}",
                    "status": response.status,
                }
                _log_failure(route, attempt)
                attempts.append(attempt)
                messages.append(f"{registry} {attempt['error']}")
                self._count_peer(upstream, "failed")
                response.release()
                continue
            self._down_until.pop(registry, None)
            if _retryable(response.status):
                self._count_peer(upstream, "failed")
                last_status = response.status
                # Only a registry the operator named has its status and reason passed on.
                named = self._egress.named_registry(registry)
                answered = (
                    f"answered {response.status} {(response.reason or '')[:100]}".rstrip()
                    if named
                    else f"answered {response.status // 100}xx"
                )
                attempt = {"upstream": registry, "cause": "http", "error": answered}
                if named:
                    attempt["status"] = response.status
                _log_failure(route, attempt)
                attempts.append(attempt)
                messages.append(f"{registry} {answered}")
                response.release()
                continue
            self._count_peer(upstream, "served")
            return UpstreamResponse(upstream, response, private)
        detail = {"name": str(route.name), "attempts": attempts}
        if last_status == 429 and len(attempts) == 1:
            raise UpstreamDenied(429, "upstream rate limit reached", detail)
        # One upstream: its own words and cause. Several: each is in the detail.
        single = len(attempts) == 1
        message = messages[0] if single else "no upstream could serve the request"
        cause = attempts[0]["cause"] if single else None
        if timed_out and last_status is None:
            if not single and all(a["cause"] == "timeout" for a in attempts):
                message = "every upstream timed out"
            raise UpstreamTimeout(message, detail, cause=cause)
        raise UpstreamUnreachable(message, detail, cause=cause)

    def mark_down(self, upstream: Upstream) -> None:
        """``upstream`` failed: skipped for a while by requests that can do without it (all
        requests, for a peer; those with a cached answer to fall back on, for a registry)."""
        self._down_until[upstream.registry] = time.monotonic() + DOWN_SECONDS

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
        url = URL(f"{upstream.base_url}/{suffix}", encoded=True)
        limits = self._quick_timeout if quick else None
        if upstream.peer:  # never with credentials: private content stays off the peers
            headers[PEER_HEADER] = self._peer_name
            response = await self._send(
                upstream.registry, method, url, headers, None, limits, peer=True
            )
            return response, False
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

    def _count_token(self, registry: str, outcome: str) -> None:
        self._metrics.token_requests.labels(self._metrics.registry_label(registry), outcome).inc()

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
            response = await self._send(
                registry, "GET", realm.update_query(query), {}, auth, chosen_by_upstream=True
            )
            async with UpstreamResponse(Upstream(registry, ""), response, False) as answer:
                if response.status in (401, 403):
                    outcome = "refused"
                    self._count_token(registry, outcome)
                    if creds is None:
                        return None  # anonymous pulls refused: the client may hold credentials
                    raise UpstreamDenied(
                        response.status,
                        "the registry's token service refused the configured credentials",
                        {"registry": registry},
                    )
                if response.status != 200:
                    self._count_token(registry, "error")
                    raise UpstreamInvalid(
                        f"token service answered {response.status}", {"registry": registry}
                    )
                body = await answer.read(MAX_TOKEN_RESPONSE, "token response")
            try:
                token = token_from_response(cast(TokenResponse, parse_json(body)))
            except (ValueError, TypeError, AttributeError):
                token = None
            if token is None:
                self._count_token(registry, "error")
                raise UpstreamInvalid("token service sent no token", {"registry": registry})
            self._count_token(registry, "issued")
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
        *,
        chosen_by_upstream: bool = False,
        peer: bool = False,
    ) -> aiohttp.ClientResponse:
        """One request, following redirects; ``auth`` never leaves the first origin.

        Every hop must pass the egress policy (:mod:`proxy.core.egress`). The first hop is the
        client's choice, unless ``chosen_by_upstream`` (a token realm): refused, it is a 403
        that names the setting to change. A redirect is the upstream's choice: it may go only
        to http(s), never from https to http, and a refused one is a bad reply (502).
        """
        first_origin = _origin(url)
        for hop in range(self._settings.max_redirects + 1):
            sent: dict[str, Any] = {
                "User-Agent": USER_AGENT,
                "Accept-Encoding": "identity",
                "Via": _via(self.via),
                **headers,
            }
            if auth is not None and _origin(url) == first_origin:
                sent["Authorization"] = auth
            key = _host_key(url)
            tls = self._tls.get(key, True) if url.scheme == "https" else True
            own = key == _api_key(registry, url.scheme)
            label = self._metrics.registry_label(registry)
            started = time.monotonic()
            try:
                self._egress.check_url(url)
                with transport_errors(registry, None if own else url.host_port_subcomponent):
                    session = self._peer_session if peer else self._session
                    response = await session.request(
                        method,
                        url,
                        headers=sent,
                        allow_redirects=False,
                        timeout=limits or session.timeout,
                        ssl=tls,
                    )
            except UpstreamError as exc:
                status = "timeout" if isinstance(exc, UpstreamTimeout) else "error"
                self._metrics.upstream_requests.labels(label, status).inc()
                raise
            except AddressRefused as exc:
                self._metrics.upstream_requests.labels(label, "refused").inc()
                raise _refused(registry, exc, first=hop == 0 and not chosen_by_upstream) from None
            self._metrics.upstream_latency.labels(label).observe(time.monotonic() - started)
            self._metrics.upstream_requests.labels(label, str(response.status)).inc()
            location = response.headers.get("Location")
            if response.status not in REDIRECT_STATUSES or not location:
                return response
            response.release()
            target = url.join(URL(location))
            if target.scheme not in ("http", "https") or (
                url.scheme == "https" and target.scheme == "http"
            ):
                raise UpstreamInvalid(
                    "upstream redirected to a URL Detour does not follow "
                    "(only http and https, never from https to http)",
                    {"upstream": registry, "scheme": target.scheme[:20]},
                    cause="redirect",
                )
            url = target
            if response.status == 303:
                method = "GET"
        raise UpstreamInvalid("too many redirects", {"registry": registry})


def _via(own: str) -> str:
    incoming = INCOMING_VIA.get()
    return f"{incoming[:2000]}, {own}" if incoming else own


def _refused(registry: str, exc: AddressRefused, *, first: bool) -> DetourError:
    """The error for a connection the egress policy refused."""
    if first:
        return RegistryDenied(
            f"Detour does not connect to {exc.host}:{exc.port}: it resolves to a loopback, "
            "private or link-local address, or to Detour itself. Name the registry in "
            "redirects or registries to let Detour reach it",
            {"registry": registry},
        )
    return UpstreamInvalid(
        "upstream sent Detour to an address it does not connect to "
        "(loopback, private, link-local, or Detour itself)",
        {"upstream": registry},
        cause="redirect",
    )
