"""The cache store on its own: a blob's way into the cache (written, committed, admitted), and the
index's space accounting and eviction. A real directory, real files; what is asserted is what
is on disk and what the store counts, as ``/metrics`` and ``detour cache ls`` show it."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.cache.checksums import Checksums
from proxy.cache.store import CacheStore
from proxy.cache.writer import BlobWriter
from proxy.memory import CHECKED_CHUNK_BYTES
from proxy.reference import Digest

MiB = 1 << 20


def blob(size: int) -> tuple[bytes, Digest]:
    data = os.urandom(size)
    return data, Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


async def store_at(
    root: Path, max_size: int | None = None, read_back_up_to: int = 0
) -> tuple[CacheStore, list[Path]]:
    evicted: list[Path] = []

    def evict(paths: list[Path]) -> None:
        evicted.extend(paths)
        for path in paths:
            path.unlink()

    store = CacheStore(root, max_size, on_evict=evict, read_back_up_to=read_back_up_to)
    await asyncio.to_thread(store.open)
    return store, evicted


def written(store: CacheStore, data: bytes, digest: Digest) -> BlobWriter:
    """A blob written and hashed as a fetch does it, not yet committed."""
    writer = BlobWriter(digest, store.blob_path(digest), store.tmp, store.write_mode)
    for offset in range(0, len(data), MiB):
        chunk = data[offset : offset + MiB]
        writer.update([chunk])
        writer.write([chunk])
    writer.finish()
    assert writer.matches(len(data))
    return writer


async def commit_blob(store: CacheStore, writer: BlobWriter, reserved: int) -> Checksums:
    """Into the cache as a fetch's sink puts it (BlobSink.commit): the file flushed and moved
    into place in a worker thread, then indexed under the ``reserved`` bytes."""
    await asyncio.get_running_loop().run_in_executor(None, writer.commit)
    store.admit(writer.final, writer.size, reserved)
    assert writer.checksums is not None
    return writer.checksums


async def test_a_committed_blob_is_in_place_indexed_and_summed(tmp_path: Path) -> None:
    store, _ = await store_at(tmp_path / "cache", max_size=64 * MiB)
    data, digest = blob(5 * MiB + 7)
    assert store.reserve(len(data))
    writer = written(store, data, digest)
    checksums = await commit_blob(store, writer, len(data))
    final = store.blob_path(digest)
    assert final.read_bytes() == data
    assert list(store.tmp.iterdir()) == []
    assert (store.total, store.reserved) == (len(data), 0)
    assert store.blob_size(digest) == len(data)
    stat = final.stat()
    assert checksums.identity == (stat.st_dev, stat.st_ino)  # the file as committed
    assert checksums.size == len(data)
    assert len(checksums.sums) == -(-len(data) // CHECKED_CHUNK_BYTES)
    # Kept with the file too (an extended attribute), for the hits after a restart.
    fd = os.open(final, os.O_RDONLY)
    try:
        assert Checksums.load(fd) == checksums
    finally:
        os.close(fd)


def in_page_cache(path: Path) -> int:
    """Bytes of ``path`` in the page cache, as util-linux's ``fincore`` counts them."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip())


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
@pytest.mark.parametrize("read_back_up_to", [0, 8 * MiB, 2 * MiB])
async def test_a_fetched_blob_is_read_back_into_the_page_cache_up_to_the_setting(
    tmp_path: Path, read_back_up_to: int
) -> None:
    # Written with O_DIRECT, a blob is on the disk only; read back, its first hit comes from
    # memory. Up to cache.read_back_up_to; 0 leaves the page cache to the workloads.
    store, _ = await store_at(tmp_path / "cache", read_back_up_to=read_back_up_to)
    data, digest = blob(5 * MiB + 7)
    writer = written(store, data, digest)
    if not store.write_mode.direct:
        pytest.skip(f"{tmp_path} refuses O_DIRECT: blobs go through the page cache anyway")
    await commit_blob(store, writer, 0)
    resident = in_page_cache(store.blob_path(digest))
    if len(data) <= read_back_up_to:
        assert resident == -(-len(data) // 4096) * 4096  # every page
    else:
        assert resident <= 4096  # at most the last partial block, written without O_DIRECT


async def test_a_blob_takes_its_room_on_the_disk_at_its_first_write(
    tmpfs: Callable[[str], Path],
) -> None:
    # The length the upstream announced is taken at once (df shows it): a blob's writes fill
    # room it already has, and one too large for what is left is refused at its first write,
    # before any of it fills the disk under the blobs being written beside it.
    disk = tmpfs("8m")
    store, _ = await store_at(disk / "cache")
    data, digest = blob(5 * MiB)
    free = shutil.disk_usage(disk).free
    writer = BlobWriter(
        digest, store.blob_path(digest), store.tmp, store.write_mode, announced=len(data)
    )
    writer.write([data[: 64 << 10]])
    assert free - shutil.disk_usage(disk).free >= len(data)
    assert writer.path is not None
    assert writer.path.stat().st_size == 64 << 10  # its size: what was written
    for offset in range(64 << 10, len(data), MiB):
        writer.write([data[offset : offset + MiB]])
    writer.update([data])
    writer.finish()
    await commit_blob(store, writer, 0)
    assert store.blob_path(digest).read_bytes() == data

    big, big_digest = blob(6 * MiB)
    free = shutil.disk_usage(disk).free
    refused = BlobWriter(
        big_digest, store.blob_path(big_digest), store.tmp, store.write_mode, announced=len(big)
    )
    with pytest.raises(OSError, match="No space left") as full:
        refused.write([big[: 64 << 10]])
    assert full.value.errno == errno.ENOSPC
    assert shutil.disk_usage(disk).free == free  # none of it on the disk
    refused.discard()
    assert list(store.tmp.iterdir()) == []


async def test_a_commit_the_disk_refuses_leaves_nothing_indexed(tmp_path: Path) -> None:
    store, _ = await store_at(tmp_path / "cache", max_size=64 * MiB)
    data, digest = blob(1 * MiB)
    assert store.reserve(len(data))
    writer = written(store, data, digest)
    # Where the blob's directory should be, a file: the move into place fails (as root too).
    final = store.blob_path(digest)
    final.parent.parent.mkdir(parents=True, exist_ok=True)
    final.parent.write_bytes(b"")
    with pytest.raises(FileExistsError):
        await commit_blob(store, writer, len(data))
    assert store.total == 0
    assert store.reserved == len(data)  # the caller releases it with the discarded file
    writer.discard()
    store.release(len(data))
    assert list(store.tmp.iterdir()) == []
    assert store.reserved == 0


async def test_the_least_recently_used_unpinned_blob_is_evicted(tmp_path: Path) -> None:
    store, evicted = await store_at(tmp_path / "cache", max_size=3 * MiB)
    paths = []
    for _ in range(3):
        data, digest = blob(1 * MiB)
        assert store.reserve(len(data))
        await commit_blob(store, written(store, data, digest), len(data))
        paths.append(store.blob_path(digest))
    oldest, middle, newest = paths
    store.pin(oldest)  # being sent: not evicted
    store.touch(middle)  # a hit: now the most recently used
    data, digest = blob(1 * MiB)
    assert store.reserve(len(data))  # room is made for it
    assert evicted == [newest]
    assert store.total + store.reserved <= 3 * MiB
    store.unpin(oldest)
    assert store.reserve(4 * MiB) is False  # more than max_size: never reserved
    assert oldest.exists()
    assert middle.exists()
