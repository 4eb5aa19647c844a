"""Blobs: served from disk on a hit, fetched once from upstream on a miss.

A miss starts a :class:`BlobFetch`, a background task that streams the upstream body into a
temp file, hashing as it writes. Every client of that blob (the first and any that arrive
while it runs) tails the growing file and sends bytes as they land, so:

* concurrent requests for a missing blob share one upstream GET;
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
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from proxy.cache import BlobWriter, CacheStore, cache_write_failed
from proxy.errors import (
    BlobUnknown,
    DetourError,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.logs import CLIENT_DISCONNECTED, LOG, get_logger
from proxy.metrics import Metrics
from proxy.reference import Digest
from proxy.rules import Route
from proxy.settings import Settings
from proxy.upstream import UpstreamClient, UpstreamResponse

CHUNK_BYTES = 256 * 1024
MAX_RESUMES = 3
CLOSE_GRACE_SECONDS = 10.0  # at shutdown, for verified blobs to reach the cache
PIPELINE_CHUNKS = 4  # received chunks waiting to be hashed and written
SPILL_QUEUE_CHUNKS = 4  # per reader, after a spill: at most this many chunks in memory
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
    """One client of a fetch. After a spill its bytes come through ``queue``."""

    queue: asyncio.Queue[bytes | None] | None = None
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


class BlobFetch:
    """One upstream fetch of one blob, into a temp file that its clients tail.

    If the disk refuses a write (full, or an I/O error) the fetch *spills*: it stops writing,
    keeps hashing, and hands the rest of the bytes to the clients it has through bounded
    in-memory queues (the slowest client sets the pace, so memory stays flat). A spilled fetch
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
        self.written = 0  # bytes received and hashed
        self.on_disk = 0  # bytes in the temp file, which readers tail
        self.spilled = False
        self._storing_failure: DetourError | None = None
        self.source = ""
        self.committed = False
        self._writer: BlobWriter | None = None
        self._readers: set[_Reader] = set()
        self._changed = asyncio.Event()
        self._done = asyncio.Event()  # verified and committed (or not kept), or failed

    # --------------------------------------------------------------------- the fetch

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

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
            for reader in self._readers:
                if reader.queue is not None:
                    reader.queue.put_nowait(None)  # a slot is always free: see _deliver
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
        return self.size is not None and self.written >= self.size * NEARLY_DONE

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
        window_start, window_bytes = loop.time(), self.written
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
                window_start, window_bytes = now, self.written  # the clock starts with bytes
            elif now - window_start >= limits.rate_window:
                rate = (self.written - window_bytes) / (now - window_start)
                if limits.min_rate is not None and rate < limits.min_rate:
                    return "too_slow", f"{rate:.0f} bytes/s, below upstream.min_rate"
                window_start, window_bytes = now, self.written

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
        # Receiving, hashing and writing overlap: the network loop runs ahead of the storing
        # task by up to PIPELINE_CHUNKS, and each chunk is hashed and written in two threads.
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=PIPELINE_CHUNKS)
        storing = asyncio.create_task(self._store_chunks(writer, chunks))
        try:
            await self._receive(response, chunks)
            await chunks.put(None)
            await storing
        finally:
            if not storing.done():
                storing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await storing
        if not writer.matches(self.size):
            self._metrics.verify_failures.labels(
                "blob", self._metrics.registry_label(self.route.upstreams[0].registry)
            ).inc()
            log.error(
                "blob_digest_mismatch",
                digest=str(self.digest),
                upstream=self.source,
                size=self.written,
                expected_size=self.size,
            )
            raise UpstreamInvalid(
                "upstream blob does not match its digest",
                {"digest": str(self.digest), "upstream": self.source},
            )
        # Verified: clients get their last byte now. Making the file durable (fsync, rename)
        # is for the cache, and happens after.
        self.state = _State.VERIFIED
        self._notify()
        if private or not writer.complete_on_disk:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, writer.sync)
            writer.commit()
        except OSError as exc:  # verified, but the disk would not keep it: served, not cached
            self._cache_write_failed(exc)
            return
        self.committed = True
        self._store.admit(writer.final, writer.size, self._reserved)
        self._reserved = 0

    async def _receive(
        self, response: UpstreamResponse, chunks: asyncio.Queue[bytes | None]
    ) -> None:
        """The body into ``chunks``, resuming with a Range request when the upstream drops."""
        resumes = 0
        while True:
            try:
                async with response:
                    async for chunk in response.chunks(CHUNK_BYTES):
                        if self._storing_failure is not None:
                            raise self._storing_failure
                        self.written += len(chunk)
                        if self.size is not None and self.written > self.size:
                            raise UpstreamInvalid(
                                "upstream sent more bytes than announced",
                                {"upstream": self.source},
                            )
                        if self.size is None and self.written > self._limits.max_blob_size:
                            raise UpstreamInvalid(
                                "upstream blob of no announced length is larger than "
                                f"cache.max_blob_size ({self._limits.max_blob_size} bytes)",
                                {"upstream": self.source},
                            )
                        await chunks.put(chunk)
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
                    offset=self.written,
                    attempt=resumes,
                    error=exc.message,
                )
                response = await self._open(self.written)
                continue
            if self.size is not None and self.written < self.size and resumes < MAX_RESUMES:
                resumes += 1
                response = await self._open(self.written)
                continue
            return

    async def _store_chunks(self, writer: BlobWriter, chunks: asyncio.Queue[bytes | None]) -> None:
        """Hash and write each chunk (or, spilled, hand it to the readers), in order. After a
        failure it keeps taking chunks, so the receiving loop never blocks on a dead consumer,
        and the loop stops at its next chunk."""
        loop = asyncio.get_running_loop()
        while (chunk := await chunks.get()) is not None:
            if self._storing_failure is not None:
                continue
            hashed = loop.run_in_executor(None, writer.update, chunk)
            try:
                if not self.spilled and self.size is None and not self._private:
                    # No length announced: room is made chunk by chunk, under max_size.
                    if self._store.reserve(len(chunk)):
                        self._reserved += len(chunk)
                    else:
                        self._spill(None, "no_room")
                if not self.spilled:
                    try:
                        await loop.run_in_executor(None, writer.write, chunk)
                    except OSError as exc:
                        self._spill(exc)
                    else:
                        self.on_disk = writer.on_disk
                if self.spilled:
                    await self._deliver(chunk)
            except Exception as exc:
                self._storing_failure = (
                    exc if isinstance(exc, DetourError) else UpstreamInvalid("blob store failed")
                )
            finally:
                await hashed
            self._notify()
        if self._storing_failure is not None:
            raise self._storing_failure

    def _spill(self, exc: OSError | None, reason: str = "") -> None:
        """Stop writing; hand the rest of the bytes to the clients from memory. ``exc`` is the
        disk's refusal; without one, ``reason`` says why the blob is not kept."""
        if exc is not None:
            self._cache_write_failed(exc)
        else:
            self._metrics.cache_write_failures.labels(reason).inc()
            log.info("blob_not_cached", digest=str(self.digest), reason=reason, size=self.size)
        self.spilled = True
        for reader in self._readers:
            reader.queue = asyncio.Queue(maxsize=SPILL_QUEUE_CHUNKS)
        self._on_spill(self)

    def _cache_write_failed(self, exc: OSError) -> None:
        cache_write_failed(
            self._metrics, exc, "blob", "streaming without caching", digest=str(self.digest)
        )

    async def _deliver(self, chunk: bytes) -> None:
        if not self._readers:
            raise UpstreamInvalid("no client left for an uncached blob")
        loop = asyncio.get_running_loop()
        for reader in list(self._readers):
            if not reader.gone and reader.queue is not None:
                # Keep one slot free for the end marker that run() puts without waiting.
                deadline = loop.time() + self._limits.slow_client
                while reader.queue.qsize() >= SPILL_QUEUE_CHUNKS - 1 and not reader.gone:
                    try:  # the reader took a chunk, or left
                        async with asyncio.timeout_at(deadline):
                            await self._changed.wait()
                    except TimeoutError:
                        self._cut_off(reader)
                if not reader.gone:
                    reader.queue.put_nowait(chunk)
        if not self._readers:
            raise UpstreamInvalid("no client left for an uncached blob")

    def _cut_off(self, reader: _Reader) -> None:
        """A client too slow to keep up with a spilled fetch: the others go on without it."""
        assert reader.queue is not None
        reader.too_slow = True
        self._readers.discard(reader)
        reader.gone = True
        while not reader.queue.empty():
            reader.queue.get_nowait()
        reader.queue.put_nowait(None)
        if reader.transport is not None:
            _reset(reader.transport)
        log.warning("slow_client_cut_off", digest=str(self.digest), after=self._limits.slow_client)

    def _release_file(self) -> None:
        """Delete the temp file once nobody needs it (a committed one has moved away)."""
        finished = self._done.is_set()
        if finished and self._writer is not None and not self.committed and not self._readers:
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
        if self.state is _State.FAILED and self.written == 0:
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
        if writer.path is None:
            return None
        try:
            return open(writer.path, "rb", buffering=0)
        except FileNotFoundError:
            if not self.committed:
                raise
            return open(writer.final, "rb", buffering=0)

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
                limit = self.on_disk
                if self.state is not _State.VERIFIED and self.size is not None:
                    limit = min(limit, self.size - 1)  # the last byte waits for verification
                if fields["bytes"] < limit and source is not None:
                    await self._send(request, response, source, limit, fields)
                elif self.spilled:
                    await self._stream_spilled(response, reader, fields)
                    break
                elif self.state is _State.VERIFIED:
                    break
                else:
                    await changed.wait()
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

    async def _stream_spilled(
        self, response: web.StreamResponse, reader: _Reader, fields: dict[str, Any]
    ) -> None:
        """The bytes after the spill, from this reader's queue, holding the last chunk back
        until the fetch is verified."""
        assert reader.queue is not None
        held: bytes | None = None
        while (chunk := await reader.queue.get()) is not None:
            self._notify()  # a slot is free: the fetch may go on
            if held is not None:
                await response.write(held)
                fields["bytes"] += len(held)
            held = chunk
        if reader.too_slow:
            raise UpstreamTimeout(
                "client too slow for a blob streamed from memory (the cache disk is full); "
                "resume with a Range request"
            )
        if self.state is not _State.VERIFIED:
            raise self.error or UpstreamInvalid("blob fetch failed")
        if held is not None:
            await response.write(held)
            fields["bytes"] += len(held)

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
        except (ConnectionError, RuntimeError) as exc:
            # The client hung up: a reset mid-send, or (asyncio's RuntimeError) a transport
            # already closing. loop.sendfile leaves the file position after the last byte it
            # sent, even when it fails (and where the previous call left it, if it sent none).
            if isinstance(exc, RuntimeError) and not transport.is_closing():
                raise
            fields["bytes"] = max(offset, source.tell())
            raise ConnectionResetError("client went away") from exc
        fields["bytes"] = limit


