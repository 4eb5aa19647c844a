"""The on-disk cache: blobs and manifests by digest, tags mapped to digests.

Layout under ``cache.dir``::

    blobs/sha256/ab/ab12…        verified blob bytes
    manifests/sha256/ab/ab12…    "<media type>\\n<manifest bytes>"
    tags/<sha256 of name:tag>    JSON TagRecord
    tmp/                         files being written; emptied at start-up, never served

Every file is written under ``tmp/`` in the same file system, fsynced, and moved into place
with ``os.replace``, so a reader sees a whole verified file or none. Paths are built only from
validated digests and from hashes of names, never from request text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import UpstreamInvalid
from proxy.reference import Digest, ImageName

MANIFEST_MAX_BYTES = 4 * 1024 * 1024  # distribution's own limit


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: Digest
    media_type: str
    checked_at: float  # time.time() when the upstream last confirmed it

    def age(self) -> float:
        return time.time() - self.checked_at


class BlobWriter:
    """A blob being written: hashed as it is written, moved into place only once verified.

    ``write`` is blocking; call it from a worker thread. ``path`` may be opened for reading by
    others while the writer appends: the bytes up to ``size`` are there.
    """

    def __init__(self, digest: Digest, final: Path, tmp_dir: Path) -> None:
        self.digest = digest
        self.final = final
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=f"{digest.hex[:16]}.", suffix=".partial")
        self._fd: int | None = fd
        self.path = Path(name)
        self.size = 0
        self._hasher = digest.hasher()

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        self._hasher.update(data)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)

    def matches(self, expected_size: int | None = None) -> bool:
        if expected_size is not None and expected_size != self.size:
            return False
        return self._hasher.hexdigest() == self.digest.hex

    def sync(self) -> None:
        """Flush to disk (blocking: call from a worker thread) before :meth:`commit`."""
        assert self._fd is not None
        os.fsync(self._fd)

    def commit(self) -> None:
        """Move into place; the caller has checked :meth:`matches` and called :meth:`sync`."""
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        self.final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, self.final)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class CacheStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"

    def open(self) -> None:
        """Create the layout and remove what a previous run left half-written."""
        for sub in ("blobs", "manifests", "tags", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    def writable(self) -> bool:
        try:
            with tempfile.NamedTemporaryFile(dir=self.tmp, suffix=".probe"):
                return True
        except OSError:
            return False

    # ----------------------------------------------------------------------- blobs

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex

    def blob_size(self, digest: Digest) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def begin_blob(self, digest: Digest) -> BlobWriter:
        return BlobWriter(digest, self.blob_path(digest), self.tmp)

    # ----------------------------------------------------------------------- manifests

    def _manifest_path(self, digest: Digest) -> Path:
        return self.root / "manifests" / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest(self, digest: Digest) -> StoredManifest | None:
        """The stored manifest, re-verified (it is small, and this is what clients trust)."""
        try:
            raw = self._manifest_path(digest).read_bytes()
        except FileNotFoundError:
            return None
        media_type, sep, body = raw.partition(b"\n")
        if not sep or Digest.of(body, digest.algorithm) != digest:
            with contextlib.suppress(OSError):
                self._manifest_path(digest).unlink()
            return None
        return StoredManifest(digest, media_type.decode("ascii", "replace"), body)

    def put_manifest(self, manifest: StoredManifest) -> None:
        if Digest.of(manifest.body, manifest.digest.algorithm) != manifest.digest:
            raise UpstreamInvalid("manifest does not match its digest")
        if "\n" in manifest.media_type or not manifest.media_type.isascii():
            raise UpstreamInvalid("invalid manifest media type")
        data = manifest.media_type.encode("ascii") + b"\n" + manifest.body
        self._atomic_write(self._manifest_path(manifest.digest), data)

    # ----------------------------------------------------------------------- tags

    def _tag_path(self, name: ImageName, tag: str) -> Path:
        key = hashlib.sha256(f"{name}:{tag}".encode()).hexdigest()
        return self.root / "tags" / key[:2] / key

    def tag(self, name: ImageName, tag: str) -> TagRecord | None:
        try:
            data = json.loads(self._tag_path(name, tag).read_bytes())
            if data["name"] != str(name) or data["tag"] != tag:
                return None
            return TagRecord(
                Digest.parse(data["digest"]), str(data["media_type"]), float(data["checked_at"])
            )
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def put_tag(self, name: ImageName, tag: str, record: TagRecord) -> None:
        data = {
            "name": str(name),
            "tag": tag,
            "digest": str(record.digest),
            "media_type": record.media_type,
            "checked_at": record.checked_at,
        }
        self._atomic_write(self._tag_path(name, tag), json.dumps(data).encode())

    def drop_tag(self, name: ImageName, tag: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._tag_path(name, tag).unlink()

    # ----------------------------------------------------------------------- helpers

    def _atomic_write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.tmp, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
