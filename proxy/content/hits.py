"""Cache hits: a cached blob sent whole or by ``Range``, each chunk checked on its way out.

A hit is verified as it is sent (see :mod:`proxy.cache.cached_file`): each chunk is read into a
buffer, checked against its sum there, and sent from there. A file that changed (bit rot, a
failing disk, a stray writer, a truncation) is caught before a wrong byte leaves: the response
is aborted with only right bytes sent (a client that resumes it with a Range gets the rest from
a fresh copy), and the entry is dropped, so the next request fetches it again. A blob without
checksums is hashed as it is sent, its last chunk held back until the digest matches, as the
last byte is on a miss.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from proxy.cache.cached_file import CachedFile, Corrupt
from proxy.cache.checksums import Checksums
from proxy.cache.store import CacheStore
from proxy.content.headers import blob_headers, range_headers, unsatisfiable_headers
from proxy.content.outcome import Abort, Outcome, send_body
from proxy.logs import get_logger
from proxy.memory import CHECKED_CHUNK_BYTES
from proxy.metrics import CACHE, Metrics
from proxy.reference import Digest

# Without checksums, a blob this small (configs, small layers) is hashed before its headers go
# out, so a bad copy is a miss the client never notices.
VERIFY_FIRST_BYTES = 8 << 20
CHECKSUMS_KEPT = 65536  # blobs whose chunk checksums are kept (the oldest go first)
CORRUPT = "cached blob corrupt"  # the access log's ``aborted`` when a hit fails its check

log = get_logger("detour.blobs")


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


def _first_byte(request: web.Request, size: int) -> int:
    """Where the response starts: 0, or the start of the Range asked for."""
    wanted = _byte_range(request, size) if request.headers.get("Range") else None
    return 0 if wanted is None else wanted[0]


class Hits:
    """Cached blobs opened, checked and sent; the checksums of the blobs last verified."""

    def __init__(self, store: CacheStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._checksums: dict[Path, Checksums] = {}  # oldest first
        self._stuck: set[tuple[int, int]] = set()  # corrupt files the disk kept

    async def open(self, request: web.Request, digest: Digest) -> CachedFile | None:
        """The cached blob, opened and pinned for a response, with its first chunk checked
        (or, without checksums, the whole file hashed if it is small or a Range is asked
        for). None if it is not there (never cached, or evicted or dropped since) or failed
        that check: the caller fetches it as on a miss, and the client never knows."""
        path = self._store.blob_path(digest)
        try:
            cached = CachedFile(path, digest, self._checksums.get(path))
        except FileNotFoundError:
            return None
        if cached.identity in self._stuck:
            cached.close()
            return None
        self._store.pin(path)
        try:
            await self._check_first(request, cached)
        except Corrupt as exc:
            self._corrupt(cached, exc)
            self._release(cached)
            return None
        except BaseException:
            self._release(cached)
            raise
        self._store.touch(path)
        if cached.checksums is not None:
            self.keep(cached.checksums, path)  # read from the file's attribute, perhaps
        return cached

    async def _check_first(self, request: web.Request, cached: CachedFile) -> None:
        """What is checked before the headers go out; raise :class:`Corrupt` if it fails."""
        known = cached.checksums
        if known is not None:
            if known.size != cached.size:
                raise Corrupt(f"its size changed from {known.size} to {cached.size}")
            if cached.size:
                await cached.chunk(_first_byte(request, cached.size) // CHECKED_CHUNK_BYTES)
        elif request.headers.get("Range") or cached.size <= VERIFY_FIRST_BYTES:
            # A 206 can't be verified as it is sent: the whole file is hashed first.
            await cached.verify()
            self._remember(cached)

    async def send(
        self, request: web.Request, cached: CachedFile, outcome: Outcome
    ) -> web.StreamResponse:
        """Send a cached blob (whole, or the Range asked for), then close and unpin it.

        On a check that fails after the headers went out, the connection is aborted (no
        client takes what it got for a whole blob) and the entry dropped, so the next request
        fetches it again.
        """
        try:
            headers = blob_headers(cached.digest, cached.size)
            status, first, end = 200, 0, cached.size
            if request.headers.get("Range"):
                wanted = _byte_range(request, cached.size)
                if wanted is None:
                    return web.Response(status=416, headers=unsatisfiable_headers(cached.size))
                (first, end), status = wanted, 206
                headers = range_headers(cached.digest, cached.size, first, end)
            response = web.StreamResponse(status=status, headers=headers)
            await response.prepare(request)
            outcome.streamed = True  # its bytes counted as they go out, for the access log
            body = self._send_body(response, cached, first, end, outcome)
            return await send_body(request, response, outcome, body)
        finally:
            self._release(cached)

    async def _send_body(
        self,
        response: web.StreamResponse,
        cached: CachedFile,
        first: int,
        end: int,
        outcome: Outcome,
    ) -> None:
        """Bytes ``[first, end)``, a chunk at a time, each read and checked before it is sent
        (without checksums, hashed: the last chunk waits for the digest); a chunk that fails
        its check is never sent, and drops the entry, so the next request fetches it again."""
        hashing = cached.checksums is None
        try:
            index = first // CHECKED_CHUNK_BYTES
            while first + outcome.bytes < end:
                view = await cached.chunk(index)
                start = index * CHECKED_CHUNK_BYTES
                part = view[first + outcome.bytes - start : end - start]
                await response.write(part)
                outcome.bytes += len(part)
                index += 1
        except Corrupt as exc:
            self._corrupt(cached, exc)
            raise Abort(CORRUPT) from exc
        if hashing:
            self._remember(cached)

    def _release(self, cached: CachedFile) -> None:
        cached.close()
        self._store.unpin(cached.path)

    def _remember(self, cached: CachedFile) -> None:
        """Keep the checksums a whole verified pass over the file took, for its next hits."""
        if cached.checksums is not None:
            self.keep(cached.checksums, cached.path)

    def keep(self, checksums: Checksums, path: Path) -> None:
        self._checksums.pop(path, None)
        self._checksums[path] = checksums
        if len(self._checksums) > CHECKSUMS_KEPT:
            del self._checksums[next(iter(self._checksums))]

    def _corrupt(self, cached: CachedFile, exc: Corrupt) -> None:
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
