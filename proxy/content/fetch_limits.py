"""The bounds on blob fetches: how long and how slow one may go (:class:`FetchLimits`, from
the settings), and how many run at once, in all and from one registry (:class:`FetchSlots`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from proxy.metrics import Metrics
from proxy.settings import Settings


@dataclass(frozen=True)
class FetchLimits:
    """The bounds on blob fetches, from the settings (see :class:`FetchSlots`)."""

    max_blob_size: int  # larger: streamed, not cached; larger and of no announced length: cut
    abandon_after: float
    min_rate: int | None  # bytes per second, over each ``rate_window``
    rate_window: float
    slow_client: float
    verify_peer_blobs_first: int = 0  # a peer's blob up to this size: verified, then sent
    retry_for: float = 0.0  # every upstream failing, tried again for this long
    client_wait: float | None = None  # a client sent nothing this long is let go of

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchLimits:
        cache, upstream = settings.cache, settings.upstream
        return cls(
            max_blob_size=min(cache.max_blob_size, cache.max_size or cache.max_blob_size),
            abandon_after=upstream.abandon_after,
            min_rate=upstream.min_rate,
            rate_window=upstream.read_timeout,
            slow_client=upstream.slow_client,
            verify_peer_blobs_first=settings.cluster.verify_peer_blobs_first,
            retry_for=upstream.retry_for,
            client_wait=upstream.client_wait,
        )


class FetchSlots:
    """At most ``total`` fetches at once, and ``per_registry`` from one registry, so memory is
    bounded and one slow upstream can't hold every slot; the rest wait their turn, in order,
    counted as queued, then as under way."""

    def __init__(self, total: int, per_registry: int, metrics: Metrics) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_registry = per_registry
        self._registries: dict[str, tuple[asyncio.Semaphore, int]] = {}  # with their users
        self._metrics = metrics

    @contextlib.asynccontextmanager
    async def slot(self, registry: str) -> AsyncIterator[None]:
        metrics = self._metrics
        semaphore, users = self._registries.get(
            registry, (asyncio.Semaphore(self._per_registry), 0)
        )
        self._registries[registry] = (semaphore, users + 1)
        metrics.queued_fetches.inc()
        queued = True
        try:
            async with semaphore, self._total:
                metrics.queued_fetches.dec()
                queued = False
                metrics.inflight_fetches.inc()
                try:
                    yield
                finally:
                    metrics.inflight_fetches.dec()
        finally:
            if queued:
                metrics.queued_fetches.dec()
            semaphore, users = self._registries[registry]
            if users > 1:
                self._registries[registry] = (semaphore, users - 1)
            else:
                del self._registries[registry]  # names a client invents don't pile up
