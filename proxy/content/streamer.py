"""Sending a blob to one client of a :class:`~proxy.content.fetch.Fetch` as it arrives.

The streamer sees a fetch only as :class:`Streamed`: what a client reads of it.

A client whose position is in the fetch's window is sent its bytes from memory; one behind it
(it joined late, or fell behind) reads the fetch's file, up to what is on disk, until it
catches up. The last byte waits until the blob is verified. If the fetch fails after bytes went
out under a 200, the connection is aborted, so no client takes what it got for a whole blob.

A client is never left hanging on an upstream that sends nothing (slow to answer, or a WAN cut
being waited out, :mod:`proxy.content.blob_body`): after ``upstream.client_wait`` with nothing to
send it, it gets a 504 before its headers, or mid-body its connection is aborted; the runtime
retries (resuming with ``Range``), and its retry joins the same fetch. A peer's request is not
cut: the peer watches this instance itself (:mod:`proxy.upstream.liveness`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Protocol

from aiohttp import web

from proxy.cache.store import CacheStore
from proxy.content.fetch_state import ClientWaitOver, State
from proxy.content.headers import blob_headers
from proxy.content.outcome import Abort, Outcome, send_body
from proxy.content.window import Reader
from proxy.errors import DetourError, UpstreamError, UpstreamInvalid, UpstreamTimeout
from proxy.logs import CLIENT_DISCONNECTED, LOG
from proxy.memory import CHUNK_BYTES
from proxy.reference import Digest


class Streamed(Protocol):
    """What a client reads of the fetch it is streamed from (a
    :class:`~proxy.content.fetch.Fetch`), and the little it tells it."""

    @property
    def digest(self) -> Digest: ...

    @property
    def size(self) -> int | None: ...

    @property
    def state(self) -> State: ...

    @property
    def error(self) -> DetourError | None: ...

    @property
    def failing(self) -> UpstreamError | None: ...

    @property
    def client_wait(self) -> float | None: ...

    @property
    def on_disk(self) -> int: ...

    @property
    def files(self) -> tuple[Path | None, Path]: ...

    @property
    def changed(self) -> asyncio.Event: ...

    def available(self) -> int: ...

    def views(self, reader: Reader, limit: int) -> list[memoryview] | None: ...

    def taken(self) -> None: ...

    def leave(self, reader: Reader) -> None: ...

    async def headers_ready(
        self, patience: float | None = None, *, relay: bool = False
    ) -> None: ...

    async def wait_change(
        self, changed: asyncio.Event, since: float, patience: float | None
    ) -> None: ...


async def stream(
    request: web.Request, fetch: Streamed, reader: Reader, store: CacheStore, outcome: Outcome
) -> web.StreamResponse:
    """Stream the fetch to the client ``reader`` stands for; it leaves the fetch at the end."""
    final = store.blob_path(fetch.digest)
    store.pin(final)  # once committed, not evicted while this reader reads it
    patience = client_patience(request, fetch)
    try:
        async with waited_out(fetch, outcome):
            await fetch.headers_ready(patience, relay=from_peer(request))
        source = _open_file(fetch)
        try:
            return await _respond(request, fetch, reader, source, outcome, patience)
        finally:
            if source is not None:
                source.close()
    finally:
        store.unpin(final)
        fetch.leave(reader)


def from_peer(request: web.Request) -> bool:
    """Whether ``request`` is a proven peer's (the handler marks it so in its log fields)."""
    fields = request.get(LOG)
    return isinstance(fields, dict) and "from_peer" in fields


def client_patience(request: web.Request, fetch: Streamed) -> float | None:
    """How long this client may be sent nothing while the fetch waits for its upstream:
    ``upstream.client_wait``, or, for a proven peer's request, as long as the fetch lasts."""
    return None if from_peer(request) else fetch.client_wait


@contextlib.asynccontextmanager
async def waited_out(fetch: Streamed, outcome: Outcome) -> AsyncIterator[None]:
    """A client let go of before its headers (:class:`ClientWaitOver`), counted: the error
    every upstream gave last, while the fetch tries again; else a 504."""
    try:
        yield
    except ClientWaitOver as over:
        outcome.metrics.client_waits.labels("headers").inc()
        failing = fetch.failing
        if failing is not None:
            raise type(failing)(
                f"{failing.message} (Detour tries again for upstream.retry_for: try again, "
                "the retry joins the same fetch)",
                failing.detail,
                cause=failing.cause,
                reason=failing.reason,
            ) from None
        raise UpstreamTimeout(
            f"the upstream has sent nothing for {over.patience:g}s (Detour goes on trying, "
            "for upstream.retry_for): try again; the retry joins the same fetch",
            {"digest": str(fetch.digest)},
            cause="waiting",
        ) from None


