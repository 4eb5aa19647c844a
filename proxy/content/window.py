"""A blob fetch's window: the last bytes it received, in memory, and the clients reading them.

Each chunk received joins the window. It holds the last ``WINDOW_BYTES`` received and every
chunk not yet on disk; a client whose position is in the window is sent its bytes from there,
one behind it reads the fetch's file. The fetch never waits for a client, except once it has
*spilled* (the disk won't take the blob): then each chunk stays until every client has it, and
the fetch waits for the slowest (:meth:`Window.room`), cutting off, after
``upstream.slow_client``, one that holds the others back.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from dataclasses import dataclass

from proxy.errors import UpstreamInvalid
from proxy.lane import Chunk
from proxy.logs import get_logger
from proxy.memory import SEND_BYTES, WINDOW_BYTES

log = get_logger("detour.blobs")


@dataclass(eq=False)
class Reader:
    """One client of a fetch."""

    position: int = 0  # bytes sent to it
    gone: bool = False
    too_slow: bool = False  # cut off for holding a spilled fetch back
    # Sent bytes of an attempt that turned out wrong (a peer relaying a held blob down the
    # tree): what it has can't be completed, so its response is cut short.
    restarted: bool = False
    # The client's connection: one that closed while waiting for the fetch's first bytes
    # (aiohttp does not cancel its handler) no longer counts as waiting for it.
    transport: asyncio.Transport | None = None

    @property
    def waiting(self) -> bool:
        return not self.gone and self.transport is not None and not self.transport.is_closing()


def reset_connection(transport: asyncio.Transport) -> None:
    """Close a connection at once with a TCP reset: a plain close would still hand the client
    what the kernel's send buffer holds (megabytes), at the client's own slow pace."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Window:
    """Bytes ``[start, end)`` of one fetch in memory, its readers, and the event that tells
    them something changed (bytes arrived, the fetch moved on, a reader left)."""

    def __init__(self, digest: str, slow_client: float) -> None:
        self._digest = digest
        self._slow_client = slow_client
        self._chunks: deque[Chunk] = deque()  # oldest first
        self.start = 0  # the offset of its first byte
        self.size = 0
        self.readers: set[Reader] = set()
        self._changed = asyncio.Event()

    @property
    def end(self) -> int:
        """Every byte received so far."""
        return self.start + self.size

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next change; take it before looking, then wait on it."""
        return self._changed

    def notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def append(self, chunk: Chunk, on_disk: int, spilled: bool) -> None:
        self._chunks.append(chunk)
        self.size += len(chunk)
        self.trim(on_disk, spilled)
        self.notify()  # the clients that keep up send it now

    def trim(self, on_disk: int, spilled: bool) -> None:
        """Let go of the oldest chunks that nobody needs from memory: past the last
        ``WINDOW_BYTES``, those on disk; spilled, those every client has, or on disk."""
        floor, keep = on_disk, WINDOW_BYTES
        if spilled:
            floor = max(floor, min((r.position for r in self.readers), default=self.end))
            keep = 0
        chunks = self._chunks
        while chunks and self.size - len(chunks[0]) >= keep:
            end = self.start + len(chunks[0])
            if end > floor:
                break
            self.size -= len(chunks[0])
            self.start = end
            chunks.popleft()

    def clear(self) -> None:
        """Let go of every chunk (the fetch is over and no client reads it any more): now,
        rather than whenever the garbage collector gets to the fetch."""
        self.start = self.end
        self.size = 0
        self._chunks.clear()

    def restart(self) -> None:
        """Forget every byte: the fetch starts again from its first byte. A reader that was
        sent some (a peer relaying the blob) is told: they were wrong."""
        for reader in self.readers:
            reader.restarted = reader.restarted or reader.position > 0
        self.clear()
        self.start = 0
        self.notify()

    def views(self, start: int, end: int) -> list[memoryview]:
        """Bytes ``[start, end)`` (``start`` in the window), in views of its chunks of at most
        ``SEND_BYTES``; a view keeps its chunk alive if the window lets go of it meanwhile."""
        views: list[memoryview] = []
        offset = self.start
        for chunk in self._chunks:
            stop = offset + len(chunk)
            if stop > start:
                view = memoryview(chunk)[max(0, start - offset) : min(end, stop) - offset]
                views.extend(view[i : i + SEND_BYTES] for i in range(0, len(view), SEND_BYTES))
            offset = stop
            if offset >= end:
                break
        return views

    async def room(self, on_disk: int) -> None:
        """Spilled: wait for room, that is for the slowest client to take the oldest chunk; a
        client that holds the others back for ``slow_client`` is cut off."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._slow_client
        while True:
            self.trim(on_disk, spilled=True)
            if not self.readers:
                raise UpstreamInvalid("no client left for an uncached blob")
            if self.size < WINDOW_BYTES:
                return
            changed = self._changed
            try:
                async with asyncio.timeout_at(deadline):
                    await changed.wait()  # a client took bytes, or left
            except TimeoutError:
                needed = self.start + len(self._chunks[0])
                for reader in list(self.readers):
                    if reader.position < needed:
                        self._cut_off(reader)
                deadline = loop.time() + self._slow_client

    def join(self, transport: asyncio.Transport | None) -> Reader:
        reader = Reader(transport=transport)
        self.readers.add(reader)
        return reader

    def leave(self, reader: Reader) -> None:
        reader.gone = True
        self.readers.discard(reader)
        self.notify()

    def interested(self) -> bool:
        """Whether a client still waits for these bytes."""
        return any(reader.waiting for reader in self.readers)

    def _cut_off(self, reader: Reader) -> None:
        """A client too slow to keep up with a spilled fetch: the others go on without it."""
        reader.too_slow = True
        self.leave(reader)
        if reader.transport is not None:
            reset_connection(reader.transport)
        log.warning("slow_client_cut_off", digest=self._digest, after=self._slow_client)
