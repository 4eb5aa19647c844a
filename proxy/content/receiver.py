"""The receiving half of one blob fetch: its body opened, every chunk put into the fetch's
:class:`~proxy.content.window.Window` and its :class:`~proxy.cache.sink.BlobSink`, verified,
and committed to the cache.

The receiver knows its fetch only through :class:`Receiving`: what it tells the fetch's clients
(the upstream answered, bytes may go out, every byte is verified) and the window it fills. What
the clients wait on, and how, is :class:`~proxy.content.fetch.Fetch`'s.

A blob from a peer of at most ``cluster.verify_peer_blobs_first`` bytes is *held*: its clients
are sent nothing until every byte is verified, and when the bytes are wrong the peers that sent
them are distrusted and the blob is received again from the next peer or the upstream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from proxy.cache.checksums import Checksums
from proxy.cache.sink import BlobSink
from proxy.cache.store import CacheStore
from proxy.content.blob_body import BlobBody
from proxy.content.fetch_limits import FetchLimits, FetchSlots
from proxy.content.watchdog import Progress, watched
from proxy.content.window import Window
from proxy.errors import DetourError, UpstreamError, UpstreamInvalid
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.reference import Digest
from proxy.upstream.client import UpstreamClient
from proxy.upstream.rules import Route

PEER_RETRIES = 2  # received again after a peer's wrong bytes: the next peer, then the upstream

log = get_logger("detour.blobs")


class Receiving(Progress, Protocol):
    """What the receiver tells the fetch it receives for, and the window it fills (and what
    the watchdog reads of it)."""

    size: int | None  # as the upstream announced it
    where: str  # the upstream that answered
    held: bool  # the clients sent nothing until every byte is verified
    last_progress: float  # when the upstream last sent bytes, or began

    @property
    def window(self) -> Window: ...

    def start_sending(self) -> None:
        """Bytes may go out to the clients as they arrive."""
        ...

    def verified(self) -> None:
        """Every byte is in and matches the digest: the clients may have the last one."""
        ...


class Receiver:
    """The upstream's body of one blob, received into its fetch's window and a sink; what
    every chunk, the sink and the body say is read by the fetch for its clients."""

    def __init__(
        self,
        fetch: Receiving,
        digest: Digest,
        route: Route,
        client_auth: str | None,
        *,
        store: CacheStore,
        upstream: UpstreamClient,
        metrics: Metrics,
        limits: FetchLimits,
        slots: FetchSlots,
        on_spill: Callable[[], None],
    ) -> None:
        self._fetch = fetch
        self._digest = digest
        self._route = route
        self._client_auth = client_auth
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self._limits = limits
        self._slots = slots
        self._on_spill = on_spill
        self.body = self._new_body()
        self.sink: BlobSink | None = None
        self._checksums: Checksums | None = None  # once committed

    def _new_body(self) -> BlobBody:
        return BlobBody(
            self._digest,
            self._route,
            self._client_auth,
            self._upstream,
            self._limits.max_blob_size,
            retry_for=self._limits.retry_for,
            metrics=self._metrics,
        )

    @property
    def failing(self) -> UpstreamError | None:
        """While every upstream fails and the body is asked for again: what the last try met."""
        return self.body.failing

    @property
    def spilled(self) -> bool:
        return self.sink is not None and self.sink.spilled

    @property
    def on_disk(self) -> int:
        """Bytes in the temp file, which readers behind the window read."""
        return 0 if self.sink is None else self.sink.on_disk

    @property
    def temp_file(self) -> Path | None:
        """None before the upstream answered, or if the file could not be made."""
        return None if self.sink is None else self.sink.writer.path

    def discard(self) -> None:
        if self.sink is not None:
            self.sink.discard()

    async def run(self) -> Checksums | None:
        """Receive and verify every byte in the fetch's turn, then commit the blob: its
        checksums once it is in the cache, None if it was not kept. Ended early by the
        watchdog, or failed, it raises what the clients are given."""
        digest = str(self._digest)
        try:
            async with self._slots.slot(self._route.upstreams[0].registry):
                await watched(self._commit, self._fetch, self._limits, self._metrics, digest)
        except DetourError:
            raise
        except Exception as exc:
            log.exception("blob_fetch_crashed", digest=digest)
            raise UpstreamInvalid("blob fetch failed") from exc
        return self._checksums

    async def _commit(self) -> None:
        sink = await self._receive()
        # Verified: clients get their last byte now. The disk takes what it was given at its
        # own pace, and making the file durable (fsync, rename) is for the cache, after.
        self._fetch.verified()
        try:
            await sink.close()
        finally:
            await sink.stop()
        self._fetch.window.trim(sink.on_disk, sink.spilled)
        if not sink.kept:
            # Not kept: the file goes now, unless a client behind the window still reads it.
            if all(reader.position >= self.on_disk for reader in self._fetch.window.readers):
                sink.discard()
            return
        self._checksums = await sink.commit()

    async def _receive(self) -> BlobSink:
        """Every byte, received and verified. Bytes from a peer that are held back until
        verified (see :meth:`_holds`) and turn out wrong cost the clients nothing: the peers
        that sent them are distrusted and the blob is received again from the next source."""
        fetch = self._fetch
        for attempt in range(PEER_RETRIES + 1):
            body = self.body
            await body.open()
            fetch.size, fetch.where = body.size, body.where
            sink = self.sink = BlobSink(
                self._digest,
                self._store,
                self._metrics,
                size=body.size,
                private=body.private,
                max_blob_size=self._limits.max_blob_size,
                on_spill=self._on_spill,
            )
            fetch.held = self._holds(body, sink)
            if not fetch.held:
                fetch.start_sending()
            try:
                await self._receive_into(body, sink)
                sink.verify(body.size, self._route.upstreams[0].registry, body.where)
            except UpstreamInvalid as exc:
                await sink.stop()
                for peer in body.peers:
                    self._upstream.distrust(peer, "wrong_blob", exc.message)
                if not (fetch.held and body.peers) or attempt == PEER_RETRIES:
                    raise
                log.warning("blob_refetched", digest=str(self._digest), error=exc.message)
                sink.discard()
                fetch.window.restart()
                self.body = self._new_body()
                continue
            except BaseException:
                await sink.stop()
                raise
            return sink
        raise AssertionError("unreachable")  # pragma: no cover

    def _holds(self, body: BlobBody, sink: BlobSink) -> bool:
        """Whether the clients wait for every byte to be verified before their first: for a
        blob from a peer of at most ``cluster.verify_peer_blobs_first`` bytes that the cache
        takes (a client can then be sent it from the file). Peers relaying it are not held
        (:meth:`~proxy.content.fetch.Fetch.headers_ready`), so a blob flows down the tree as
        it arrives."""
        return (
            bool(body.peers)
            and not sink.spilled
            and body.size is not None
            and body.size <= self._limits.verify_peer_blobs_first
        )

    async def _receive_into(self, body: BlobBody, sink: BlobSink) -> None:
        """Every chunk into the window and the sink, until every byte is hashed (the writing
        may still be under way)."""
        fetch, window = self._fetch, self._fetch.window
        async for chunk in body.chunks():
            if fetch.held and sink.spilled:
                fetch.start_sending()  # the disk won't keep it: sent as it comes after all
            if sink.spilled:
                await window.room(sink.on_disk)
            fetch.last_progress = time.monotonic()
            window.append(chunk, sink.on_disk, sink.spilled)
            await sink.put(chunk)
        await sink.hashed()
