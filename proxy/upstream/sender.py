"""One request to a registry, sent hop by hop.

Redirects (blob GETs often go to object storage) are followed by hand, so that each hop is
checked: it must pass the egress policy (:mod:`proxy.upstream.egress`), it may go only to http(s)
and never from https to http, and ``Authorization`` never leaves the first origin. A peer's
(another Detour of the site) is never followed, and its answer is waited for only as long as the
peer answers probes (:mod:`proxy.upstream.liveness`). Each hop is
made with its host's TLS (:func:`proxy.upstream.connections.registry_tls`), carries this proxy's
entry in ``Via``, and is counted in the upstream metrics.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import aiohttp
from yarl import URL

from proxy import __version__
from proxy.errors import (
    DetourError,
    RegistryDenied,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
)
from proxy.metrics import Metrics
from proxy.upstream.connections import TLS, api_key, host_key
from proxy.upstream.egress import AddressRefused, EgressPolicy
from proxy.upstream.liveness import PeerWatch
from proxy.upstream.transport import transport_errors

USER_AGENT = f"detour/{__version__}"
# The Via header of the client request being served, if any: what this proxy sends upstream
# carries it on, with its own entry added, so a loop through Detours is seen wherever it closes.
INCOMING_VIA: ContextVar[str | None] = ContextVar("incoming_via", default=None)
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def origin(url: URL) -> tuple[str | None, str | None, int | None]:
    """What ``Authorization`` is bound to: scheme, host and port."""
    return url.scheme, url.host, url.port


class Sender:
    """Sends a request and follows its redirects, through the client sessions given."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        peer_session: aiohttp.ClientSession,
        metrics: Metrics,
        egress: EgressPolicy,
        tls: Mapping[tuple[str, int], TLS],
        *,
        via: str,
        max_redirects: int,
        peers: PeerWatch | None = None,
    ) -> None:
        self._session = session
        self._peer_session = peer_session
        self._metrics = metrics
        self._egress = egress
        self._tls = tls  # see registry_tls
        self._via = via
        self._max_redirects = max_redirects
        self._peers = peers

    async def send(
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
        patient: bool = True,
    ) -> aiohttp.ClientResponse:
        """One request, following redirects; ``auth`` never leaves the first origin.

        Every hop must pass the egress policy (:mod:`proxy.upstream.egress`). The first hop is the
        client's choice, unless ``chosen_by_upstream`` (a token realm): refused, it is a 403
        that names the setting to change. A redirect is the upstream's choice: it may go only
        to http(s), never from https to http, and a refused one is a bad reply (502). A
        ``peer``'s redirect is never followed (a Detour never answers one): a bad reply. A
        peer's silence is judged by probes (:mod:`proxy.upstream.liveness`) unless not ``patient``:
        then ``limits`` alone bound it.
        """
        first_origin = origin(url)
        for hop in range(self._max_redirects + 1):
            sent: dict[str, Any] = {
                "User-Agent": USER_AGENT,
                "Accept-Encoding": "identity",
                "Via": _via(self._via),
                **headers,
            }
            if auth is not None and origin(url) == first_origin:
                sent["Authorization"] = auth
            first = hop == 0 and not chosen_by_upstream
            response = await self._hop(
                registry, method, url, sent, limits, first=first, peer=peer, patient=patient
            )
            location = response.headers.get("Location")
            if response.status not in REDIRECT_STATUSES or not location:
                return response
            response.release()
            if peer:
                # A Detour never redirects: one that does is not one (or not itself).
                raise UpstreamInvalid(
                    "a peer answered with a redirect, which Detour never does; not followed",
                    {"upstream": registry},
                    cause="redirect",
                    reason="answered with a redirect (not followed)",
                )
            url = _redirect_target(registry, url, location)
            if response.status == 303:
                method = "GET"
        raise UpstreamInvalid("too many redirects", {"registry": registry})

    async def _hop(
        self,
        registry: str,
        method: str,
        url: URL,
        sent: Mapping[str, Any],
        limits: aiohttp.ClientTimeout | None,
        *,
        first: bool,
        peer: bool,
        patient: bool = True,
    ) -> aiohttp.ClientResponse:
        """One request to ``url`` as it stands, checked and counted."""
        key = host_key(url)
        tls = self._tls.get(key, True) if url.scheme == "https" else True
        own = key == api_key(registry, url.scheme)
        label = self._metrics.registry_label(registry)
        started = time.monotonic()
        try:
            self._egress.check_url(url)
            with transport_errors(registry, None if own else url.host_port_subcomponent):
                session = self._peer_session if peer else self._session
                asked = session.request(
                    method,
                    url,
                    headers=sent,
                    allow_redirects=False,
                    timeout=limits or session.timeout,
                    ssl=tls,
                )
                if peer and patient and self._peers is not None:
                    response = await self._peers.patiently(registry, asked)
                else:
                    response = await asked
        except UpstreamError as exc:
            status = "timeout" if isinstance(exc, UpstreamTimeout) else "error"
            self._metrics.upstream_requests.labels(label, status).inc()
            raise
        except AddressRefused as exc:
            self._metrics.upstream_requests.labels(label, "refused").inc()
            raise refused_error(registry, exc, first=first) from None
        self._metrics.upstream_latency.labels(label).observe(time.monotonic() - started)
        self._metrics.upstream_requests.labels(label, str(response.status)).inc()
        return response


def _redirect_target(registry: str, url: URL, location: str) -> URL:
    """Where a redirect from ``url`` goes, if Detour follows it there."""
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
    return target


def _via(own: str) -> str:
    incoming = INCOMING_VIA.get()
    return f"{incoming[:2000]}, {own}" if incoming else own


def refused_error(registry: str, exc: AddressRefused, *, first: bool) -> DetourError:
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
