"""Blobs: served from disk on a hit, fetched once from upstream on a miss.

A miss starts a :class:`BlobFetch`, a background task that streams the upstream body into a
temp file, hashing as it writes. Every client of that blob (the first and any that arrive
while it runs) is sent each chunk from memory as it arrives from the upstream, while the same
chunk is hashed and written alongside; a client that falls behind the fetch's in-memory window
of the last chunks reads the file instead, so the fetch never waits for one. So:

* concurrent requests for a missing blob share one upstream GET;
* a client that keeps up goes at the upstream's pace, not the cache disk's;
* a client that disconnects does not cancel the fetch others, or the cache, still want;
* the final byte of a response is held back until the digest and size are verified; on a
  mismatch the file is discarded and every client's connection is aborted, so no client ever
  receives a complete 200 with wrong bytes;
* when the upstream drops mid-blob, the fetch resumes with a ``Range`` request from the byte
  reached, a bounded number of times, and clients see one unbroken stream.

Content fetched with a client's own credentials (passthrough) is streamed the same way to that
client alone and then deleted, never moved into the cache, and no other client joins it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import queue
import socket
import struct
import threading
from array import array
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import xxhash
from aiohttp import web

from proxy.core.blob_writer import CHECKED_CHUNK_BYTES, BlobWriter, Checksums
from proxy.core.cache import CacheStore, cache_write_failed
from proxy.core.rules import Route
from proxy.core.upstream import UpstreamClient, UpstreamResponse
from proxy.errors import (
    BlobUnknown,
    DetourError,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.logs import CLIENT_DISCONNECTED, LOG, get_logger
from proxy.metrics import CACHE, Metrics
from proxy.reference import Digest
from proxy.settings import Settings

CHUNK_BYTES = 256 * 1024
MAX_RESUMES = 3
CLOSE_GRACE_SECONDS = 10.0  # at shutdown, for verified blobs to reach the cache
PIPELINE_CHUNKS = 4  # received chunks waiting to be hashed, and to be written
STORE_BATCH_BYTES = 1 << 20  # at most this much of them hashed, or written, at once
# The last bytes received, kept in memory for the clients that keep up (and, after a spill,
# for every client): a fetch holds at most this, plus the chunks not yet on disk.
WINDOW_BYTES = 8 * CHUNK_BYTES
NEARLY_DONE = 0.9  # a fetch this far along goes on for the cache when its clients leave
BLOB_CONTENT_TYPE = "application/octet-stream"

log = get_logger("detour.blobs")


class _State(enum.Enum):
    OPENING = "opening"  # waiting for the upstream's response headers
    RUNNING = "running"
    VERIFIED = "verified"
    FAILED = "failed"


def blob_headers(digest: Digest, size: int | None) -> dict[str, str]:
    headers = {"Docker-Content-Digest": str(digest), "Content-Type": BLOB_CONTENT_TYPE}
    if size is not None:
        headers["Content-Length"] = str(size)
    return headers


def _unknown(digest: Digest) -> BlobUnknown:
    return BlobUnknown("blob unknown to upstream", {"digest": str(digest)})


@dataclass(eq=False)
class _Reader:
    """One client of a fetch."""

    position: int = 0  # bytes sent to it
    gone: bool = False
    too_slow: bool = False  # cut off for holding a spilled fetch back
    # The client's connection: one that closed while waiting for the fetch's first bytes
    # (aiohttp does not cancel its handler) no longer counts as waiting for it.
    transport: asyncio.Transport | None = None

    @property
    def waiting(self) -> bool:
        return not self.gone and self.transport is not None and not self.transport.is_closing()


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


def _reset(transport: asyncio.Transport) -> None:
    """Close a connection at once with a TCP reset: a plain close would still hand the client
    what the kernel's send buffer holds (megabytes), at the client's own slow pace."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class FetchSlots:
    """At most ``total`` fetches at once, and ``per_registry`` from one registry, so memory is
    bounded and one slow upstream can't hold every slot; the rest wait their turn, in order."""

    def __init__(self, total: int, per_registry: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_registry = per_registry
        self._registries: dict[str, tuple[asyncio.Semaphore, int]] = {}  # with their users

    @contextlib.asynccontextmanager
    async def slot(self, registry: str) -> AsyncIterator[None]:
        semaphore, users = self._registries.get(
            registry, (asyncio.Semaphore(self._per_registry), 0)
        )
        self._registries[registry] = (semaphore, users + 1)
        try:
            async with semaphore, self._total:
                yield
        finally:
            semaphore, users = self._registries[registry]
            if users > 1:
                self._registries[registry] = (semaphore, users - 1)
            else:
                del self._registries[registry]  # names a client invents don't pile up


class _Lane:
    """A thread that runs ``job`` on the chunks put to it, in order, taking what has queued up
    (up to ``STORE_BATCH_BYTES``) at once: the hashing, or the writing, of one fetch.

    It goes from one chunk to the next without waiting for the event loop; the loop waits for
    it only when ``PIPELINE_CHUNKS`` are waiting, and is woken only then. A job that raises
    is not run again: ``error`` holds what it raised, and later chunks are only counted.
    """

    def __init__(self, name: str, job: Callable[[list[bytes]], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._job = job
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._put = 0  # chunks put (on the loop)
        self._done = 0  # chunks done (in the thread)
        self._closed = False
        self._stopped = False
        self._wanted = False  # the loop waits for a chunk to be done
        self._waiting: asyncio.Future[None] | None = None
        self.error: Exception | None = None
        self.ended: asyncio.Future[None] = self._loop.create_future()  # the thread is gone
        threading.Thread(target=self._run, name=name, daemon=True).start()

    async def put(self, chunk: bytes) -> None:
        await self._room(PIPELINE_CHUNKS)
        self._put += 1
        self._chunks.put(chunk)

    async def close(self) -> None:
        """Wait until every chunk put is done; the thread ends."""
        self._closed = True
        self._chunks.put(None)
        await self._room(1)

    @property
    def busy(self) -> bool:
        """Whether the thread may still run a job (or is about to end)."""
        return not self.ended.done() and not (self._closed and self._done == self._put)

    def stop(self) -> None:
        """End the thread without waiting: it runs no job after the one it may be running."""
        self._stopped = True
        self._chunks.put(None)

    async def _room(self, limit: int) -> None:
        while self._put - self._done >= limit:
            waiting = self._waiting = self._loop.create_future()
            self._wanted = True
            if self._put - self._done < limit:  # done meanwhile
                self._wanted = False
                return
            await waiting

    def _wake(self) -> None:
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    def _end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def _run(self) -> None:
        try:
            self._work()
        finally:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._end)

    def _work(self) -> None:
        end = False
        while not end:
            batch: list[bytes] = []
            size = 0
            chunk = self._chunks.get()
            while True:
                if chunk is None:
                    end = True
                    break
                batch.append(chunk)
                size += len(chunk)
                if size >= STORE_BATCH_BYTES:
                    break
                try:
                    chunk = self._chunks.get_nowait()
                except queue.Empty:
                    break
            if not batch:
                continue
            if self.error is None and not self._stopped:
                try:
                    self._job(batch)
                except Exception as exc:
                    self.error = exc
            self._done += len(batch)
            if self._wanted:
                self._wanted = False
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    self._loop.call_soon_threadsafe(self._wake)


class BlobFetch:
    """One upstream fetch of one blob, into a temp file, and to its clients from memory.

    Each chunk received joins the fetch's *window*: the last ``WINDOW_BYTES`` received, and
    every chunk not yet on disk. A client whose position is in the window is sent its bytes
    from there; one behind it reads the temp file, up to ``on_disk``, until it catches up. The
    fetch waits for the disk (a bounded pipeline) but never for a client.

    If the disk refuses a write (full, or an I/O error) the fetch *spills*: it stops writing,
    keeps hashing, and keeps each chunk in the window until every client has it, waiting for
    the slowest (cut off after ``upstream.slow_client``), so memory stays flat. A spilled fetch
    takes no new clients and caches nothing; it is still verified to the last byte.
    """

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
        on_spill: Callable[[BlobFetch], None] = lambda _: None,
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
        self._reserved = 0  # bytes of the store's max_size promised to this temp file
        self._private = False
        self.waiting = 0  # clients waiting for the whole fetch (a Range) without reading it
        self.state = _State.OPENING
        self.error: DetourError | None = None
        self.size: int | None = None
        self.received = 0  # bytes received from the upstream
        self._window: deque[bytes] = deque()  # the last chunks received, oldest first
        self._window_start = 0  # the offset of its first byte
        self._window_bytes = 0
        self.spilled = False
        self._hashing: _Lane | None = None
        self._writing: _Lane | None = None
        self.source = ""
        self.committed = False
        self.checksums: Checksums | None = None  # once committed: for its hits' checks
        self._writer: BlobWriter | None = None
        self._readers: set[_Reader] = set()
        self._changed = asyncio.Event()
        self._done = asyncio.Event()  # verified and committed (or not kept), or failed

    # --------------------------------------------------------------------- the fetch

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    @property
    def on_disk(self) -> int:
        """Bytes in the temp file, which readers behind the window read."""
        return 0 if self._writer is None else self._writer.on_disk

    async def run(self) -> None:
        try:
            async with self._slot():
                await self._fetch_watched()
        except Exception as exc:  # every failure is reported to this fetch's clients
            self.error = (
                exc if isinstance(exc, DetourError) else UpstreamInvalid("blob fetch failed")
            )
            if not isinstance(exc, DetourError):
                log.exception("blob_fetch_crashed", digest=str(self.digest))
            self.state = _State.FAILED
        finally:
            self._done.set()
            self._release_file()
            self._notify()

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Wait for this fetch's turn (see :class:`FetchSlots`), counted as queued, then as
        under way."""
        metrics = self._metrics
        metrics.queued_fetches.inc()
        queued = True
        try:
            async with self._slots.slot(self.route.upstreams[0].registry):
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

    def _interested(self) -> bool:
        return any(reader.waiting for reader in self._readers) or self.waiting > 0

    def _nearly_done(self) -> bool:
        return self.size is not None and self.received >= self.size * NEARLY_DONE

    async def _fetch_watched(self) -> None:
        """The fetch, ended early when its clients are gone or the upstream crawls."""
        if not self._interested():
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
            if self.state is _State.VERIFIED:
                await asyncio.Event().wait()  # done receiving: nothing left to watch
            now = loop.time()
            if self._interested():
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= limits.abandon_after and not self._nearly_done():
                return "abandoned", f"no client for {limits.abandon_after:g}s"
            if self.state is not _State.RUNNING:
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
            raise response.refusal(_unknown(self.digest))
        if offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            response.close()
            raise UpstreamInvalid("upstream cannot resume", {"upstream": response.where})
        return response

    async def _fetch(self) -> None:
        response = await self._open(0)
        self.size = response.response.content_length
        self.source = response.where
        private = self._private = response.private
        self._writer = writer = self._store.begin_blob(self.digest)
        if writer.failure is not None:
            self._spill(writer.failure)
        elif private:
            pass  # never kept, so nothing reserved: it is deleted when its client is done
        elif self.size is not None and self.size > self._limits.max_blob_size:
            self._spill(None, "too_large")
        elif self.size is not None:
            if self._store.reserve(self.size):
                self._reserved = self.size
            else:
                self._spill(None, "no_room")
        self.state = _State.RUNNING
        self._notify()
        # Receiving, hashing and writing overlap: the network loop runs ahead of the hashing
        # and of the writing by up to PIPELINE_CHUNKS each, and each goes at its own pace in
        # a thread of its own.
        name = self.digest.hex[:12]
        hashing = self._hashing = _Lane(f"hash {name}", writer.update)
        writing = self._writing = _Lane(f"write {name}", writer.write)
        try:
            await self._receive(response)
            await hashing.close()
            if hashing.error is not None:
                raise self._store_failed(hashing.error)
            await writing.close()  # spilled, what it has left is skipped or, at most, written
            if not self.spilled:
                await self._finish_file(writer)
        finally:
            hashing.stop()
            writing.stop()
            # Not a moment for a write to go on into a file about to be closed and deleted.
            await asyncio.wait({writing.ended}, timeout=CLOSE_GRACE_SECONDS)
        if not writer.matches(self.size):
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
        # Verified: clients get their last byte now. Making the file durable (fsync, rename)
        # is for the cache, and happens after.
        self.state = _State.VERIFIED
        if private or not writer.complete_on_disk:
            # Not kept: the file goes now, unless a client behind the window still reads it.
            if all(reader.position >= self.on_disk for reader in self._readers):
                self._discard()
            self._notify()
            return
        self._notify()
        try:
            self.checksums = await self._store.commit_blob(writer, self._reserved)
        except OSError as exc:  # verified, but the disk would not keep it: served, not cached
            self._cache_write_failed(exc)
            return
        self.committed = True
        self._reserved = 0

    async def _receive(self, response: UpstreamResponse) -> None:
        """The body into the window, to be hashed and written, resuming with a Range request
        when the upstream drops."""
        resumes = 0
        while True:
            try:
                async with response:
                    async for chunk in response.chunks(CHUNK_BYTES):
                        self.received += len(chunk)
                        if self.size is not None and self.received > self.size:
                            raise UpstreamInvalid(
                                "upstream sent more bytes than announced",
                                {"upstream": self.source},
                            )
                        if self.size is None and self.received > self._limits.max_blob_size:
                            raise UpstreamInvalid(
                                "upstream blob of no announced length is larger than "
                                f"cache.max_blob_size ({self._limits.max_blob_size} bytes)",
                                {"upstream": self.source},
                            )
                        if self.spilled:
                            await self._room()
                        self._window.append(chunk)
                        self._window_bytes += len(chunk)
                        self._trim()
                        self._notify()  # the clients that keep up send it now
                        await self._store_chunk(chunk)
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

    async def _store_chunk(self, chunk: bytes) -> None:
        """Hand a chunk to the hashing and (spilled: not) the writing, after making room for it
        if the upstream announced no length."""
        hashing, writing = self._hashing, self._writing
        assert hashing is not None
        assert writing is not None
        if hashing.error is not None:
            raise self._store_failed(hashing.error)
        await hashing.put(chunk)
        if self.spilled:
            return
        if writing.error is not None:
            self._write_failed(writing.error)
            return
        if self.size is None and not self._private:
            # No length announced: room is made chunk by chunk, under max_size.
            if not self._store.reserve(len(chunk)):
                self._spill(None, "no_room")
                return
            self._reserved += len(chunk)
        await writing.put(chunk)

    async def _finish_file(self, writer: BlobWriter) -> None:
        """After the writing: the last partial block ``O_DIRECT`` held back."""
        assert self._writing is not None
        if self._writing.error is not None:
            self._write_failed(self._writing.error)
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, writer.finish)
        except OSError as exc:
            self._spill(exc)
        self._trim()

    def _write_failed(self, exc: Exception) -> None:
        if not isinstance(exc, OSError):
            raise self._store_failed(exc)
        self._spill(exc)

    def _store_failed(self, exc: Exception) -> DetourError:
        log.error("blob_store_crashed", digest=str(self.digest), error=repr(exc))
        return UpstreamInvalid("blob store failed")

    def _trim(self) -> None:
        """Let go of the oldest chunks of the window that nobody needs from memory: past the
        last ``WINDOW_BYTES``, those on disk; spilled, those every client has, or on disk."""
        floor, keep = self.on_disk, WINDOW_BYTES
        if self.spilled:
            floor = max(floor, min((r.position for r in self._readers), default=self.received))
            keep = 0
        window = self._window
        while window and self._window_bytes - len(window[0]) >= keep:
            end = self._window_start + len(window[0])
            if end > floor:
                break
            self._window_bytes -= len(window[0])
            self._window_start = end
            window.popleft()

    def _window_views(self, start: int, end: int) -> list[memoryview]:
        """Bytes ``[start, end)`` of the window (``start`` in it), in views of its chunks."""
        views = []
        offset = self._window_start
        for chunk in self._window:
            stop = offset + len(chunk)
            if stop > start:
                views.append(memoryview(chunk)[max(0, start - offset) : min(end, stop) - offset])
            offset = stop
            if offset >= end:
                break
        return views

    async def _room(self) -> None:
        """Spilled: wait for the window to have room, that is for the slowest client to take
        its oldest chunk; a client that holds the others back for ``slow_client`` is cut off."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._limits.slow_client
        while True:
            self._trim()
            if not self._readers:
                raise UpstreamInvalid("no client left for an uncached blob")
            if self._window_bytes < WINDOW_BYTES:
                return
            changed = self._changed
            try:
                async with asyncio.timeout_at(deadline):
                    await changed.wait()  # a client took bytes, or left
            except TimeoutError:
                needed = self._window_start + len(self._window[0])
                for reader in list(self._readers):
                    if reader.position < needed:
                        self._cut_off(reader)
                deadline = loop.time() + self._limits.slow_client

    def _spill(self, exc: OSError | None, reason: str = "") -> None:
        """Stop writing; the clients get the rest of the bytes from memory. ``exc`` is the
        disk's refusal; without one, ``reason`` says why the blob is not kept."""
        if exc is not None:
            self._cache_write_failed(exc)
        else:
            self._metrics.cache_write_failures.labels(reason).inc()
            log.info("blob_not_cached", digest=str(self.digest), reason=reason, size=self.size)
        self.spilled = True
        self._on_spill(self)

    def _cache_write_failed(self, exc: OSError) -> None:
        cache_write_failed(
            self._metrics, exc, "blob", "streaming without caching", digest=str(self.digest)
        )

    def _cut_off(self, reader: _Reader) -> None:
        """A client too slow to keep up with a spilled fetch: the others go on without it."""
        reader.too_slow = True
        self._readers.discard(reader)
        reader.gone = True
        self._notify()
        if reader.transport is not None:
            _reset(reader.transport)
        log.warning("slow_client_cut_off", digest=str(self.digest), after=self._limits.slow_client)

    def _release_file(self) -> None:
        """Delete the temp file once nobody needs it (a committed one has moved away)."""
        if self._done.is_set() and not self.committed and not self._readers:
            self._discard()

    def _discard(self) -> None:
        writing = self._writing
        if writing is not None and writing.busy:
            # Its file is not closed under a write: deleted once the writing thread is gone.
            writing.ended.add_done_callback(lambda _: self._discard())
            return
        if self._writer is not None:
            self._writer.discard()
        self._store.release(self._reserved)
        self._reserved = 0

    # --------------------------------------------------------------------- the clients

    def join(self, request: web.Request) -> _Reader:
        """Become a client of this fetch; synchronous, so a spill can't slip in between."""
        assert not self.spilled
        reader = _Reader(transport=request.transport)
        self._readers.add(reader)
        return reader

    def _leave(self, reader: _Reader) -> None:
        reader.gone = True
        self._readers.discard(reader)
        self._notify()

    async def headers_ready(self) -> None:
        """Wait for the upstream's answer; raise its error if it failed before any bytes."""
        while self.state is _State.OPENING:
            await self._changed.wait()
        if self.state is _State.FAILED and self.received == 0:
            assert self.error is not None
            raise self.error

    async def finished(self) -> None:
        """Wait for the end of the fetch, commit included; raise its error if it failed."""
        await self._done.wait()
        if self.state is _State.FAILED:
            assert self.error is not None
            raise self.error

    async def serve(self, request: web.Request, reader: _Reader) -> web.StreamResponse:
        final = self._store.blob_path(self.digest)
        self._store.pin(final)  # once committed, not evicted while this reader reads it
        try:
            await self.headers_ready()
            assert self._writer is not None
            source = self._open_file(self._writer)
            try:
                return await self._stream(request, reader, source)
            finally:
                if source is not None:
                    source.close()
        finally:
            self._leave(reader)
            self._store.unpin(final)
            self._release_file()

    def _open_file(self, writer: BlobWriter) -> IO[bytes] | None:
        """The file this fetch writes, wherever it is now (committed: in the cache)."""
        # Moved into the cache meanwhile (the final file holds the same verified bytes), or
        # not kept and deleted: then every byte comes from memory.
        for path in (writer.path, writer.final):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    return open(path, "rb", buffering=0)
        return None

    async def _stream(
        self, request: web.Request, reader: _Reader, source: IO[bytes] | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=blob_headers(self.digest, self.size))
        await response.prepare(request)
        fields = request[LOG]
        fields["bytes"] = 0  # kept current as bytes go out, for the access log
        try:
            while True:
                changed = self._changed
                if self.state is _State.FAILED:
                    raise self.error or UpstreamInvalid("blob fetch failed")
                if reader.too_slow:
                    raise UpstreamTimeout(
                        "client too slow for a blob streamed from memory (the cache disk is "
                        "full); resume with a Range request"
                    )
                limit = self._window_start + self._window_bytes  # every byte received so far
                if self.state is not _State.VERIFIED and self.size is not None:
                    limit = min(limit, self.size - 1)  # the last byte waits for verification
                if reader.position >= limit:
                    if self.state is _State.VERIFIED:
                        break
                    await changed.wait()
                elif reader.position >= self._window_start:
                    await self._send_window(response, reader, limit, fields)
                elif source is not None and reader.position < self.on_disk:
                    # Behind the window: from the file, catching up.
                    await self._send(request, response, source, min(limit, self.on_disk), fields)
                    reader.position = fields["bytes"]
                else:
                    raise UpstreamInvalid("blob bytes neither in memory nor on disk")
        except DetourError as exc:
            # Bytes already went out under a 200: abort, so the client can't take them as whole.
            fields["aborted"] = exc.message
            if request.transport is not None:
                request.transport.abort()
            return response
        except ConnectionError:
            # The client hung up (kubelet cancels pulls routinely), or was cut off for being
            # too slow. It got a 200 and fields["bytes"]; the fetch goes on for the cache.
            fields["aborted"] = "too slow" if reader.too_slow else CLIENT_DISCONNECTED
            response.force_close()
            return response
        except asyncio.CancelledError:
            fields["aborted"] = "cancelled"
            raise
        await response.write_eof()
        return response

    async def _send_window(
        self, response: web.StreamResponse, reader: _Reader, limit: int, fields: dict[str, Any]
    ) -> None:
        """Send the window's bytes from the reader's position up to ``limit``, as the socket
        takes them (the views keep their chunks alive if the window lets go of them)."""
        for view in self._window_views(reader.position, limit):
            await response.write(view)
            reader.position = fields["bytes"] = reader.position + len(view)
            if self.spilled:
                self._notify()  # the fetch may be waiting for this client

    @staticmethod
    async def _send(
        request: web.Request,
        response: web.StreamResponse,
        source: IO[bytes],
        limit: int,
        fields: dict[str, Any],
    ) -> None:
        """Send the file's bytes from ``fields["bytes"]`` up to ``limit``, counting them there."""
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        offset = fields["bytes"]
        if response.chunked:
            while offset < limit:
                data = os.pread(source.fileno(), min(limit - offset, CHUNK_BYTES), offset)
                if not data:
                    raise UpstreamInvalid("cached bytes vanished")
                await response.write(data)
                fields["bytes"] = offset = offset + len(data)
            return
        # Headers went out in prepare(); the body goes file → socket in the kernel.
        try:
            await asyncio.get_running_loop().sendfile(transport, source, offset, limit - offset)
        except ConnectionError:
            # loop.sendfile leaves the file position after the last byte it sent, even when
            # it fails (and where the previous call left it, if it sent none).
            fields["bytes"] = max(offset, source.tell())
            raise
        fields["bytes"] = limit


# ----------------------------------------------------------------------------- hits
#
# A hit is verified as it is sent. A fetch that puts a blob in the cache takes an XXH3-64 of
# each of its HIT_CHUNK_BYTES chunks from the very bytes whose digest it verified, and they are
# kept in memory (:class:`Checksums`). A hit checks each chunk against its sum in a worker
# thread before sendfile sends it, the next chunk checked while this one goes out: a file that
# changed (bit rot, a failing disk, a stray writer, a truncation) is caught before a wrong byte
# leaves; the response is aborted with only right bytes sent (a client that resumes it with a
# Range gets the rest from a fresh copy), and the entry is dropped. A blob without checksums
# (the first hit after a restart) is hashed (sha256) as it is sent, its last byte held back
# until the digest matches, as on a miss; that pass takes its checksums for the next hits.
# XXH3 rather than CRC-32: four times as fast here (24 vs 6 GB/s), so checking a hit costs a
# sixth of a core at the mirror's pace instead of most of one.

HIT_CHUNK_BYTES = CHECKED_CHUNK_BYTES  # sent with one sendfile, and checked, at a time
HASH_READ_BYTES = 1 << 20  # one read of the checking thread
# Without checksums, a blob this small (configs, small layers) is hashed before its headers go
# out, so a bad copy is a miss the client never notices.
VERIFY_FIRST_BYTES = 8 << 20
CHECKSUMS_KEPT = 65536  # blobs whose chunk checksums are kept (the oldest go first)
CORRUPT = "cached blob corrupt"  # the access log's ``aborted`` when a hit fails its check
_UNREADABLE = -1


class _Corrupt(Exception):
    """A cached blob that does not match its digest, its checksums or its size."""


class _CachedFile:
    """A cached blob opened for one response (:class:`Blobs` pins its entry meanwhile).

    The file stays open, so what is checked and what is sent are one file even if the entry is
    evicted or replaced meanwhile. ``size`` is the size at open: the response promises that,
    and a file that shrinks under it fails. Reads for checking use ``pread`` in a worker
    thread (the file position is sendfile's), one job at a time; :meth:`close` waits for it.
    """

    def __init__(self, path: Path, digest: Digest, known: Checksums | None) -> None:
        self.path = path
        self.digest = digest
        self.file: IO[bytes] = open(path, "rb", buffering=0)  # noqa: SIM115 (see close)
        stat = os.fstat(self.file.fileno())
        self.identity = (stat.st_dev, stat.st_ino)
        self.size = stat.st_size
        # Checksums taken from this very file (another one, fetched again since, is hashed
        # whole); at another size than then, it changed: cut short, or written to.
        same_file = known is not None and known.identity == self.identity
        self.checksums = known if same_file else None
        self.verified = False  # the whole file hashed, and it matched
        self.hashed = 0
        self.last = b""  # the final byte, as it was hashed: sent from here
        self._hasher = digest.hasher()
        self._sums: array[int] = array("Q")
        self._buffer = bytearray(min(HASH_READ_BYTES, max(1, self.size)))
        self._job: asyncio.Future[int] | None = None

    # Blocking, in a worker thread. Errors are return values: a job nobody awaits any more
    # (its response was aborted) must not leave an exception behind.

    def _read(self, offset: int, count: int, digest: bool) -> tuple[int, int]:
        """How many of ``count`` bytes from ``offset`` there were (fewer: the file ended), and
        their XXH3-64; with ``digest``, they go into the sha256 too."""
        fd, view = self.file.fileno(), memoryview(self._buffer)
        done = 0
        chunk_sum = xxhash.xxh3_64()
        while done < count:
            n = os.preadv(fd, [view[: min(len(view), count - done)]], offset + done)
            if n == 0:
                break
            if digest:
                self._hasher.update(view[:n])
            chunk_sum.update(view[:n])
            done += n
            if offset + done == self.size:
                self.last = bytes(view[n - 1 : n])
        return done, chunk_sum.intdigest()

    def _hash_job(self, count: int) -> int:
        try:
            done, chunk_sum = self._read(self.hashed, count, digest=True)
        except OSError:
            return _UNREADABLE
        if done == count:
            self._sums.append(chunk_sum)
        return done

    def _check_job(self, index: int) -> int:
        assert self.checksums is not None
        if index >= len(self.checksums.sums):
            return 0
        offset = index * HIT_CHUNK_BYTES
        count = min(HIT_CHUNK_BYTES, self.size - offset)
        try:
            done, chunk_sum = self._read(offset, count, digest=False)
        except OSError:
            return _UNREADABLE
        return int(done == count and chunk_sum == self.checksums.sums[index])

    def _submit(self, job: Callable[[int], int], arg: int) -> asyncio.Future[int]:
        # Submitted now, not when the loop next runs a task: a sendfile can keep the loop
        # busy for a whole chunk, and the job is meant to run alongside it.
        assert self._job is None or self._job.done()
        self._job = asyncio.get_running_loop().run_in_executor(None, job, arg)
        return self._job

    # On the event loop.

    def hash_next(self, count: int) -> Awaitable[None]:
        """Start hashing the next ``count`` bytes (a chunk, or the rest) now; the awaitable
        raises :class:`_Corrupt` if the file is short of them or, at its end, wrong."""
        return self._hashed(self._submit(self._hash_job, count), count)

    async def _hashed(self, job: asyncio.Future[int], count: int) -> None:
        done = await job
        if done == _UNREADABLE:
            raise _Corrupt("unreadable")
        self.hashed += done
        if done < count:
            raise _Corrupt(f"the file shrank to {self.hashed} bytes from {self.size}")
        if self.hashed == self.size:
            if self._hasher.hexdigest() != self.digest.hex:
                raise _Corrupt("does not match its digest")
            self.verified = True
            self.checksums = Checksums(self.identity, self.size, self._sums)

    async def verify(self) -> None:
        """Hash the whole file, a chunk per job (a big file does not hold a worker thread
        that fetches need); raise :class:`_Corrupt` if it is wrong."""
        if self.size == 0:
            await self.hash_next(0)
        while not self.verified:
            await self.hash_next(min(HIT_CHUNK_BYTES, self.size - self.hashed))

    def check(self, index: int) -> Awaitable[None]:
        """Start checking chunk ``index`` against its checksum now; the awaitable raises
        :class:`_Corrupt` if it does not match."""
        return self._checked(self._submit(self._check_job, index), index)

    async def _checked(self, job: asyncio.Future[int], index: int) -> None:
        result = await job
        if result != 1:
            where = f"chunk {index} (from byte {index * HIT_CHUNK_BYTES})"
            reason = "unreadable" if result == _UNREADABLE else "does not match its checksum"
            raise _Corrupt(f"{where} {reason}")

    def close(self) -> None:
        """Close the file, once the job reading it (if any) is done."""
        if self._job is not None and not self._job.done():
            self._job.add_done_callback(lambda _: self.file.close())
        else:
            self.file.close()

    def still_in_place(self) -> bool:
        """Whether the cache's file at ``path`` is still the one this opened."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        return (stat.st_dev, stat.st_ino) == self.identity


def _byte_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """The bytes ``[start, end)`` a ``Range`` header asks for, or None if they can't be had
    (416). One range, parsed by aiohttp as for its file responses. ``If-Range`` needs no
    check: a blob is named by its digest, so every validator a client holds is still true."""
    try:
        asked = request.http_range
    except ValueError:
        return None
    start, stop = asked.start, asked.stop
    if start is None:
        return 0, size
    if start < 0:  # bytes=-N: the last N
        start, stop = max(0, size + start), size
    elif stop is None or stop > size:
        stop = size
    if start >= size:
        return None
    return start, stop


async def _sendfile(
    request: web.Request, cached: _CachedFile, end: int, fields: dict[str, Any], first: int = 0
) -> None:
    """Send the file from ``first + fields["bytes"]`` up to ``end``, counting them in
    ``fields["bytes"]``, file → socket in the kernel."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    offset = first + fields["bytes"]
    try:
        sent = await asyncio.get_running_loop().sendfile(
            transport, cached.file, offset, end - offset
        )
    except ConnectionError:
        # loop.sendfile leaves the file position after the last byte it sent, even when it
        # fails (and where the previous call left it, if it sent none).
        fields["bytes"] = max(offset, cached.file.tell()) - first
        raise
    fields["bytes"] = offset + sent - first
    if sent < end - offset:
        raise _Corrupt(f"the file shrank to {offset + sent} bytes from {cached.size}")


def _first_byte(request: web.Request, size: int) -> int:
    """Where the response starts: 0, or the start of the Range asked for."""
    wanted = _byte_range(request, size) if request.headers.get("Range") else None
    return 0 if wanted is None else wanted[0]


class Blobs:
    """The blob side of the proxy: disk hits, shared fetches, upstream HEADs."""

    def __init__(
        self,
        store: CacheStore,
        upstream: UpstreamClient,
        metrics: Metrics,
        limits: FetchLimits,
        slots: FetchSlots,
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self._limits = limits
        self._slots = slots
        self._inflight: dict[Digest, BlobFetch] = {}
        self._tasks: dict[asyncio.Task[None], BlobFetch] = {}
        self._checksums: dict[Path, Checksums] = {}  # oldest first
        self._stuck: set[tuple[int, int]] = set()  # corrupt files the disk kept

    async def close(self) -> None:
        """Stop fetching; fetches already verified may finish putting their blob in the cache."""
        committing = [t for t, f in self._tasks.items() if f.state is _State.VERIFIED]
        if committing:
            await asyncio.wait(committing, timeout=CLOSE_GRACE_SECONDS)
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _count(self, request: web.Request, result: str) -> None:
        request[LOG]["cache"] = result
        self._metrics.cache_requests.labels("blob", result).inc()

    async def get(
        self,
        request: web.Request,
        route: Route,
        digest: Digest,
        client_auth: str | None,
    ) -> web.StreamResponse:
        path = self._store.blob_path(digest)
        cached = await self._open_cached(request, path, digest)
        if cached is not None:
            return await self._from_disk(request, cached)
        shared = client_auth is None  # a client's own credentials fetch for it alone
        fetch = self._inflight.get(digest) if shared else None
        if fetch is not None and fetch.state is _State.VERIFIED:
            # Verified, being made durable: in the cache in a moment.
            await fetch.finished()
            cached = await self._open_cached(request, path, digest) if fetch.committed else None
            if cached is not None:
                return await self._from_disk(request, cached)
            fetch = None
        if fetch is None or fetch.spilled:
            fetch = self._start(route, digest, client_auth, shared=shared)
            # A miss asked first of the site's owner of the blob (proxy.cluster.peering) is "peer".
            asked_peer = bool(route.upstreams) and route.upstreams[0].peer
            self._count(request, "bypass" if not shared else "peer" if asked_peer else "miss")
        else:
            self._count(request, "joined")
        if request.headers.get("Range") and shared:
            # A range of a blob not yet verified could be wrong bytes under a 206: wait for
            # the fetch (which the whole pull needs anyway), then answer from the cache.
            fetch.waiting += 1
            try:
                await fetch.finished()
            finally:
                fetch.waiting -= 1
            request[LOG].update(upstream=fetch.source, source="cache")
            cached = await self._open_cached(request, path, digest) if fetch.committed else None
            if cached is not None:
                return await self._send_cached(request, cached)
            # Verified but not kept (the disk is full), or gone since: the whole blob, as a
            # 200, is a valid answer to a Range request.
            fetch = self._start(route, digest, client_auth, shared=False)
        response = await fetch.serve(request, fetch.join(request))
        request[LOG].update(upstream=fetch.source, source="upstream")
        return response

    async def _open_cached(
        self, request: web.Request, path: Path, digest: Digest
    ) -> _CachedFile | None:
        """The cached blob, opened and pinned for a response, with its first chunk checked
        (or, without checksums, the whole file hashed if it is small or a Range is asked
        for). None if it is not there (never cached, or evicted or dropped since) or failed
        that check: the caller fetches it as on a miss, and the client never knows."""
        try:
            cached = _CachedFile(path, digest, self._checksums.get(path))
        except FileNotFoundError:
            return None
        if cached.identity in self._stuck:
            cached.close()
            return None
        self._store.pin(path)
        try:
            await self._check_first(request, cached)
        except _Corrupt as exc:
            self._corrupt(cached, exc)
            self._release(cached)
            return None
        except BaseException:
            self._release(cached)
            raise
        self._store.touch(path)
        return cached

    async def _check_first(self, request: web.Request, cached: _CachedFile) -> None:
        """What is checked before the headers go out; raise :class:`_Corrupt` if it fails."""
        known = cached.checksums
        if known is not None:
            if known.size != cached.size:
                raise _Corrupt(f"its size changed from {known.size} to {cached.size}")
            if cached.size:
                await cached.check(_first_byte(request, cached.size) // HIT_CHUNK_BYTES)
        elif request.headers.get("Range") or cached.size <= VERIFY_FIRST_BYTES:
            # A 206 can't be verified as it is sent: the whole file is hashed first.
            await cached.verify()
            self._remember(cached)

    async def _from_disk(self, request: web.Request, cached: _CachedFile) -> web.StreamResponse:
        self._count(request, "hit")
        request[LOG]["source"] = "cache"
        return await self._send_cached(request, cached)

    async def _send_cached(self, request: web.Request, cached: _CachedFile) -> web.StreamResponse:
        """Send a cached blob (whole, or the Range asked for), then close and unpin it.

        On a check that fails after the headers went out, the connection is aborted (no
        client takes what it got for a whole blob) and the entry dropped, so the next request
        fetches it again.
        """
        fields = request[LOG]
        try:
            headers = blob_headers(cached.digest, cached.size)
            headers["Accept-Ranges"] = "bytes"
            status, first, end = 200, 0, cached.size
            if request.headers.get("Range"):
                wanted = _byte_range(request, cached.size)
                if wanted is None:
                    return web.Response(
                        status=416, headers={"Content-Range": f"bytes */{cached.size}"}
                    )
                (first, end), status = wanted, 206
                headers["Content-Length"] = str(end - first)
                headers["Content-Range"] = f"bytes {first}-{end - 1}/{cached.size}"
            response = web.StreamResponse(status=status, headers=headers)
            await response.prepare(request)
            fields["bytes"] = 0  # kept current as bytes go out, for the access log
            try:
                if cached.checksums is not None and not cached.verified:
                    await self._send_checked(request, cached, first, end, fields)
                elif not cached.verified:
                    await self._send_hashing(request, response, cached, fields)
                    self._remember(cached)
                elif end > first:
                    await _sendfile(request, cached, end, fields, first)
            except _Corrupt as exc:
                # Bytes already went out under a 200: abort, so the client can't take them
                # as whole.
                fields["aborted"] = CORRUPT
                if request.transport is not None:
                    request.transport.abort()
                self._corrupt(cached, exc)
                return response
            except ConnectionError:
                # The client hung up (kubelet cancels pulls routinely). It got a 200 and
                # fields["bytes"].
                fields["aborted"] = CLIENT_DISCONNECTED
                response.force_close()
                return response
            except asyncio.CancelledError:
                fields["aborted"] = "cancelled"
                raise
            await response.write_eof()
            return response
        finally:
            self._release(cached)

    @staticmethod
    async def _send_checked(
        request: web.Request, cached: _CachedFile, first: int, end: int, fields: dict[str, Any]
    ) -> None:
        """Bytes ``[first, end)``, each chunk sent once it matched its checksum (the first
        was checked before the headers), the next checked while this one goes out."""
        index = first // HIT_CHUNK_BYTES
        while first + fields["bytes"] < end:
            stop = min(end, (index + 1) * HIT_CHUNK_BYTES)
            checking = cached.check(index + 1) if stop < end else None
            try:
                await _sendfile(request, cached, stop, fields, first)
            finally:
                if checking is not None:
                    await checking  # raises if the next chunk is wrong: it is not sent
            index += 1

    @staticmethod
    async def _send_hashing(
        request: web.Request,
        response: web.StreamResponse,
        cached: _CachedFile,
        fields: dict[str, Any],
    ) -> None:
        """Without checksums: all but the last byte with sendfile while a worker thread hashes
        the same chunk; the last byte, as it was hashed, once the digest matches."""
        held = cached.size - 1
        while not cached.verified:
            count = min(HIT_CHUNK_BYTES, cached.size - cached.hashed)
            end = min(cached.hashed + count, held)
            hashing = cached.hash_next(count)
            try:
                if end > fields["bytes"]:
                    await _sendfile(request, cached, end, fields)
            finally:
                await hashing
        await response.write(cached.last)
        fields["bytes"] = cached.size

    def _release(self, cached: _CachedFile) -> None:
        cached.close()
        self._store.unpin(cached.path)

    def _remember(self, cached: _CachedFile) -> None:
        """Keep the checksums a whole verified pass over the file took, for its next hits."""
        if cached.checksums is not None:
            self._keep(cached.checksums, cached.path)

    def _keep(self, checksums: Checksums, path: Path) -> None:
        self._checksums.pop(path, None)
        self._checksums[path] = checksums
        if len(self._checksums) > CHECKSUMS_KEPT:
            del self._checksums[next(iter(self._checksums))]

    def _corrupt(self, cached: _CachedFile, exc: _Corrupt) -> None:
        """A cached blob that is not what its name says (bit rot, a failing disk, a stray
        writer): counted, logged, and dropped, so the next request fetches it again. One the
        disk won't let go of (read-only) is passed over from then on: a miss every time."""
        # Counted with the upstreams' mismatches, under the registry label "cache".
        self._metrics.verify_failures.labels("blob", CACHE).inc()
        self._checksums.pop(cached.path, None)
        if cached.still_in_place() and not self._store.drop(cached.path):
            self._stuck.add(cached.identity)
        log.error(
            "cached_blob_corrupt",
            digest=str(cached.digest),
            reason=str(exc),
            size=cached.size,
            action="dropped; fetched again on the next request",
        )

    async def _head_while_fetching(
        self, request: web.Request, fetch: BlobFetch
    ) -> web.StreamResponse:
        await fetch.headers_ready()
        request[LOG]["upstream"] = fetch.source
        return web.Response(headers=blob_headers(fetch.digest, fetch.size))

    def _start(
        self, route: Route, digest: Digest, client_auth: str | None, *, shared: bool
    ) -> BlobFetch:
        fetch = BlobFetch(
            digest,
            route,
            client_auth,
            store=self._store,
            upstream=self._upstream,
            metrics=self._metrics,
            limits=self._limits,
            slots=self._slots,
            on_spill=self._forget,
        )
        task = asyncio.create_task(fetch.run(), name=f"fetch {digest}")
        self._tasks[task] = fetch
        if shared:
            self._inflight[digest] = fetch

        def done(_: asyncio.Task[None]) -> None:
            self._tasks.pop(task, None)
            self._forget(fetch)
            if fetch.committed and fetch.checksums is not None:
                self._keep(fetch.checksums, self._store.blob_path(fetch.digest))

        task.add_done_callback(done)
        return fetch

    def _forget(self, fetch: BlobFetch) -> None:
        """No new clients for this fetch: it ended, or spilled and can't take late joiners."""
        if self._inflight.get(fetch.digest) is fetch:
            del self._inflight[fetch.digest]

    async def head(
        self,
        request: web.Request,
        route: Route,
        digest: Digest,
        client_auth: str | None,
    ) -> web.StreamResponse:
        """HEAD never downloads a body: disk, an in-flight fetch, or an upstream HEAD."""
        size = self._store.blob_size(digest)
        if size is not None:
            self._count(request, "hit")
            return web.Response(headers=blob_headers(digest, size))
        fetch = self._inflight.get(digest)
        if fetch is not None and client_auth is None:
            self._count(request, "joined")
            return await self._head_while_fetching(request, fetch)
        self._count(request, "miss")
        async with await self._upstream.open(
            route, "HEAD", f"blobs/{digest}", client_auth=client_auth
        ) as answer:
            request[LOG]["upstream"] = answer.where
            if answer.status != 200:
                raise answer.refusal(_unknown(digest))
            length = answer.response.content_length
            return web.Response(headers=blob_headers(digest, length))
