"""What a blob or manifest request came to, and the one rule for what may be shared.

:class:`Outcome` is filled in by :class:`~proxy.content.blobs.Blobs` and
:class:`~proxy.content.manifests.Manifests` as a request goes (the cache result as soon as it is
known, and counted then; the bytes as they go out), and written to the access log by the
handler that made it (:func:`proxy.api.handlers.api`), also when the request fails or the client
hangs up: so it is handed in rather than returned. Domain code never writes log fields.

:class:`Sharing` is the rule, written once, for "may this be cached and shared?".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from proxy.logs import CLIENT_DISCONNECTED
from proxy.metrics import Metrics

Kind = Literal["blob", "manifest"]


@dataclass
class Outcome:
    kind: Kind
    metrics: Metrics
    cache: str | None = None  # the result counted in detour_cache_requests_total
    source: str | None = None  # where the body came from: "cache" or "upstream"
    upstream: str | None = None  # the upstream that answered
    streamed: bool = False  # sent in pieces: ``bytes`` counts them as they go out
    bytes: int = 0
    aborted: str | None = None  # why a streamed answer stopped short

    def count(self, result: str) -> None:
        """The cache result, counted at once (a long pull is a miss while it runs)."""
        self.cache = result
        self.metrics.cache_requests.labels(self.kind, result).inc()

    def record(self, fields: dict[str, Any]) -> None:
        """Into the access log's ``fields``."""
        for key in ("cache", "source", "upstream", "aborted"):
            value = getattr(self, key)
            if value is not None:
                fields[key] = value
        if self.streamed:
            fields["bytes"] = self.bytes


@dataclass(frozen=True)
class Sharing:
    """What may be cached, and shared between clients.

    A request that carries the client's own credentials (``Authorization``: passthrough) is
    for that client alone: it never joins another client's fetch, none joins it, and it never
    goes through a peer. An answer the upstream gave for the client's credentials is never
    cached. Everything else (fetched with Detour's own credentials, or none) is cached and
    shared.
    """

    def shared(self, client_auth: str | None) -> bool:
        """Whether a request may join, and be joined by, others (and go through a peer)."""
        return client_auth is None

    def kept(self, private: bool) -> bool:
        """Whether an answer (``private``: given for the client's credentials) may be cached."""
        return not private

    def result(self, result: str, client_auth: str | None, private: bool = False) -> str:
        """The cache result to count: ``bypass`` for what is the client's alone."""
        return result if self.shared(client_auth) and self.kept(private) else "bypass"


class Abort(Exception):
    """The rest of a response already under way (a 200 whose headers, and some bytes, went
    out) can't be had right: its connection is aborted, so the client can't take what it got
    for a whole blob. ``reason`` goes to the access log's ``aborted``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def send_body(
    request: web.Request,
    response: web.StreamResponse,
    outcome: Outcome,
    body: Awaitable[None],
    hung_up: Callable[[], str] = lambda: CLIENT_DISCONNECTED,
) -> web.StreamResponse:
    """Send a prepared ``response``'s body (``body`` does) and end it: whole, aborted on an
    :class:`Abort`, or cut short by the client, who hung up (kubelet cancels pulls routinely;
    ``hung_up`` says how it went) and got a 200 and ``outcome.bytes``."""
    try:
        await body
    except Abort as exc:
        outcome.aborted = exc.reason
        if request.transport is not None:
            request.transport.abort()
        return response
    except ConnectionError:
        outcome.aborted = hung_up()
        response.force_close()
        return response
    except asyncio.CancelledError:
        outcome.aborted = "cancelled"
        raise
    await response.write_eof()
    return response
