"""Writing one blob into the cache: hashed (sha256, and a sum per chunk for its hits) as it
is written to a temp file, moved into place only once verified.

Blob files are written with ``O_DIRECT`` where the file system takes it and the disk keeps up
with the network, through a page-aligned buffer; through the page cache where it doesn't (see
:class:`~proxy.cache.write_mode.WriteMode`). How the bytes reach the file is
:class:`~proxy.cache.appender.Appender`'s; this module is the blob's lifecycle around it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from proxy.cache.appender import Appender
from proxy.cache.checksums import ChecksumHasher, Checksums
from proxy.cache.file_io import read_back
from proxy.cache.write_mode import WriteMode
from proxy.lane import Chunk
from proxy.reference import Digest


class BlobWriter:
    """A blob being written: hashed as it is written, moved into place only once verified.

    :meth:`write` (to the temp file) and :meth:`update` (the hash) are blocking and touch
    separate state, so two worker threads can run them side by side, each call in the order of
    the bytes. ``path`` may be opened for reading by others while the writer appends: the first
    ``on_disk`` bytes are there. The bytes go to the file through an
    :class:`~proxy.cache.appender.Appender`: with ``O_DIRECT`` the last partial block is held
    back until :meth:`finish`; after :meth:`go_buffered` (the disk fell behind the network) the
    rest goes through the page cache, and the disk is waited for when more than
    ``write_behind`` bytes may wait for it (``disk_behind`` while it is).

    With the length the upstream ``announced``, the first write takes the blob's room on the
    disk at once. When the disk refuses (full, or an I/O error), ``write`` raises ``OSError``
    and writes nothing more; hashing goes on, so the blob can still be verified as it streams
    by, but it will not be cached. ``path`` is None when not even the temp file could be made.
    """

    def __init__(
        self,
        digest: Digest,
        final: Path,
        tmp_dir: Path,
        mode: WriteMode | None = None,
        *,
        announced: int | None = None,
    ) -> None:
        self.digest = digest
        self.final = final
        self.size = 0  # bytes hashed
        self._hasher = digest.hasher()
        self._checksum_hasher = ChecksumHasher()  # for the hits' checks, once the digest matched
        self.checksums: Checksums | None = None  # once committed
        self.path: Path | None = None
        self.failure: OSError | None = None
        self._mode = mode
        self._file: Appender | None = None  # the temp file, open until committed or discarded
        self._counted = False  # in mode.writing
        try:
            fd, name = tempfile.mkstemp(
                dir=tmp_dir, prefix=f"{digest.hex[:16]}.", suffix=".partial"
            )
        except OSError as exc:
            self.failure = exc
            return
        self.path = Path(name)
        if mode is not None:
            mode.count_writer(1)
            self._counted = True
        self._file = Appender(fd, mode, announced)

    @property
    def on_disk(self) -> int:
        """Bytes in the temp file."""
        return 0 if self._file is None else self._file.on_disk

    @property
    def direct(self) -> bool:
        """Whether this file is being written with ``O_DIRECT``."""
        return self._file is not None and self._file.direct

    @property
    def disk_behind(self) -> bool:
        """Whether a write is waiting for the disk, more than ``write_behind`` behind."""
        return self._file is not None and self._file.disk_behind

    def go_buffered(self) -> None:
        """From the loop: write the rest through the page cache (from the next :meth:`write`)."""
        if self._file is not None:
            self._file.go_buffered()

    def write(self, chunks: Sequence[Chunk]) -> None:
        """Append ``chunks`` to the file (blocking)."""
        file = self._open_file()
        try:
            file.write(chunks)
        except OSError as exc:
            self.failure = exc
            raise

    def finish(self) -> None:
        """Write the last partial block held back by ``O_DIRECT`` (blocking): after the last
        :meth:`write`, before :meth:`commit`."""
        file = self._open_file()
        try:
            file.finish()
        except OSError as exc:
            self.failure = exc
            raise

    def _open_file(self) -> Appender:
        if self._file is None or self._file.closed:
            raise self.failure or OSError("blob writer is closed")
        return self._file

    def update(self, chunks: Sequence[Chunk]) -> None:
        """Hash ``chunks`` (blocking)."""
        for chunk in chunks:
            self._hasher.update(chunk)
            self._checksum_hasher.update(chunk)
            self.size += len(chunk)

    def matches(self, expected_size: int | None = None) -> bool:
        if expected_size is not None and expected_size != self.size:
            return False
        return self._hasher.hexdigest() == self.digest.hex

    @property
    def complete_on_disk(self) -> bool:
        return self.failure is None and self.on_disk == self.size

    def commit(self) -> None:
        """Flush to the disk, read back into the page cache (see
        :class:`~proxy.cache.write_mode.WriteMode`), and move into place (blocking: call from
        a worker thread); the caller has checked :meth:`matches`."""
        file = self._file
        assert file is not None
        assert not file.closed
        assert self.path is not None
        os.fsync(file.fd)
        mode = self._mode
        direct_bytes = self.size if file.buffered_from < 0 else file.buffered_from
        if mode is not None and direct_bytes and self.size <= mode.read_back_up_to:
            read_back(file.fd, direct_bytes, mode.others_writing)
        stat = os.fstat(file.fd)
        self.checksums = Checksums(
            (stat.st_dev, stat.st_ino), self.size, self._checksum_hasher.finish()
        )
        self.checksums.save(file.fd)
        file.close()
        self._uncount()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, self.final)

    def _uncount(self) -> None:
        if self._counted and self._mode is not None:
            self._counted = False
            self._mode.count_writer(-1)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._uncount()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
