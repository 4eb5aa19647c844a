"""One upstream fetch of one blob: opened, resumed when the upstream drops, received into its
:class:`~proxy.content.window.Window` and its :class:`~proxy.cache.sink.BlobSink`, verified,
and committed to the cache.

The states::

    OPENING ──upstream answers──▶ RUNNING ──every byte, digest matches──▶ VERIFIED ──▶ committed
       │                            │                                      (or not kept)
       └──────────── FAILED ◀───────┘ (refused, cut short past resuming, wrong bytes, ended)

A fetch waits for its turn (:class:`~proxy.content.fetch_limits.FetchSlots`), and ends early when
its clients are gone (after ``upstream.abandon_after``, unless it is nearly done) or the upstream
crawls below ``upstream.min_rate``. Its clients are sent each byte but the last while it is
``RUNNING``; the last once it is ``VERIFIED``, so no client takes wrong bytes for a whole blob.
When every upstream fails, the fetch tries again for ``upstream.retry_for``
(:mod:`proxy.content.blob_body`); a client that could be sent nothing meanwhile for
``upstream.client_wait`` is let go of (:meth:`Download.wait_change`), so it retries, and its retry
joins this fetch.

A blob from a peer (another Detour of the site) of at most ``cluster.verify_peer_blobs_first``
bytes is *held*: the fetch stays ``OPENING`` for its clients until every byte is verified, and
when the bytes are wrong the peers that sent them are distrusted and the blob is fetched again
from the next peer or the upstream, so the clients get the right blob, a little later. Peers
relaying it down the tree are sent it as it arrives (each hop verifies it before its own clients
see a byte); when it turns out wrong, their responses are cut short. A larger
one is sent as it arrives; wrong bytes then abort its clients (and the peer is distrusted).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from pathlib import Path

from proxy.cache.checksums import Checksums
from proxy.cache.sink import BlobSink
from proxy.cache.store import CacheStore
from proxy.content.blob_body import BlobBody
from proxy.content.fetch_limits import FetchLimits, FetchSlots
from proxy.content.watchdog import watch
from proxy.content.window import Reader, Window
from proxy.errors import (
    DetourError,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.reference import Digest
from proxy.upstream.client import UpstreamClient
from proxy.upstream.rules import Route

NEARLY_DONE = 0.9  # a fetch this far along goes on for the cache when its clients leave
PEER_RETRIES = 2  # fetched again after a peer's wrong bytes: the next peer, then the upstream

log = get_logger("detour.blobs")


class ClientWaitOver(Exception):
    """A client could be sent nothing for ``upstream.client_wait`` (``patience`` seconds):
    the upstream is slow to answer, or a WAN cut is being waited out."""

    def __init__(self, patience: float) -> None:
        super().__init__(f"nothing to send for {patience:g}s")
        self.patience = patience


class State(enum.Enum):
    OPENING = "opening"  # waiting for the upstream's response headers
    RUNNING = "running"
    VERIFIED = "verified"
    FAILED = "failed"


class Download:
    """One fetch of one blob, run by :meth:`run` in a task of its own; its clients join its
    :attr:`window` and are streamed by :mod:`proxy.content.streamer`."""

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
        self._store = store
        self._metrics = metrics
        self._limits = limits
        self._slots = slots
        self._on_spill = on_spill
        self.waiting = 0  # clients waiting for the whole fetch (a Range) without reading it
        self.state = State.OPENING
        self.error: DetourError | None = None
        self.size: int | None = None
        self.source = ""
        self._client_auth = client_auth
        self._upstream = upstream
        self._body = self._new_body()
        self.held = False  # receiving, its clients not sent a byte until it is verified
        self.committed = False
        self.checksums: Checksums | None = None  # once committed: for its hits' checks
        self.window = Window(str(digest), limits.slow_client)
        self._sink: BlobSink | None = None
        self._done = asyncio.Event()  # verified and committed (or not kept), or failed
        self.last_progress = time.monotonic()  # when the upstream last sent bytes, or began

    def _new_body(self) -> BlobBody:
        return BlobBody(
            self.digest,
            self.route,
            self._client_auth,
            self._upstream,
            self._limits.max_blob_size,
            retry_for=self._limits.retry_for,
            metrics=self._metrics,
        )

    @property
    def failing(self) -> UpstreamError | None:
        """While every upstream fails and the fetch tries again: what the last try met."""
        return self._body.failing

    @property
    def client_wait(self) -> float | None:
        """``upstream.client_wait``: how long a client may be sent nothing (see
        :meth:`wait_change`)."""
        return self._limits.client_wait

    @property
    def received(self) -> int:
        """Bytes received from the upstream."""
        return self._body.received

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
        watching = asyncio.create_task(watch(self, self._limits))
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

    async def _fetch(self) -> None:
        sink = await self._receive()
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

    async def _receive(self) -> BlobSink:
        """Every byte, received and verified. Bytes from a peer that are held back until
        verified (see :meth:`_holds`) and turn out wrong cost the clients nothing: the peers
        that sent them are distrusted and the blob is fetched again from the next source."""
        for attempt in range(PEER_RETRIES + 1):
            body = self._body
            await body.open()
            self.size, self.source = body.size, body.source
            sink = self._sink = BlobSink(
                self.digest,
                self._store,
                self._metrics,
                size=self.size,
                private=body.private,
                max_blob_size=self._limits.max_blob_size,
                on_spill=lambda: self._on_spill(self),
            )
            self.held = self._holds(body, sink)
            if not self.held:
                self._start_sending()
            try:
                await self._receive_into(body, sink)
                sink.verify(self.size, self.route.upstreams[0].registry, self.source)
            except UpstreamInvalid as exc:
                for peer in body.peers:
                    self._upstream.distrust(peer, "wrong_blob", exc.message)
                if not (self.held and body.peers) or attempt == PEER_RETRIES:
                    raise
                log.warning("blob_refetched", digest=str(self.digest), error=exc.message)
                sink.discard()
                self.window.restart()
                self._body = self._new_body()
                continue
            return sink
        raise AssertionError("unreachable")  # pragma: no cover

    def _holds(self, body: BlobBody, sink: BlobSink) -> bool:
        """Whether the clients wait for every byte to be verified before their first: for a
        blob from a peer of at most ``cluster.verify_peer_blobs_first`` bytes that the cache
        takes (a client can then be sent it from the file). Peers relaying it are not held
        (:meth:`headers_ready`), so a blob flows down the tree as it arrives."""
        return (
            bool(body.peers)
            and not sink.spilled
            and self.size is not None
            and self.size <= self._limits.verify_peer_blobs_first
        )

    def _start_sending(self) -> None:
        self.held = False
        self.state = State.RUNNING
        self.window.notify()

    async def _receive_into(self, body: BlobBody, sink: BlobSink) -> None:
        try:
            async for chunk in body.chunks():
                if self.held and sink.spilled:
                    self._start_sending()  # the disk won't keep it: sent as it comes after all
                if sink.spilled:
                    await self.window.room(sink.on_disk)
                self.last_progress = time.monotonic()
                self.window.append(chunk, sink.on_disk, sink.spilled)
                await sink.put(chunk)
            await sink.close()
            self.window.trim(sink.on_disk, sink.spilled)
        finally:
            await sink.stop()

    # ----------------------------------------------------------------- for the clients

    def join(self, transport: asyncio.Transport | None) -> Reader:
        """Become a client of this fetch; synchronous, so a spill can't slip in between."""
        assert not self.spilled
        return self.window.join(transport)

    def interested(self) -> bool:
        return self.window.interested() or self.waiting > 0

    def nearly_done(self) -> bool:
        return self.size is not None and self.received >= self.size * NEARLY_DONE

    @property
    def receiving(self) -> bool:
        """Bytes are coming: the upstream answered, and the blob is not whole yet."""
        return self.state is State.RUNNING or self.held

    @property
    def received_all(self) -> bool:
        return self.state is State.VERIFIED

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

    @property
    def awaiting_upstream(self) -> bool:
        """Whether the fetch waits for its upstream's answer or next bytes (not for the disk,
        or for the check of bytes all received)."""
        whole = self.size is not None and self.received >= self.size
        if self.state is State.OPENING:
            return not (self.held and whole)
        return self.state is State.RUNNING and not whole

    async def wait_change(
        self, changed: asyncio.Event, since: float, patience: float | None
    ) -> None:
        """Wait for ``changed`` (this fetch's :attr:`Window.changed`, taken before looking);
        raise :class:`ClientWaitOver` once a client that had nothing since ``since``
        (``time.monotonic()``) has waited ``patience`` seconds while the upstream sent
        nothing. A wait on the disk is not cut."""
        if patience is None:
            await changed.wait()
            return
        while not changed.is_set():
            deadline = max(since, self.last_progress) + patience
            left = deadline - time.monotonic()
            if left <= 0:
                if self.awaiting_upstream:
                    raise ClientWaitOver(patience)
                await changed.wait()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await changed.wait()

    async def headers_ready(self, patience: float | None = None, *, relay: bool = False) -> None:
        """Wait for the upstream's answer; raise its error if it failed before any bytes, or
        :class:`ClientWaitOver` after ``patience`` seconds of nothing from the upstream. A
        ``relay`` (a peer's request, the blob going on down the tree) doesn't wait for a held
        blob to be verified: the node it goes to verifies it before its own clients see a
        byte, and this fetch still sends no last byte before its own check."""
        since = time.monotonic()
        while self.state is State.OPENING and not (relay and self.held):
            await self.wait_change(self.window.changed, since, patience)
        if self.state is State.FAILED and (self.received == 0 or self.held):
            assert self.error is not None
            raise self.error

    async def finished(self, patience: float | None = None) -> None:
        """Wait for the end of the fetch, commit included; raise its error if it failed, or
        :class:`ClientWaitOver` after ``patience`` seconds of nothing from the upstream."""
        since = time.monotonic()
        while not self._done.is_set():
            await self.wait_change(self.window.changed, since, patience)
        if self.state is State.FAILED:
            assert self.error is not None
            raise self.error