class _PinnedFile(web.FileResponse):
    """A cached blob sent with sendfile (and Range), unpinned once it has been sent."""

    def __init__(self, path: Path, store: CacheStore, *, headers: dict[str, str]) -> None:
        super().__init__(path, headers=headers)
        self._pinned: Path | None = path
        self._store = store

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(request)
        finally:
            self._unpin()

    async def _sendfile(
        self, request: BaseRequest, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        try:
            return await super()._sendfile(request, fobj, offset, count)
        except ConnectionError:
            # The client hung up. loop.sendfile leaves the file position after the last byte
            # it sent, even when it fails.
            fields = request.get(LOG)
            if fields is not None:
                fields.update(aborted=CLIENT_DISCONNECTED, bytes=max(0, fobj.tell() - offset))
            raise

    def _unpin(self) -> None:
        if self._pinned is not None:
            self._store.unpin(self._pinned)
            self._pinned = None

    def __del__(self) -> None:  # never prepared (the client left first): still unpin
        self._unpin()


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
        if path.is_file():
            self._count(request, "hit")
            request[LOG]["source"] = "cache"
            return self._from_disk(path, digest)
        shared = client_auth is None  # a client's own credentials fetch for it alone
        fetch = self._inflight.get(digest) if shared else None
        if fetch is not None and fetch.state is _State.VERIFIED:
            # Verified, being made durable: in the cache in a moment.
            await fetch.finished()
            if fetch.committed:
                self._count(request, "hit")
                request[LOG]["source"] = "cache"
                return self._from_disk(path, digest)
            fetch = None
        if fetch is None or fetch.spilled:
            fetch = self._start(route, digest, client_auth, shared=shared)
            # A miss asked first of the site's owner of the blob (proxy.cluster) is "peer".
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
            if fetch.committed:
                return self._from_disk(path, digest)
            # Verified but not kept (the disk is full): the whole blob, as a 200, is a valid
            # answer to a Range request.
            fetch = self._start(route, digest, client_auth, shared=False)
        response = await fetch.serve(request, fetch.join(request))
        request[LOG].update(upstream=fetch.source, source="upstream")
        return response

    def _from_disk(self, path: Path, digest: Digest) -> web.FileResponse:
        self._store.touch(path)
        self._store.pin(path)
        return _PinnedFile(path, self._store, headers=blob_headers(digest, None))

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
