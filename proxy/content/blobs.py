"""Blobs: served from disk on a hit, fetched once from upstream on a miss.

A miss starts a :class:`~proxy.content.fetch.Fetch`, a background task that streams the
upstream body into a temp file, hashing as it writes. Every client of that blob (the first and
any that arrive while it runs) is sent each chunk from memory as it arrives from the upstream,
while the same chunk is hashed and written alongside; a client that falls behind the fetch's
in-memory window of the last chunks reads the file instead, so the fetch never waits for one.
So:

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

from aiohttp import web

from proxy.cache.cached_file import CachedFile
from proxy.cache.sink import CLOSE_GRACE_SECONDS
from proxy.cache.store import CacheStore
from proxy.content.blob_body import blob_unknown
from proxy.content.fetch import Fetch
from proxy.content.fetch_limits import FetchLimits, FetchSlots
from proxy.content.fetch_state import State
from proxy.content.headers import blob_headers
from proxy.content.hits import Hits
from proxy.content.outcome import Outcome, Sharing
from proxy.content.streamer import client_patience, stream, waited_out
from proxy.errors import DetourError, NotHeld
from proxy.metrics import Metrics
from proxy.reference import Digest
from proxy.upstream.client import UpstreamClient
from proxy.upstream.rules import Route


class Blobs:
    """The blob side of the proxy: disk hits, shared fetches, upstream HEADs."""

    def __init__(
        self,
        store: CacheStore,
        upstream: UpstreamClient,
        metrics: Metrics,
        limits: FetchLimits,
        slots: FetchSlots,
        sharing: Sharing,
    ) -> None:
        self._store = store
        self._sharing = sharing
        self._upstream = upstream
        self._metrics = metrics
        self._limits = limits
        self._slots = slots
        self._inflight: dict[Digest, Fetch] = {}
        self._tasks: dict[asyncio.Task[None], Fetch] = {}
        self._hits = Hits(store, metrics)

    async def close(self) -> None:
        """Stop fetching; fetches already verified may finish putting their blob in the cache."""
        committing = [t for t, f in self._tasks.items() if f.state is State.VERIFIED]
        if committing:
            await asyncio.wait(committing, timeout=CLOSE_GRACE_SECONDS)
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def get(
        self,
        request: web.Request,
        route: Route,
        digest: Digest,
        client_auth: str | None,
        outcome: Outcome,
    ) -> web.StreamResponse:
        """The blob from the disk, or streamed as it is fetched, one fetch for all its clients;
        a Range of a blob not in the cache waits for the whole and is answered from there."""
        cached = await self._hits.open(request, digest)
        if cached is not None:
            return await self._from_disk(request, cached, outcome)
        shared = self._sharing.shared(client_auth)
        fetch = self._inflight.get(digest) if shared else None
        if fetch is not None and fetch.state is State.VERIFIED:
            cached = await self._once_committed(request, fetch)
            if cached is not None:
                return await self._from_disk(request, cached, outcome)
            fetch = None
        if not route.upstreams:
            # A peer's only-if-cached request (handlers): what is here, not what may come. A
            # fetch under way may be waiting on that very peer (the site offline).
            raise NotHeld("blob not held here", {"digest": str(digest)})
        fetch = self._join_or_start(route, digest, client_auth, fetch, outcome)
        if request.headers.get("Range") and shared:
            cached = await self._whole_first(request, fetch, outcome)
            if cached is not None:
                return await self._hits.send(request, cached, outcome)
            # Not kept (too large, the disk is full), or gone since: the whole blob, as a 200,
            # is a valid answer to a Range request.
            fetch = self._start(route, digest, client_auth, shared=False)
        return await self._from_fetch(request, fetch, outcome)

    async def _once_committed(self, request: web.Request, fetch: Fetch) -> CachedFile | None:
        """A fetch verified and being made durable: its blob, in the cache in a moment (None
        if it was not kept)."""
        await fetch.finished()
        return await self._hits.open(request, fetch.digest) if fetch.committed else None

    def _join_or_start(
        self,
        route: Route,
        digest: Digest,
        client_auth: str | None,
        fetch: Fetch | None,
        outcome: Outcome,
    ) -> Fetch:
        """``fetch`` joined, or, if there is none a client may join, a new one; counted."""
        if fetch is not None and not fetch.spilled:
            outcome.count("joined")
            return fetch
        shared = self._sharing.shared(client_auth)
        fetch = self._start(route, digest, client_auth, shared=shared)
        # A miss asked first of the site's owner of the blob (proxy.cluster.peering) is "peer".
        asked_peer = route.upstreams[0].peer
        outcome.count(self._sharing.result("peer" if asked_peer else "miss", client_auth))
        return fetch

    async def _whole_first(
        self, request: web.Request, fetch: Fetch, outcome: Outcome
    ) -> CachedFile | None:
        """A range of a blob not yet verified could be wrong bytes under a 206: wait for the
        fetch (which the whole pull needs anyway), then answer from the cache. None if the
        blob was not kept, or is gone since."""
        with fetch.waited_on():
            async with waited_out(fetch, outcome):
                try:
                    await fetch.finished(client_patience(request, fetch))
                except DetourError:
                    # One that won't be cached (too large, or the disk is full) ends once
                    # only waiters are left: it has no bytes kept for them.
                    if not fetch.spilled:
                        raise
        outcome.upstream, outcome.source = fetch.where, "cache"
        return await self._hits.open(request, fetch.digest) if fetch.committed else None

    async def _from_fetch(
        self, request: web.Request, fetch: Fetch, outcome: Outcome
    ) -> web.StreamResponse:
        """Streamed to this client as the fetch receives it."""
        outcome.source = "upstream"
        reader = fetch.join(request.transport)
        try:
            return await stream(request, fetch, reader, self._store, outcome)
        finally:
            outcome.upstream = fetch.where

    async def _from_disk(
        self, request: web.Request, cached: CachedFile, outcome: Outcome
    ) -> web.StreamResponse:
        outcome.count("hit")
        outcome.source = "cache"
        return await self._hits.send(request, cached, outcome)

    def _start(
        self, route: Route, digest: Digest, client_auth: str | None, *, shared: bool
    ) -> Fetch:
        fetch = Fetch(
            digest,
            route,
            client_auth,
            store=self._store,
            upstream=self._upstream,
            metrics=self._metrics,
            limits=self._limits,
            slots=self._slots,
            on_spill=lambda: self._forget(fetch),  # no late joiners: see _forget
        )
        task = asyncio.create_task(fetch.run(), name=f"fetch {digest}")
        self._tasks[task] = fetch
        if shared:
            self._inflight[digest] = fetch

        def done(_: asyncio.Task[None]) -> None:
            self._tasks.pop(task, None)
            self._forget(fetch)
            if fetch.committed and fetch.checksums is not None:
                self._hits.keep(fetch.checksums, self._store.blob_path(fetch.digest))

        task.add_done_callback(done)
        return fetch

    def _forget(self, fetch: Fetch) -> None:
        """No new clients for this fetch: it ended, or spilled and can't take late joiners."""
        if self._inflight.get(fetch.digest) is fetch:
            del self._inflight[fetch.digest]

    async def head(
        self,
        request: web.Request,
        route: Route,
        digest: Digest,
        client_auth: str | None,
        outcome: Outcome,
    ) -> web.StreamResponse:
        """HEAD never downloads a body: disk, an in-flight fetch, or an upstream HEAD."""
        size = self._store.blob_size(digest)
        if size is not None:
            outcome.count("hit")
            return web.Response(headers=blob_headers(digest, size))
        if not route.upstreams:  # a peer's only-if-cached request (handlers): see get()
            raise NotHeld("blob not held here", {"digest": str(digest)})
        fetch = self._inflight.get(digest)
        if fetch is not None and self._sharing.shared(client_auth):
            outcome.count("joined")
            async with waited_out(fetch, outcome):
                await fetch.headers_ready(client_patience(request, fetch))
            outcome.upstream = fetch.where
            return web.Response(headers=blob_headers(fetch.digest, fetch.size))
        outcome.count(self._sharing.result("miss", client_auth))
        async with await self._upstream.open(
            route, "HEAD", f"blobs/{digest}", client_auth=client_auth
        ) as answer:
            outcome.upstream = answer.where
            if answer.status != 200:
                raise answer.refusal(blob_unknown(digest))
            length = answer.response.content_length
            return web.Response(headers=blob_headers(digest, length))
