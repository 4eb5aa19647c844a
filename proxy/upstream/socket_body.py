"""The rest of a fast upstream's blob body, read by Detour itself into page-aligned blocks.

aiohttp reads a body into bytes objects of its own: the socket's read, then its parser's copy,
and a blob writer with ``O_DIRECT`` copies each chunk once more into an aligned buffer. Over a
link that is not the bottleneck (a mirror on the node's network, a site's peer) a cold blob is
paced by the processors, so once a body has shown itself fast (:meth:`SocketReads.worth_it`),
Detour takes its connection over from aiohttp (:meth:`asyncio.BaseTransport.set_protocol`, the
transport's documented way to change hands) and reads the rest with ``recv_into`` straight into
4 MiB page-aligned blocks. Each chunk is a view of a block, placed so that a byte's address and
its offset in the blob file agree modulo 4 KiB, so the blob writer writes whole blocks from the
chunks themselves (:meth:`~proxy.cache.writer.BlobWriter.write`).

aiohttp's parser is left mid-body, so the connection is closed after the body rather than going
back to the pool: a new connection for the next blob costs little on a link this fast, which is
why slow links are never taken over (their bodies, read through aiohttp, keep the connection).
A body cut short, or silent for ``read_timeout``, ends with the same exceptions aiohttp's own
reads raise, so :func:`proxy.upstream.transport.transport_errors` names them alike. A peer's silence
is judged by its caller instead, every ``cluster.read_timeout`` (:mod:`proxy.upstream.liveness`).

The word for this is *socket*: a body's socket reads. *Direct* is kept for the blob writer's
``O_DIRECT`` disk writes (:mod:`proxy.cache.write_mode`), the other end of the same blocks.
"""

from __future__ import annotations

import asyncio
import mmap
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp

# A block's bytes sit at addresses congruent to their file offsets modulo ALIGN; the sizes of
# blocks, and how many are read into and kept, are in proxy.memory.
from proxy.memory import ALIGN, BLOCK_BYTES, FREE_BLOCKS, MAX_BODIES

# A body is taken over once this much of it came through aiohttp at TAKE_OVER_RATE or faster,
# with at least TAKE_OVER_LEFT still to come.
TAKE_OVER_AFTER = 4 << 20
TAKE_OVER_RATE = 200e6  # bytes per second: below this, the link, not the processor, sets the pace
TAKE_OVER_LEFT = 8 << 20

# A chunk is passed on once its block is full, or once bytes have waited PATIENCE seconds for
# more: whole blocks over a fast link, and no stall when it slows.
PATIENCE = 0.05


class BlockPool:
    """Page-aligned blocks of :data:`BLOCK_BYTES`, reused once nothing refers to them.

    Every view of a block holds a reference to it (the window's chunks, a lane's batch, a client
    transport's unsent data, a blocking write under way in a thread), so a block whose only
    references are the pool's own is free, and is reused without faulting in fresh memory. At
    most ``keep`` free blocks are kept; the rest are unmapped. Used from the event loop only.
    """

    def __init__(self, keep: int = FREE_BLOCKS) -> None:
        self._keep = keep
        self._free: list[mmap.mmap] = []
        self._lent: list[mmap.mmap] = []

    def take(self) -> mmap.mmap:
        self.collect()
        block = self._free.pop() if self._free else mmap.mmap(-1, BLOCK_BYTES)
        self._lent.append(block)
        return block

    def collect(self) -> None:
        """Take back the lent blocks nothing refers to any more."""
        lent, self._lent = self._lent, []
        for block in lent:
            # References: the list's, this loop's, and getrefcount's argument.
            if sys.getrefcount(block) > 3:
                self._lent.append(block)
            elif len(self._free) < self._keep:
                self._free.append(block)


@dataclass
class SocketReads:
    """What reading bodies on needs: the blocks, the silence allowed (``read_timeout``), the
    pace at which a body is worth it, and how many are being read on now."""

    blocks: BlockPool
    read_timeout: float
    rate: float = TAKE_OVER_RATE  # bytes per second
    bodies: int = 0
    peer_read_timeout: float = 1.0  # cluster.read_timeout: a peer's silence, then a probe

    def worth_it(self, received: int, seconds: float, left: int) -> bool:
        """Whether a body that gave ``received`` bytes in ``seconds``, with ``left`` to come,
        is read on by Detour itself."""
        return (
            self.bodies < MAX_BODIES
            and left >= TAKE_OVER_LEFT
            and received >= TAKE_OVER_AFTER
            and received >= self.rate * seconds
        )


