"""One upstream fetch of one blob: opened, resumed when the upstream drops, received into its
:class:`~proxy.core.window.Window` and its :class:`~proxy.core.blob_sink.BlobSink`, verified,
and committed to the cache.

The states::

    OPENING ──upstream answers──▶ RUNNING ──every byte, digest matches──▶ VERIFIED ──▶ committed
       │                            │                                      (or not kept)
       └──────────── FAILED ◀───────┘ (refused, cut short past resuming, wrong bytes, ended)

A fetch waits for its turn (:class:`FetchSlots`), and ends early when its clients are gone
(after ``upstream.abandon_after``, unless it is nearly done) or the upstream crawls below
``upstream.min_rate``. Its clients are sent each byte but the last while it is ``RUNNING``; the
last once it is ``VERIFIED``, so no client takes wrong bytes for a whole blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from proxy.core.blob_sink import BlobSink
from proxy.core.blob_writer import Checksums
from proxy.core.cache import CacheStore
from proxy.core.rules import Route
from proxy.core.upstream import UpstreamClient, UpstreamResponse
from proxy.core.window import CHUNK_BYTES, Reader, Window
from proxy.errors import (
    BlobUnknown,
    DetourError,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.reference import Digest
from proxy.settings import Settings

MAX_RESUMES = 3
NEARLY_DONE = 0.9  # a fetch this far along goes on for the cache when its clients leave

log = get_logger("detour.blobs")


class State(enum.Enum):
    OPENING = "opening"  # waiting for the upstream's response headers
    RUNNING = "running"
    VERIFIED = "verified"
    FAILED = "failed"


def blob_unknown(digest: Digest) -> BlobUnknown:
    return BlobUnknown("blob unknown to upstream", {"digest": str(digest)})


@dataclass(frozen=True)
class FetchLimits:
    """The bounds on blob fetches, from the settings (see :class:`FetchSlots`)."""

    max_blob_size: int  # larger: streamed, not cached; larger and of no announced length: cut
    abandon_after: float
    min_rate: int | None  # bytes per second, over each ``rate_window``
    rate_window: float
    slow_client: float

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchLimits:
        cache, upstream = settings.cache, settings.upstream
        return cls(
            max_blob_size=min(cache.max_blob_size, cache.max_size or cache.max_blob_size),
            abandon_after=upstream.abandon_after,
            min_rate=upstream.min_rate,
            rate_window=upstream.read_timeout,
            slow_client=upstream.slow_client,
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


class Download:
    """One fetch of one blob, run by :meth:`run` in a task of its own; its clients join its
    :attr:`window` and are streamed by :mod:`proxy.core.streamer`."""

    def __init__(
        self,
        digest: Digest,
        route: Route,
        client_auth: str | None,
        *,
        store: CacheStore,
        upstream: UpstreamClient,
        metrics: Metrics,
        limits: FetchLimits,
        slots: FetchSlots,
        on_spill: Callable[[Download], None] = lambda _: None,
    ) -> None:
        self.digest = digest
        self.route = route
        self._client_auth = client_auth
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self._limits = limits
        self._slots = slots
        self._on_spill = on_spill
        self.waiting = 0  # clients waiting for the whole fetch (a Range) without reading it
        self.state = State.OPENING
        self.error: DetourError | None = None
        self.size: int | None = None
        self.received = 0  # bytes received from the upstream
        self.source = ""
        self.committed = False
        self.checksums: Checksums | None = None  # once committed: for its hits' checks
        self.window = Window(str(digest), limits.slow_client)
        self._sink: BlobSink | None = None
        self._done = asyncio.Event()  # verified and committed (or not kept), or failed

    @property
    def spilled(self) -> bool:
        return self._sink is not None and self._sink.spilled

    @property
    def on_disk(self) -> int:
        """Bytes in the temp file, which readers behind the window read."""
        return 0 if self._sink is None else self._sink.on_disk

    @property
    def files(self) -> tuple[Path | None, Path]:
        """The temp file (None before the upstream answered, or if it could not be made) and
        where it goes once committed."""
        temp = None if self._sink is None else self._sink.writer.path
        return temp, self._store.blob_path(self.digest)

    def available(self) -> int:
        """The bytes a client may be sent now: all received, but the last until verified."""
        limit = self.window.end
        if self.state is not State.VERIFIED and self.size is not None:
            limit = min(limit, self.size - 1)
        return limit

    # ----------------------------------------------------------------- the state machine

    async def run(self) -> None:
        try:
            async with self._slots.slot(self.route.upstreams[0].registry):
                await self._fetch_watched()
        except Exception as exc:  # every failure is reported to this fetch's clients
            self.error = (
                exc if isinstance(exc, DetourError) else UpstreamInvalid("blob fetch failed")
            )
            if not isinstance(exc, DetourError):
                log.exception("blob_fetch_crashed", digest=str(self.digest))
            self.state = State.FAILED
        finally:
            self._done.set()
            self.release_file()
            self.window.notify()

    async def _fetch_watched(self) -> None:
        """The fetch, ended early when its clients are gone or the upstream crawls."""
        if not self.interested():
            raise self._ended("abandoned", "every client left before the fetch began")
        fetching = asyncio.create_task(self._fetch())
        watching = asyncio.create_task(self._watch())
        try:
            await asyncio.wait({fetching, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            fetching.cancel()
            watching.cancel()
            fetched, watched = await asyncio.gather(fetching, watching, return_exceptions=True)
        if not isinstance(fetched, asyncio.CancelledError):
            if isinstance(fetched, BaseException):
                raise fetched
            return
        if isinstance(watched, BaseException):
            raise watched
        raise self._ended(*watched)

    def _ended(self, reason: str, words: str) -> UpstreamError:
        self._metrics.ended_fetches.labels(reason).inc()
        log.warning("blob_fetch_ended", digest=str(self.digest), reason=reason, detail=words)
        error = UpstreamTimeout if reason == "too_slow" else UpstreamUnreachable
        return error(f"blob fetch ended: {words}", {"digest": str(self.digest)}, cause=reason)

    async def _watch(self) -> tuple[str, str]:
        """Why the fetch should end, once it should: nobody waits for it any more (after
        ``abandon_after``, unless it is nearly done), or it ran slower than ``min_rate`` over a
        ``rate_window``. Only while bytes are still coming."""
        limits = self._limits
        loop = asyncio.get_running_loop()
        tick = min(1.0, limits.abandon_after / 4, limits.rate_window / 4)
        idle_since: float | None = None
        window_start, window_bytes = loop.time(), self.received
        while True:
            await asyncio.sleep(tick)
            if self.state is State.VERIFIED:
                await asyncio.Event().wait()  # done receiving: nothing left to watch
            now = loop.time()
            if self.interested():
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= limits.abandon_after and not self._nearly_done():
                return "abandoned", f"no client for {limits.abandon_after:g}s"
            if self.state is not State.RUNNING:
                window_start, window_bytes = now, self.received  # the clock starts with bytes
            elif now - window_start >= limits.rate_window:
                rate = (self.received - window_bytes) / (now - window_start)
                if limits.min_rate is not None and rate < limits.min_rate:
                    return "too_slow", f"{rate:.0f} bytes/s, below upstream.min_rate"
                window_start, window_bytes = now, self.received

    async def _open(self, offset: int) -> UpstreamResponse:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = await self._upstream.open(
            self.route,
            "GET",
            f"blobs/{self.digest}",
            headers=headers,
            client_auth=self._client_auth,
        )
        expected = 206 if offset else 200
        if response.status != expected:
            response.close()
            raise response.refusal(blob_unknown(self.digest))
        if offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            response.close()
            raise UpstreamInvalid("upstream cannot resume", {"upstream": response.where})
        return response

    async def _fetch(self) -> None:
        response = await self._open(0)
        self.size = response.response.content_length
        self.source = response.where
        sink = self._sink = BlobSink(
            self.digest,
            self._store,
            self._metrics,
            size=self.size,
            private=response.private,
            max_blob_size=self._limits.max_blob_size,
            on_spill=lambda: self._on_spill(self),
        )
        self.state = State.RUNNING
        self.window.notify()
        try:
            await self._receive(response, sink)
            await sink.close()
            self.window.trim(sink.on_disk, sink.spilled)
        finally:
            await sink.stop()
        if not sink.matches(self.size):
            self._mismatch()
        # Verified: clients get their last byte now. Making the file durable (fsync, rename)
        # is for the cache, and happens after.
        self.state = State.VERIFIED
        if not sink.kept:
            # Not kept: the file goes now, unless a client behind the window still reads it.
            if all(reader.position >= self.on_disk for reader in self.window.readers):
                sink.discard()
            self.window.notify()
            return
        self.window.notify()
        self.checksums = await sink.commit()
        self.committed = self.checksums is not None

    def _mismatch(self) -> NoReturn:
        self._metrics.verify_failures.labels(
            "blob", self._metrics.registry_label(self.route.upstreams[0].registry)
        ).inc()
        log.error(
            "blob_digest_mismatch",
            digest=str(self.digest),
            upstream=self.source,
            size=self.received,
            expected_size=self.size,
        )
        raise UpstreamInvalid(
            "upstream blob does not match its digest",
            {"digest": str(self.digest), "upstream": self.source},
        )

    async def _receive(self, response: UpstreamResponse, sink: BlobSink) -> None:
        """The body into the window and the sink, resuming with a Range request when the
        upstream drops."""
        resumes = 0
        while True:
            try:
                async with response:
                    async for chunk in response.chunks(CHUNK_BYTES):
                        self._count(len(chunk))
                        if sink.spilled:
                            await self.window.room(sink.on_disk)
                        self.window.append(chunk, sink.on_disk, sink.spilled)
                        await sink.put(chunk)
            except UpstreamError as exc:
                # Dropped mid-blob: resume from the byte reached, a bounded number of times.
                if isinstance(exc, UpstreamInvalid) or resumes >= MAX_RESUMES:
                    raise
                resumes += 1
                if response.upstream.peer:  # an owner that broke mid-stream: skip it a while
                    self._upstream.mark_down(response.upstream)
                log.warning(
                    "blob_resume",
                    digest=str(self.digest),
                    offset=self.received,
                    attempt=resumes,
                    error=exc.message,
                )
                response = await self._open(self.received)
                continue
            if self.size is not None and self.received < self.size and resumes < MAX_RESUMES:
                resumes += 1
                response = await self._open(self.received)
                continue
            return

    def _count(self, count: int) -> None:
        """Count bytes received, refusing more than announced, or than the cache's largest
        blob when nothing was announced."""
        self.received += count
        if self.size is not None and self.received > self.size:
            raise UpstreamInvalid(
                "upstream sent more bytes than announced", {"upstream": self.source}
            )
        if self.size is None and self.received > self._limits.max_blob_size:
            raise UpstreamInvalid(
                "upstream blob of no announced length is larger than "
                f"cache.max_blob_size ({self._limits.max_blob_size} bytes)",
                {"upstream": self.source},
            )

    # ----------------------------------------------------------------- for the clients

    def join(self, transport: asyncio.Transport | None) -> Reader:
        """Become a client of this fetch; synchronous, so a spill can't slip in between."""
        assert not self.spilled
        return self.window.join(transport)

    def interested(self) -> bool:
        return self.window.interested() or self.waiting > 0

    def _nearly_done(self) -> bool:
        return self.size is not None and self.received >= self.size * NEARLY_DONE

    def release_file(self) -> None:
        """Once the fetch is over and no client reads it: its window's memory goes, and its
        temp file (a committed one has moved away)."""
        if self._done.is_set() and not self.window.readers:
            self.window.clear()
            if not self.committed:
                self._discard()

    def _discard(self) -> None:
        if self._sink is not None:
            self._sink.discard()

    async def headers_ready(self) -> None:
        """Wait for the upstream's answer; raise its error if it failed before any bytes."""
        while self.state is State.OPENING:
            await self.window.changed.wait()
        if self.state is State.FAILED and self.received == 0:
            assert self.error is not None
            raise self.error

    async def finished(self) -> None:
        """Wait for the end of the fetch, commit included; raise its error if it failed."""
        await self._done.wait()
        if self.state is State.FAILED:
            assert self.error is not None
            raise self.error
