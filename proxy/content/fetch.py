"""One upstream fetch of one blob: what :class:`~proxy.content.blobs.Blobs` starts and its
clients join. Where it is and what its clients wait on is :class:`FetchState`'s
(:mod:`proxy.content.fetch_state`); the receiving itself (the body opened, resumed when the
upstream drops, received into the :class:`~proxy.content.window.Window` and a
:class:`~proxy.cache.sink.BlobSink`, verified, and committed to the cache) is
:class:`~proxy.content.receiver.Receiver`'s.

A fetch waits for its turn (:class:`~proxy.content.fetch_limits.FetchSlots`), and ends early when
its clients are gone (after ``upstream.abandon_after``, unless it is nearly done) or the upstream
crawls below ``upstream.min_rate`` (:mod:`proxy.content.watchdog`). A client that reads it joins
its window; one that waits for the whole blob without reading it (a Range) still wants it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from proxy.cache.checksums import Checksums
from proxy.cache.store import CacheStore
from proxy.content.fetch_limits import FetchLimits, FetchSlots
from proxy.content.fetch_state import FetchState, State
from proxy.content.receiver import Receiver
from proxy.content.window import Reader, Window
from proxy.errors import DetourError, UpstreamError
from proxy.metrics import Metrics
from proxy.reference import Digest
from proxy.upstream.client import UpstreamClient
from proxy.upstream.rules import Route

NEARLY_DONE = 0.9  # a fetch this far along goes on for the cache when its clients leave


class Fetch(FetchState):
    """One fetch of one blob, run by :meth:`run` in a task of its own; its clients join its
    :attr:`window` and are streamed by :mod:`proxy.content.streamer`. ``on_spill`` is called,
    by its sink, the moment the disk won't keep the blob (late clients can't join it then)."""

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
        on_spill: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(Window(str(digest), limits.slow_client))
        self.digest = digest
        self.route = route
        self._store = store
        self._limits = limits
        self._waiters = 0  # clients waiting for the whole fetch (a Range) without reading it
        self.committed = False
        self.checksums: Checksums | None = None  # once committed: for its hits' checks
        self._receiver = Receiver(
            self,
            digest,
            route,
            client_auth,
            store=store,
            upstream=upstream,
            metrics=metrics,
            limits=limits,
            slots=slots,
            on_spill=on_spill,
        )

    @property
    def failing(self) -> UpstreamError | None:
        """While every upstream fails and the fetch tries again: what the last try met."""
        return self._receiver.failing

    @property
    def client_wait(self) -> float | None:
        """``upstream.client_wait``: how long a client may be sent nothing (see
        :meth:`wait_change`)."""
        return self._limits.client_wait

    @property
    def received(self) -> int:
        """Bytes received from the upstream."""
        return self._receiver.body.received

    @property
    def spilled(self) -> bool:
        return self._receiver.spilled

    @property
    def on_disk(self) -> int:
        """Bytes in the temp file, which readers behind the window read."""
        return self._receiver.on_disk

    @property
    def files(self) -> tuple[Path | None, Path]:
        """The temp file (None before the upstream answered, or if it could not be made) and
        where it goes once committed."""
        return self._receiver.temp_file, self._store.blob_path(self.digest)

    async def run(self) -> None:
        """Receive the blob (:meth:`Receiver.run`); a failure is reported to the clients."""
        try:
            self.checksums = await self._receiver.run()
            self.committed = self.checksums is not None
        except DetourError as exc:
            self.error = exc
            self.state = State.FAILED
        finally:
            self._done.set()
            self.release_file()
            self.window.notify()

    def join(self, transport: asyncio.Transport | None) -> Reader:
        """Become a client of this fetch; synchronous, so a spill can't slip in between."""
        assert not self.spilled
        return self.window.join(transport)

    def leave(self, reader: Reader) -> None:
        """A client is done with this fetch; the last to leave an ended one lets go of its
        memory and its file."""
        self.window.leave(reader)
        self.release_file()

    def views(self, reader: Reader, limit: int) -> list[memoryview] | None:
        """The bytes from ``reader``'s position up to ``limit`` in memory; None for a reader
        behind the window, which reads them from the file."""
        if reader.position < self.window.start:
            return None
        return self.window.views(reader.position, limit)

    def taken(self) -> None:
        """A client took bytes: a spilled fetch, which waits for its slowest client
        (:meth:`Window.room`), looks again."""
        if self.spilled:
            self.window.notify()

    @contextlib.contextmanager
    def waited_on(self) -> Iterator[None]:
        """A client waits for the whole fetch (a Range) without reading it: the fetch is
        still wanted (:meth:`interested`) while it does."""
        self._waiters += 1
        try:
            yield
        finally:
            self._waiters -= 1

    def interested(self) -> bool:
        return self.window.interested() or self._waiters > 0

    def nearly_done(self) -> bool:
        return self.size is not None and self.received >= self.size * NEARLY_DONE

    def release_file(self) -> None:
        """Once the fetch is over and no client reads it: its window's memory goes, and its
        temp file (a committed one has moved away)."""
        if self._done.is_set() and not self.window.readers:
            self.window.clear()
            if not self.committed:
                self._receiver.discard()