class _Receiver(asyncio.BufferedProtocol):
    """A taken-over connection's protocol: bytes go into the block it is aimed at; aiohttp's
    protocol is still told when the connection is lost, for its own bookkeeping."""

    def __init__(self, previous: asyncio.BaseProtocol, transport: asyncio.Transport) -> None:
        self._previous = previous
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._target = memoryview(b"")
        self.filled = 0  # bytes in the target
        self._wake_at = 0  # filled, at which the reader is woken
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False  # end of stream, or the connection lost
        self.error: BaseException | None = None
        self.last_data = self._loop.time()

    def aim(self, target: memoryview, filled: int) -> None:
        """Receive into ``target`` from ``filled`` on, reading from the connection again."""
        self._target, self.filled = target, filled
        if not self.ended and filled < len(target):
            self._transport.resume_reading()

    async def wait(self, after: int, silence: float) -> None:
        """Return once the target is full, has had bytes past ``after`` for
        :data:`PATIENCE` seconds, or the stream ended; raise ``TimeoutError`` after ``silence``
        seconds without a byte."""
        while self.filled < len(self._target) and not self.ended:
            arrived = self.filled > after
            self._wake_at = len(self._target) if arrived else after + 1
            waiter = self.waiter = self._loop.create_future()
            patience = PATIENCE if arrived else self.last_data + silence - self._loop.time()
            try:
                async with asyncio.timeout(patience):
                    await waiter
            except TimeoutError:
                if self.filled > after:
                    return
                if self._loop.time() - self.last_data >= silence:
                    raise
            finally:
                self.waiter = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._target[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        self.last_data = self._loop.time()
        if self.filled == len(self._target):
            self._transport.pause_reading()  # until aimed at the next block
        if self.filled >= self._wake_at:
            self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.error = exc
        self._wake()
        self._previous.connection_lost(exc)


async def read_on(
    response: aiohttp.ClientResponse,
    offset: int,
    left: int,
    reads: SocketReads,
    silent: Callable[[float], Awaitable[None]] | None = None,
) -> AsyncIterator[memoryview]:
    """The last ``left`` bytes of ``response``'s body, the blob's from byte ``offset`` on, from
    its connection, each chunk a view of one of the blocks. The connection is closed at the
    end. Call between reads of aiohttp's stream, never during one.

    With ``silent`` (a peer's body), a silence of ``peer_read_timeout`` is not an error by
    itself: ``silent`` is called with how long it has lasted, and raises to end the read."""
    pool, read_timeout = reads.blocks, reads.read_timeout
    if silent is not None:
        read_timeout = reads.peer_read_timeout
    pending = response.content.read_nowait(-1)  # what aiohttp holds (raises what it met)
    connection = response.connection
    transport = None if connection is None else connection.transport
    previous = None if connection is None else connection.protocol
    if transport is None or previous is None or transport.is_closing():  # lost meanwhile
        raise aiohttp.ClientPayloadError("Response payload is not completed")
    previous.pause_reading()  # the transport, and aiohttp's read timeout
    receiver = _Receiver(previous, transport)
    transport.set_protocol(receiver)
    reads.bodies += 1
    try:
        while left:
            block = memoryview(pool.take())
            start = offset % ALIGN
            end = min(BLOCK_BYTES, start + left)
            target = block[:end]
            taken = min(len(pending), end - start)
            target[start : start + taken] = pending[:taken]
            pending = pending[taken:]
            receiver.aim(target, start + taken)
            given = start
            silence = read_timeout
            while given < end:
                try:
                    await receiver.wait(given, silence)
                except TimeoutError:
                    if silent is None:
                        raise
                    quiet = asyncio.get_running_loop().time() - receiver.last_data
                    await silent(quiet)  # alive: another read_timeout, then ask again
                    silence = quiet + read_timeout
                    continue
                silence = read_timeout
                if receiver.filled == given:
                    cause = f": {receiver.error}" if receiver.error else ""
                    raise aiohttp.ClientPayloadError(f"Response payload is not completed{cause}")
                chunk = target[given : receiver.filled]
                given = receiver.filled
                offset += len(chunk)
                left -= len(chunk)
                yield chunk
            del block, target
    finally:
        reads.bodies -= 1
        response.close()
        pool.collect()
