"""A cached blob opened for one response, read a chunk at a time, each chunk checked before a
byte of it is sent.

A fetch that puts a blob in the cache takes an XXH3-64 of each of its ``CHECKED_CHUNK_BYTES``
chunks from the very bytes whose digest it verified (:class:`~proxy.cache.checksums.Checksums`).
A hit reads each chunk into a buffer of its own, checks it against its sum there and sends it
from there: the bytes checked are the bytes sent. A blob without checksums (the first hit after
a restart) is hashed whole (sha256) as it is read, which takes its checksums for the next hits;
its last chunk is not handed out until the digest matched. XXH3 rather than CRC-32: several
times as fast, a few percent of a core at the mirror's pace (bench/README.md, "Hits").

Why read and send rather than ``sendfile``: over loopback (a node's kubelet, the site's other
Detours nearby) the kernel's copy out of page-cache fragments costs more than one copy from a
buffer (bench/README.md, "Hits", has the comparison and how it was run), and a check beside
``sendfile`` read every byte twice.

A chunk in the page cache is read on the event loop (``RWF_NOWAIT``: a memory copy, which
never waits for the disk); one that must come from the disk is read in a worker thread, the
kernel asked to read ahead of it.
"""

from __future__ import annotations

import asyncio
import errno
import os
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import xxhash

from proxy.cache.checksums import Checksums
from proxy.memory import CHECKED_CHUNK_BYTES
from proxy.reference import Digest

READ_AHEAD_BYTES = 8 << 20  # asked of the kernel when a chunk had to come from the disk

_T = TypeVar("_T")


class Corrupt(Exception):
    """A cached blob that does not match its digest, its checksums or its size."""


class CachedFile:
    """A cached blob opened for one response (:class:`Blobs` pins its entry meanwhile).

    The file stays open, so what is checked and what is sent are one file even if the entry is
    evicted or replaced meanwhile. ``size`` is the size at open: the response promises that,
    and a file that shrinks under it fails. A read or hash in a worker thread is one job at a
    time; :meth:`close` waits for it.
    """

    def __init__(self, path: Path, digest: Digest, known: Checksums | None) -> None:
        self.path = path
        self.digest = digest
        self.file: IO[bytes] = open(path, "rb", buffering=0)  # noqa: SIM115 (see close)
        stat = os.fstat(self.file.fileno())
        self.identity = (stat.st_dev, stat.st_ino)
        self.size = stat.st_size
        # Checksums taken from this very file, kept in memory or with the file (another one,
        # fetched again since, is hashed whole); at another size than then, it changed: cut
        # short, or written to.
        if known is None or known.identity != self.identity:
            known = Checksums.load(self.file.fileno())
        self.checksums = known
        self.hashed = 0  # bytes hashed into the digest, in order
        self._hasher = digest.hasher()
        self._sums: array[int] = array("Q")
        self._buffer = bytearray(min(CHECKED_CHUNK_BYTES, max(1, self.size)))
        self._in_buffer = -1  # the chunk the buffer holds, checked
        self._job: asyncio.Future[Any] | None = None
        self._nowait = True  # until the file system refuses RWF_NOWAIT

    @property
    def chunks(self) -> int:
        return -(-self.size // CHECKED_CHUNK_BYTES)

    async def chunk(self, index: int) -> memoryview:
        """Chunk ``index``, read and checked: against its checksum, or (without checksums,
        chunks in order) hashed into the digest, the last one only returned if the digest
        matches. Raise :class:`Corrupt` if it does not, or the file is short of it. The view
        is good until the next call."""
        offset = index * CHECKED_CHUNK_BYTES
        view = memoryview(self._buffer)[: max(0, min(CHECKED_CHUNK_BYTES, self.size - offset))]
        if index == self._in_buffer:
            return view
        self._in_buffer = -1
        done = await self._read(view, offset)
        if done < len(view):
            raise Corrupt(f"the file shrank to {offset + done} bytes from {self.size}")
        if self.checksums is not None:
            sums = self.checksums.sums
            if index >= len(sums) or xxhash.xxh3_64_intdigest(view) != sums[index]:
                where = f"chunk {index} (from byte {offset})"
                raise Corrupt(f"{where} does not match its checksum")
        else:
            await self._hash(view, offset)
        self._in_buffer = index
        return view

    async def verify(self) -> None:
        """Hash the whole file (without checksums), which takes its checksums; raise
        :class:`Corrupt` if it is wrong."""
        for index in range(max(1, self.chunks)):
            await self.chunk(index)

    async def _read(self, view: memoryview, offset: int) -> int:
        """Read into ``view`` from ``offset``: from the page cache on the loop, what is not
        there in a worker thread. How many bytes there were (fewer: the file ended)."""
        done = 0
        if self._nowait and view:
            try:
                done = os.preadv(self.file.fileno(), [view], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise Corrupt("unreadable") from exc
                self._nowait = False
            else:
                if done == 0 or done == len(view):
                    return done  # all of it, or the file ended
        if done < len(view):
            more = await self._in_thread(self._read_job, view[done:], offset + done)
            if more < 0:
                raise Corrupt("unreadable")
            done += more
        return done

    def _read_job(self, view: memoryview, offset: int) -> int:
        """Blocking: read ``view`` from the disk, asking the kernel to read further ahead.
        Errors are return values (-1): a job nobody awaits any more must not leave one."""
        fd = self.file.fileno()
        done = 0
        try:
            os.posix_fadvise(fd, offset, READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            return -1
        return done

    async def _hash(self, view: memoryview, offset: int) -> None:
        """Hash a chunk into the digest, in a worker thread (sha256 of a 2 MiB chunk takes
        too long for the loop); at the end, raise :class:`Corrupt` unless the digest matches."""
        if offset != self.hashed:
            raise Corrupt("hashed out of order")  # a Range without checksums: verify() first
        await self._in_thread(self._hasher.update, view)
        self._sums.append(xxhash.xxh3_64_intdigest(view))
        self.hashed += len(view)
        if self.hashed == self.size:
            if self._hasher.hexdigest() != self.digest.hex:
                raise Corrupt("does not match its digest")
            self.checksums = Checksums(self.identity, self.size, self._sums)

    async def _in_thread(self, job: Callable[..., _T], *args: object) -> _T:
        assert self._job is None or self._job.done()
        future = asyncio.get_running_loop().run_in_executor(None, job, *args)
        self._job = future
        return await future

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
