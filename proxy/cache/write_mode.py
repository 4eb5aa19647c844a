"""How a cache directory's blob files are written: ``O_DIRECT``, with the bytes the disk has not
yet taken held in memory up to ``cache.write_buffer``; through the page cache past that, or
where the file system refuses ``O_DIRECT``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from proxy.logs import get_logger

log = get_logger("detour.cache")


# How often "the disk is slower than the network" is logged at most (a slow disk says so on
# every large blob).
SLOW_DISK_LOG_SECONDS = 600.0


class WriteMode:
    """How a cache directory's blob files are written, logged whenever it changes.

    Blobs are written with ``O_DIRECT`` where the file system takes it (ext4, xfs, btrfs, tmpfs
    since Linux 6.6): new bytes go to the disk without passing through the page cache, so a
    cold blob is written at the disk's pace rather than at the pace new page cache can be had
    (on a VM that backs its memory lazily, a third of it), and a layer the node's runtime keeps
    a copy of anyway does not crowd the workloads' page cache. Where ``O_DIRECT`` is refused
    (ramfs, some overlay and network file systems), at open or at the first write, blobs are
    written through the page cache from then on.

    The disk may be slower than the network. Every fetch's bytes that its writing thread has
    not yet written are held in memory, all fetches' together up to ``write_buffer`` bytes
    (:meth:`hold`), so a cold blob is streamed at the network's pace while the disk takes it
    at its own, still with ``O_DIRECT``. A blob that would take the held bytes past
    ``write_buffer`` goes on through the page cache (see :class:`proxy.cache.sink.BlobSink`),
    which takes the bytes at memory speed; what waits for the disk is then bounded by
    ``write_behind`` bytes a blob: past that its writer waits for the disk, and the fetch gives
    up the cache copy rather than hold its clients.

    Once verified and flushed, the part of a blob written with ``O_DIRECT`` (the whole blob, on
    a disk that keeps up), if the blob is of at most ``read_back_up_to`` bytes, is read back
    into the page cache before it enters the cache (:func:`read_back`), so the hits that follow
    a fetch (the site's other nodes asking their owner, another pod of the node) come from
    memory, at the pace of a mirror serving from its page cache, not the disk's. The read-back
    yields to the fetches that write: it stops when another blob is being written.
    """

    def __init__(
        self,
        root: Path,
        read_back_up_to: int = 0,
        write_behind: int = 1 << 30,
        write_buffer: int = 64 << 20,
    ) -> None:
        self.root = root
        self.direct = True  # until the file system refuses it
        self.read_back_up_to = read_back_up_to
        self.write_behind = write_behind
        self.write_buffer = write_buffer
        self.held = 0  # bytes received and not yet written, every fetch's (see hold)
        self.writing = 0  # blob files being written now (see count_writer)
        self._lock = threading.Lock()  # writers end in worker threads
        self._slow_logged = -SLOW_DISK_LOG_SECONDS  # time.monotonic() of the last log
        self._logged = False

    @property
    def starts_direct(self) -> bool:
        """Whether a new blob file starts with ``O_DIRECT``."""
        return self.direct

    def hold(self) -> HeldBytes:
        """A new blob's share of ``write_buffer``."""
        return HeldBytes(self, self._lock)

    def count_writer(self, step: int) -> None:
        with self._lock:
            self.writing += step

    def others_writing(self) -> bool:
        """Whether a blob other than the one asking is being written."""
        return self.writing > 1

    def accepted(self) -> None:
        if not self._logged:
            self._logged = True
            log.info("cache_blob_writes", dir=str(self.root), mode="direct")

    def refused(self, exc: OSError) -> None:
        if self.direct:
            self.direct = False
            self._logged = True
            log.info(
                "cache_blob_writes",
                dir=str(self.root),
                mode="buffered",
                reason=f"O_DIRECT refused: {exc.strerror or exc}",
            )

    def fell_behind(self) -> None:
        """A blob would have taken the bytes held for the disk past ``write_buffer``: it goes
        on through the page cache. Logged at most every ``SLOW_DISK_LOG_SECONDS``."""
        now = time.monotonic()
        self._logged = True  # (a first O_DIRECT write that ends after this says nothing new)
        if now - self._slow_logged >= SLOW_DISK_LOG_SECONDS:
            self._slow_logged = now
            log.info(
                "cache_blob_writes",
                dir=str(self.root),
                mode="buffered",
                reason="the disk is slower than the network",
                write_buffer=self.write_buffer,
            )


class HeldBytes:
    """One blob's bytes held in memory for its writing thread, under the cache's
    ``write_buffer``: taken on the loop as chunks are handed to the thread (:meth:`take`),
    given back as they are written or skipped (:meth:`written`, in the thread), and all at
    once when the fetch is over (:meth:`give_back`)."""

    def __init__(self, mode: WriteMode, lock: threading.Lock) -> None:
        self._mode = mode
        self._lock = lock
        self.taken = 0
        self._given = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes, unless that would take every blob's past ``write_buffer``."""
        mode = self._mode
        with self._lock:
            if mode.held + size > mode.write_buffer:
                return False
            mode.held += size
            self.taken += size
            return True

    def written(self, size: int) -> None:
        """``size`` bytes handed to the thread are done with (written, or skipped); those of
        them taken (the first handed over) are given back."""
        with self._lock:
            size = min(size, self.taken - self._given)
            self._given += size
            self._mode.held -= size

    def give_back(self) -> None:
        self.written(self.taken)