def _open_file(fetch: Streamed) -> IO[bytes] | None:
    """The file the fetch writes, wherever it is now. Moved into the cache meanwhile, the final
    file holds the same verified bytes; not kept and deleted, every byte comes from memory."""
    for path in fetch.files:
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                return open(path, "rb", buffering=0)
    return None


async def _respond(
    request: web.Request,
    fetch: Streamed,
    reader: Reader,
    source: IO[bytes] | None,
    outcome: Outcome,
    patience: float | None,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=blob_headers(fetch.digest, fetch.size))
    await response.prepare(request)
    outcome.streamed = True  # its bytes counted as they go out, for the access log
    body = _send_body(request, fetch, reader, source, response, outcome, patience)

    def hung_up() -> str:
        # One cut off for being too slow got its bytes, like one that hung up; the fetch goes
        # on for the cache.
        return "too slow" if reader.too_slow else CLIENT_DISCONNECTED

    return await send_body(request, response, outcome, body, hung_up)


async def _send_body(
    request: web.Request,
    fetch: Streamed,
    reader: Reader,
    source: IO[bytes] | None,
    response: web.StreamResponse,
    outcome: Outcome,
    patience: float | None,
) -> None:
    """From the window, or behind it from the file, as the fetch receives; the last byte once
    the blob is verified. A fetch that fails is an :class:`Abort` (bytes already went out), and
    so is ``patience`` seconds with nothing to send while the upstream sends nothing."""
    sent_at = time.monotonic()  # when this client was last sent bytes (or began)
    try:
        while True:
            changed = fetch.changed
            if fetch.state is State.FAILED:
                raise fetch.error or UpstreamInvalid("blob fetch failed")
            if reader.restarted:
                raise UpstreamInvalid(
                    "the bytes relayed were wrong (the source lied); fetched again from the next"
                )
            if reader.too_slow:
                raise UpstreamTimeout(
                    "client too slow for a blob streamed from memory (the cache disk is "
                    "full); resume with a Range request"
                )
            limit = fetch.available()
            if reader.position >= limit:
                if fetch.state is State.VERIFIED:
                    return
                try:
                    await fetch.wait_change(changed, sent_at, patience)
                except ClientWaitOver as over:
                    outcome.metrics.client_waits.labels("body").inc()
                    raise Abort(
                        f"nothing to send for {over.patience:g}s, the upstream silent; "
                        "resume with a Range request"
                    ) from None
                continue
            sent_at = time.monotonic()
            views = fetch.views(reader, limit)
            if views is not None:
                await _send_window(fetch, views, response, reader, outcome)
            elif source is not None and reader.position < fetch.on_disk:
                # Behind the window: from the file, catching up.
                await _send_file(request, response, source, min(limit, fetch.on_disk), outcome)
                reader.position = outcome.bytes
            else:
                raise UpstreamInvalid("blob bytes neither in memory nor on disk")
    except DetourError as exc:
        raise Abort(exc.message) from exc


async def _send_window(
    fetch: Streamed,
    views: list[memoryview],
    response: web.StreamResponse,
    reader: Reader,
    outcome: Outcome,
) -> None:
    """Send the window's bytes from the reader's position (``views``), as the socket takes
    them."""
    for view in views:
        await response.write(view)
        reader.position = outcome.bytes = reader.position + len(view)
        fetch.taken()


async def _send_file(
    request: web.Request,
    response: web.StreamResponse,
    source: IO[bytes],
    limit: int,
    outcome: Outcome,
) -> None:
    """Send the file's bytes from ``outcome.bytes`` up to ``limit``, counting them there."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    offset = outcome.bytes
    if response.chunked:
        while offset < limit:
            data = os.pread(source.fileno(), min(limit - offset, CHUNK_BYTES), offset)
            if not data:
                raise UpstreamInvalid("cached bytes vanished")
            await response.write(data)
            outcome.bytes = offset = offset + len(data)
        return
    # Headers went out in prepare(); the body goes file → socket in the kernel.
    try:
        await asyncio.get_running_loop().sendfile(transport, source, offset, limit - offset)
    except ConnectionError:
        # loop.sendfile leaves the file position after the last byte it sent, even when it
        # fails (and where the previous call left it, if it sent none).
        outcome.bytes = max(offset, source.tell())
        raise
    outcome.bytes = limit
