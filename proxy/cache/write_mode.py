"""How a cache directory's blob files are written: ``O_DIRECT`` while the disk keeps up
with the network, through the page cache where it doesn't or refuses ``O_DIRECT``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from proxy.lane import Lane
from proxy.logs import get_logger
from proxy.memory import WRITE_BUFFER_BYTES, unsent_bytes

log = get_logger("detour.cache")


# A disk that fell behind the network keeps new blobs off O_DIRECT for this long, then is tried
# again (it may have been busy with something else).
SLOW_DISK_SECONDS = 600.0


class WriteMode:
    """How a cache directory's blob files are written, logged whenever it changes.

    Blobs are written with ``O_DIRECT`` where the file system takes it (ext4, xfs, btrfs, tmpfs
    since Linux 6.6): new bytes go to the disk without passing through the page cache, so a
    cold blob is written at the disk's pace rather than at the pace new page cache can be had
    (on a VM that backs its memory lazily, a third of it), and a layer the node's runtime keeps
    a copy of anyway does not crowd the workloads' page cache. Where ``O_DIRECT`` is refused
    (ramfs, some overlay and network file systems), at open or at the first write, blobs are
    written through the page cache from then on.

    ``O_DIRECT`` is kept only while the disk keeps up with the network. A writing thread that
    falls behind its fetch is given what it has not yet written in memory: every fetch's
    together, up to ``write_buffer`` bytes beyond the batches a fetch always holds (see
    :meth:`room`). A fetch whose writes would take it past that (see
    :class:`proxy.cache.sink.BlobSink`) goes on through the page cache, which takes the bytes
    at memory speed, and so do the blobs fetched in the next ``SLOW_DISK_SECONDS``: on a slow
    disk (eMMC, an SD card, a network block device, a busy SATA disk) the client is fed at the
    network's pace. What waits for the disk is then bounded by ``write_behind`` bytes a blob:
    past that its writer waits for the disk, and the fetch gives up the cache copy rather than
    hold its clients.

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
        write_buffer: int = WRITE_BUFFER_BYTES,
    ) -> None:
        self.root = root
        self.direct = True  # until the file system refuses it
        self.read_back_up_to = read_back_up_to
        self.write_behind = write_behind
        self.write_buffer = write_buffer
        self.lanes: set[Lane] = set()  # the writing threads of the fetches (on the loop)
        self.writing = 0  # blob files being written now (see count_writer)
        self._lock = threading.Lock()  # writers end in worker threads
        self._buffered_until = 0.0  # time.monotonic(): till then, new blobs start buffered
        self._logged = False

    @property
    def starts_direct(self) -> bool:
        """Whether a new blob file starts with ``O_DIRECT``."""
        return self.direct and time.monotonic() >= self._buffered_until

    @property
    def held(self) -> int:
        """Bytes the writing threads have fallen behind by, beyond the batches each fetch always
        holds: what the write buffer holds now."""
        unsent = unsent_bytes()
        return sum(max(0, lane.queued_bytes - unsent) for lane in self.lanes)

    def room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit in the write buffer."""
        return self.held + size <= self.write_buffer

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
        """The disk fell ``write_buffer`` behind the network: new blobs go through the page
        cache for ``SLOW_DISK_SECONDS``."""
        now = time.monotonic()
        self._logged = True  # (a first O_DIRECT write that ends after this says nothing new)
        if now >= self._buffered_until:
            log.info(
                "cache_blob_writes",
                dir=str(self.root),
                mode="buffered",
                reason="the disk is slower than the network",
                write_buffer=self.write_buffer,
                seconds=SLOW_DISK_SECONDS,
            )
        self._buffered_until = now + SLOW_DISK_SECONDS
