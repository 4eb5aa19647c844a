"""A thread that runs a job on a fetch's chunks, in order, beside the event loop.

A fetch hashes and writes each chunk it receives in two lanes of its own, so neither the
hashing nor the disk holds the network loop back by more than ``PIPELINE_BATCHES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable

from proxy.memory import HANDOFF_BYTES, PIPELINE_BATCHES

# A piece of a body: bytes as aiohttp reads them, or a view of a block read into by
# proxy.upstream.socket_body.
Chunk = bytes | memoryview


class Lane:
    """A thread that runs ``job`` on the chunks put to it, in order, taking what has queued up
    (up to ``HANDOFF_BYTES``) at once: the hashing, or the writing, of one fetch.

    It goes from one batch to the next without waiting for the event loop; the loop waits for
    it only when ``PIPELINE_BATCHES`` are waiting, and is woken only then, unless it puts a
    chunk with ``wait=False`` (it has made room for it elsewhere: the writing's overflow, see
    :class:`~proxy.cache.sink.BlobSink`). A job that raises is not run again: ``error`` holds
    what it raised, and later chunks are only counted.
    """

    def __init__(self, name: str, job: Callable[[list[Chunk]], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._job = job
        self._chunks: queue.SimpleQueue[list[Chunk] | None] = queue.SimpleQueue()
        self._pending: list[Chunk] = []  # not handed over yet
        self._pending_bytes = 0
        self._put_bytes = 0  # bytes put (on the loop)
        self._done_bytes = 0  # bytes of the batches done (in the thread)
        self._put = 0  # batches handed over (on the loop)
        self._done = 0  # batches done (in the thread)
        self._closed = False
        self._stopped = False
        self._wanted = False  # the loop waits for a batch to be done
        self._waiting: asyncio.Future[None] | None = None
        self.error: Exception | None = None
        self.ended: asyncio.Future[None] = self._loop.create_future()  # the thread is gone
        threading.Thread(target=self._run, name=name, daemon=True).start()

    async def put(self, chunk: Chunk, *, wait: bool = True) -> None:
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        self._put_bytes += len(chunk)
        if self._pending_bytes >= HANDOFF_BYTES:
            await self._hand_off(wait)

    @property
    def queued_bytes(self) -> int:
        """Bytes put and not yet done with."""
        return self._put_bytes - self._done_bytes

    def would_wait(self, size: int) -> bool:
        """Whether putting ``size`` more bytes now would make the loop wait for the thread."""
        return (
            self._pending_bytes + size >= HANDOFF_BYTES
            and self._put - self._done >= PIPELINE_BATCHES
        )

    async def _hand_off(self, wait: bool = True) -> None:
        if wait:
            await self._room(PIPELINE_BATCHES)
        batch = self._pending
        self._pending, self._pending_bytes = [], 0
        self._put += 1
        self._chunks.put(batch)

    async def close(self) -> None:
        """Wait until every chunk put is done; the thread ends."""
        if self._pending:
            await self._hand_off()
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
        while (batch := self._chunks.get()) is not None:
            if self.error is None and not self._stopped:
                try:
                    self._job(batch)
                except Exception as exc:
                    self.error = exc
            self._done_bytes += sum(map(len, batch))
            self._done += 1
            if self._wanted:
                self._wanted = False
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    self._loop.call_soon_threadsafe(self._wake)
