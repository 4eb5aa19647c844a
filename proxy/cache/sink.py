"""Where the bytes of one blob fetch go: hashed, and written into the cache, or only hashed.

Each chunk is hashed and written in two threads of their own (:class:`~proxy.lane.Lane`),
the temp file's bytes reserved under ``cache.max_size`` (by the announced length, or chunk by
chunk when there is none). If the disk refuses a write (full, or an I/O error), the blob is
larger than ``cache.max_blob_size``, or there is no room, the sink *spills*: it stops writing
and keeps hashing, so the blob is still verified as it streams by, but not cached. A spill is
final; the fetch is told at once (its clients then get every byte from memory).

The clients are fed at the network's pace, not the disk's: they have their last byte once every
byte is hashed and matches the digest, while the disk may still be taking the last batches it
was given (:meth:`BlobSink.hashed`, then :meth:`BlobSink.close`). A writing thread that falls
behind is given the chunks beyond its batches in memory, every fetch's together up to
``cache.write_buffer`` (:meth:`~proxy.cache.write_mode.WriteMode.room`), so a disk that stalls
for a moment neither holds the clients back nor changes how blobs are written. A fetch that
would take them past it has found the disk slower than the network: its writer goes on through
the page cache (:meth:`~proxy.cache.writer.BlobWriter.go_buffered`), and so do the fetches of
the next ten minutes. If even so the disk falls ``cache.write_behind`` bytes behind, the sink
spills (``disk_behind``): the clients go on at the network's pace and the blob is fetched again
on a later pull. Where new page cache itself comes slower than the network (a VM that backs its
memory lazily), the clients get its pace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.cache.checksums import Checksums
from proxy.cache.store import CacheStore, cache_write_failed
from proxy.cache.writer import BlobWriter
from proxy.errors import DetourError, UpstreamInvalid
from proxy.lane import Chunk, Lane
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.reference import Digest

CLOSE_GRACE_SECONDS = 10.0  # at shutdown, for verified blobs to reach the cache

log = get_logger("detour.blobs")


class BlobSink:
    """The storing side of one fetch, from its first chunk to the cache (or not)."""

    def __init__(
        self,
        digest: Digest,
        store: CacheStore,
        metrics: Metrics,
        *,
        size: int | None,
        private: bool,
        max_blob_size: int,
        on_spill: Callable[[], None],
    ) -> None:
        self.digest = digest
        self._store = store
        self._metrics = metrics
        self._size = size
        self._private = private
        self._on_spill = on_spill
        self.reserved = 0  # bytes of the store's max_size promised to the temp file
        self.spilled = False
        self._went_buffered = False
        self.writer = writer = BlobWriter(
            digest, store.blob_path(digest), store.tmp, store.write_mode, announced=size
        )
        if writer.failure is not None:
            self.spill(writer.failure)
        elif private:
            pass  # never kept, so nothing reserved: it is deleted when its client is done
        elif size is not None and size > max_blob_size:
            self.spill(None, "too_large")
        elif size is not None:
            if store.reserve(size):
                self.reserved = size
            else:
                self.spill(None, "no_room")
        # Receiving, hashing and writing overlap: the network loop runs ahead of the hashing
        # and of the writing by up to PIPELINE_BATCHES (and a handoff) each, at its own pace.
        name = digest.hex[:12]
        self._hashing = Lane(f"hash {name}", writer.update)
        self._writing = Lane(f"write {name}", writer.write)
        store.write_mode.lanes.add(self._writing)  # its overflow, in the write buffer

    @property
    def on_disk(self) -> int:
        """Bytes in the temp file."""
        return self.writer.on_disk

    async def put(self, chunk: Chunk) -> None:
        """Hand a chunk to the hashing and (spilled: not) the writing, after making room for it
        if the upstream announced no length."""
        hashing, writing = self._hashing, self._writing
        if hashing.error is not None:
            raise self._crashed(hashing.error)
        await hashing.put(chunk)
        if self.spilled:
            return
        if writing.error is not None:
            self._write_failed(writing.error)
            return
        if self._size is None and not self._private:
            # No length announced: room is made chunk by chunk, under max_size.
            if not self._store.reserve(len(chunk)):
                self.spill(None, "no_room")
                return
            self.reserved += len(chunk)
        if writing.would_wait(len(chunk)):
            mode = self._store.write_mode
            if not self._went_buffered and mode.room(len(chunk)):
                await writing.put(chunk, wait=False)  # the write buffer takes it
                return
            if self._disk_behind():
                return
        await writing.put(chunk)

    def _disk_behind(self) -> bool:
        """The loop is about to wait for the writes. If the write buffer is full, the disk is
        slower than the network: go on through the page cache. If even so the disk is
        ``cache.write_behind`` bytes behind, spill (True): the client is not kept waiting.
        Where the page cache itself is slower than the network, the client gets its pace."""
        writer = self.writer
        if writer.direct:  # (or still finishing the O_DIRECT batches it was given)
            if not self._went_buffered:
                self._went_buffered = True
                writer.go_buffered()
                self._store.write_mode.fell_behind()
            return False
        if writer.disk_behind:
            self.spill(None, "disk_behind")
            return True
        return False

    async def hashed(self) -> None:
        """After the last chunk: wait until every chunk is hashed (then :meth:`verify`)."""
        await self._hashing.close()
        if self._hashing.error is not None:
            raise self._crashed(self._hashing.error)

    async def close(self) -> None:
        """After :meth:`hashed`: wait until every chunk is written, at the disk's pace, then
        write the last partial block ``O_DIRECT`` held back."""
        await self._writing.close()  # spilled, what it has left is skipped or, at most, written
        if self.spilled:
            return
        if self._writing.error is not None:
            self._write_failed(self._writing.error)
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.writer.finish)
        except OSError as exc:
            self.spill(exc)

    async def stop(self) -> None:
        """End both threads (done, or the fetch failed), waiting a moment for a write that is
        under way: the file is not to be closed and deleted under it."""
        self._hashing.stop()
        self._writing.stop()
        await asyncio.wait({self._writing.ended}, timeout=CLOSE_GRACE_SECONDS)
        self._store.write_mode.lanes.discard(self._writing)

    def verify(self, size: int | None, registry: str, source: str) -> None:
        """Raise, counted and logged, unless every byte hashed makes the digest (and ``size``,
        if ``source``, an upstream of ``registry``, announced one)."""
        if self.writer.matches(size):
            return
        self._metrics.verify_failures.labels("blob", self._metrics.registry_label(registry)).inc()
        log.error(
            "blob_digest_mismatch",
            digest=str(self.digest),
            upstream=source,
            size=self.writer.size,
            expected_size=size,
        )
        raise UpstreamInvalid(
            "upstream blob does not match its digest",
            {"digest": str(self.digest), "upstream": source},
        )

    @property
    def kept(self) -> bool:
        """Whether the verified blob can go into the cache: all of it is in the temp file."""
        return not self._private and self.writer.complete_on_disk

    async def commit(self) -> Checksums | None:
        """Put the verified blob into the cache: flushed and moved into place in a worker
        thread, then indexed by the store under the bytes reserved for it; the checksums its
        hits are checked against. None (counted, logged) if the disk won't: the reservation is
        then kept, released with the discarded file."""
        writer = self.writer
        try:
            await asyncio.get_running_loop().run_in_executor(None, writer.commit)
            self._store.admit(writer.final, writer.size, self.reserved)
        except OSError as exc:  # verified, but the disk would not keep it: served, not cached
            self._write_refused(exc)
            return None
        self.reserved = 0
        assert writer.checksums is not None
        return writer.checksums

    def discard(self) -> None:
        """Delete the temp file and give back its reservation, once no write is under way."""
        if self._writing.busy:
            self._writing.ended.add_done_callback(lambda _: self.discard())
            return
        self.writer.discard()
        self._store.release(self.reserved)
        self.reserved = 0

    def spill(self, exc: OSError | None, reason: str = "") -> None:
        """Stop writing. ``exc`` is the disk's refusal; without one, ``reason`` says why the
        blob is not kept."""
        if exc is not None:
            self._write_refused(exc)
        else:
            self._metrics.cache_write_failures.labels(reason).inc()
            log.info("blob_not_cached", digest=str(self.digest), reason=reason, size=self._size)
        self.spilled = True
        self._on_spill()

    def _write_failed(self, exc: Exception) -> None:
        if not isinstance(exc, OSError):
            raise self._crashed(exc)
        self.spill(exc)

    def _write_refused(self, exc: OSError) -> None:
        cache_write_failed(
            self._metrics, exc, "blob", "streaming without caching", digest=str(self.digest)
        )

    def _crashed(self, exc: Exception) -> DetourError:
        log.error("blob_store_crashed", digest=str(self.digest), error=repr(exc))
        return UpstreamInvalid("blob store failed")
