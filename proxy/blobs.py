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
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from proxy.cache import BlobWriter, CacheStore
from proxy.errors import (
    BlobUnknown,
    DetourError,
    UpstreamError,
    UpstreamInvalid,
)
from proxy.logs import CLIENT_DISCONNECTED, LOG, get_logger
from proxy.metrics import Metrics
from proxy.reference import Digest
from proxy.rules import Route
from proxy.upstream import UpstreamClient, UpstreamResponse

CHUNK_BYTES = 1 << 20
MAX_RESUMES = 3
CLOSE_GRACE_SECONDS = 10.0  # at shutdown, for verified blobs to reach the cache
PIPELINE_CHUNKS = 8  # received chunks waiting to be hashed and written
SPILL_QUEUE_CHUNKS = 4  # per reader, after a spill: at most this many chunks in memory
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
        on_spill: Callable[[BlobFetch], None] = lambda _: None,
    ) -> None:
        self.digest = digest
        self.route = route
        self._client_auth = client_auth
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self._on_spill = on_spill
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
        self._metrics.inflight_fetches.inc()
        try:
            await self._fetch()
        except Exception as exc:  # every failure is reported to this fetch's clients
            self.error = (
                exc if isinstance(exc, DetourError) else UpstreamInvalid("blob fetch failed")
            )
            if not isinstance(exc, DetourError):
                log.exception("blob_fetch_crashed", digest=str(self.digest))
            self.state = _State.FAILED
        finally:
            self._metrics.inflight_fetches.dec()
            self._done.set()
            for reader in self._readers:
                if reader.queue is not None:
                    reader.queue.put_nowait(None)  # a slot is always free: see _deliver
            self._release_file()
            self._notify()

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
        private = response.private
        self._writer = writer = self._store.begin_blob(self.digest)
        if writer.failure is not None:
            self._spill(writer.failure)
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
        self._store.admit(writer.final, writer.size)

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
                        await chunks.put(chunk)
            except UpstreamError as exc:
                # Dropped mid-blob: resume from the byte reached, a bounded number of times.
                if isinstance(exc, UpstreamInvalid) or resumes >= MAX_RESUMES:
                    raise
                resumes += 1
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

    def _spill(self, exc: OSError) -> None:
        self._cache_write_failed(exc)
        self.spilled = True
        for reader in self._readers:
            reader.queue = asyncio.Queue(maxsize=SPILL_QUEUE_CHUNKS)
        self._on_spill(self)

    def _cache_write_failed(self, exc: OSError) -> None:
        reason = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io_error"
        self._metrics.cache_write_failures.labels(reason).inc()
        log.warning(
            "cache_write_failed",
            digest=str(self.digest),
            reason=reason,
            error=exc.strerror,
            action="streaming without caching",
        )

    async def _deliver(self, chunk: bytes) -> None:
        if not self._readers:
            raise UpstreamInvalid("no client left for an uncached blob")
        for reader in list(self._readers):
            if not reader.gone and reader.queue is not None:
                # Keep one slot free for the end marker that run() puts without waiting.
                while reader.queue.qsize() >= SPILL_QUEUE_CHUNKS - 1 and not reader.gone:
                    await self._changed.wait()  # the reader took a chunk, or left
                if not reader.gone:
                    reader.queue.put_nowait(chunk)

    def _release_file(self) -> None:
        """Delete the temp file once nobody needs it (a committed one has moved away)."""
        finished = self._done.is_set()
        if finished and self._writer is not None and not self.committed and not self._readers:
            self._writer.discard()

    # --------------------------------------------------------------------- the clients

    def join(self) -> _Reader:
        """Become a client of this fetch; synchronous, so a spill can't slip in between."""
        assert not self.spilled
        reader = _Reader()
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
            # The client hung up (kubelet cancels pulls routinely). It got a 200 and
            # fields["bytes"]; the fetch goes on for the cache.
            fields["aborted"] = CLIENT_DISCONNECTED
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
        except ConnectionError:
            # loop.sendfile leaves the file position after the last byte it sent, even when
            # it fails (and where the previous call left it, if it sent none).
            fields["bytes"] = max(offset, source.tell())
            raise
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
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
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
            self._count(request, "miss" if shared else "bypass")
        else:
            self._count(request, "joined")
        if request.headers.get("Range") and shared:
            # A range of a blob not yet verified could be wrong bytes under a 206: wait for
            # the fetch (which the whole pull needs anyway), then answer from the cache.
            await fetch.finished()
            request[LOG].update(upstream=fetch.source, source="cache")
            if fetch.committed:
                return self._from_disk(path, digest)
            # Verified but not kept (the disk is full): the whole blob, as a 200, is a valid
            # answer to a Range request.
            fetch = self._start(route, digest, client_auth, shared=False)
        response = await fetch.serve(request, fetch.join())
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
