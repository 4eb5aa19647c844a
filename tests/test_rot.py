"""A cache file that changes under a running Detour (bit rot, a failing disk, a stray writer)
never reaches a client as a complete 200 with the wrong bytes, and does not stay wrong.

Each test runs ``detour serve`` as a real process against the real registry, caches a blob,
then changes the cached file on disk while Detour runs, as a bad disk would: one bit flipped,
or the file cut short. Three states of the entry: ``checked`` (its checksums, taken by the
fetch, in memory: a hit checks each chunk against its checksum before sending it, so no wrong
byte leaves), ``restarted`` (a new process, which reads the checksums kept with the file in an
extended attribute: the same) and ``unsummed`` (a new process, and the attribute gone, as on a
file system without them or for a blob too large for one: the hit is hashed as it is sent, its
last chunk held back until the digest matches). Either way the bad response is aborted or
never starts, the entry is dropped and counted, and the next request fetches it again.
``detour cache verify`` finds the same offline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import xxhash

from proxy.cache.checksums import SUMS_ATTRIBUTE, Checksums
from proxy.memory import CHECKED_CHUNK_BYTES
from tests.containerd import Containerd
from tests.images import Blob, PushedImage, push_image, unique_repo
from tests.proxy import Proxy, blob_path, scenario, slow_client_get, stop_process, wait_cached
from tests.registry import Registry

DetourProcess = Callable[[dict[str, Any]], Awaitable[Proxy]]
MiB = 1024 * 1024
CHUNK = CHECKED_CHUNK_BYTES  # a hit is checked and sent this much at a time
BIG = 40 * MiB  # many chunks, more than the kernel's socket buffers hold
SMALL = 8 * MiB  # without checksums, hashed whole before the headers
CORRUPTIONS = ("flipped bit", "truncated")
STATES = ("checked", "restarted", "unsummed")
REPO_ROOT = Path(__file__).resolve().parent.parent


def flip_bit(path: Path, offset: int) -> None:
    """Flip the lowest bit of the byte at ``offset``, in place, as bit rot would."""
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 1]))


def corrupt(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "flipped bit":
        flip_bit(path, size // 2)
    else:
        os.truncate(path, size // 2)


def log_records(proxy: Proxy) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proxy.log_lines() if line.strip()]


async def access_lines(proxy: Proxy, path: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` access log lines for ``path``, once the process has written them."""
    deadline = time.monotonic() + 10
    while True:
        lines = [r for r in log_records(proxy) if r["event"] == "request" and r["path"] == path]
        if len(lines) >= count:
            return lines[:count]
        assert time.monotonic() < deadline, f"fewer than {count} access lines for {path}"
        await asyncio.sleep(0.05)


async def corruptions(proxy: Proxy) -> float:
    return await proxy.metric("detour_digest_mismatches_total", kind="blob", registry="cache")


async def get(
    proxy: Proxy, path: str, headers: dict[str, str] | None = None
) -> tuple[int, int | None, bytes, bool]:
    """GET ``path``: (status, Content-Length, the body bytes that came, whether it ended as a
    whole response). An aborted connection is not whole: aiohttp raises ClientPayloadError."""
    async with proxy.session.get(proxy.url + path, headers=headers) as response:
        body = bytearray()
        try:
            async for chunk in response.content.iter_any():
                body += chunk
        except aiohttp.ClientPayloadError:
            return response.status, response.content_length, bytes(body), False
        return response.status, response.content_length, bytes(body), True


async def restart(
    proxy: Proxy, detour_process: DetourProcess, config: dict[str, Any], digest: str, state: str
) -> Proxy:
    """A new process on the same cache; ``unsummed``: the blob's kept checksums removed."""
    await stop_process(proxy)
    if state == "unsummed":
        os.removexattr(blob_path(proxy.cache_dir, digest), SUMS_ATTRIBUTE)
    return await detour_process(config)


async def cached_layer(
    registry: Registry, detour_process: DetourProcess, tmp_path: Path, size: int, state: str
) -> tuple[Proxy, str, Blob, int]:
    """A running Detour with a fresh one-layer image's layer in its cache, in ``state``:
    (proxy, the blob's path on the proxy, the layer, requests for it that proxy logged)."""
    name = unique_repo("x").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=size)
    layer = image.layers[0]
    config = scenario(registry, tmp_path / "cache")
    proxy = await detour_process(config)
    path = f"/v2/{name}/blobs/{layer.digest}"
    assert await get(proxy, path) == (200, layer.size, layer.data, True)
    assert await wait_cached(proxy.cache_dir, layer.digest)
    # A hit waits for the hashing that follows a fetch: after it, the entry is checked.
    assert await get(proxy, path) == (200, layer.size, layer.data, True)
    await access_lines(proxy, path, 2)
    if state == "checked":
        return proxy, path, layer, 2
    return await restart(proxy, detour_process, config, layer.digest, state), path, layer, 0


async def assert_dropped_and_fetched_again(proxy: Proxy, path: str, layer: Blob, seen: int) -> None:
    """Counted once and logged as an error; the next GET (after ``seen`` requests) is a miss
    that brings the right bytes, and caches them again."""
    assert await corruptions(proxy) == 1
    errors = [r for r in log_records(proxy) if r["level"] == "error"]
    assert [(r["event"], r["digest"]) for r in errors] == [("cached_blob_corrupt", layer.digest)]
    assert await get(proxy, path) == (200, layer.size, layer.data, True)
    assert (await access_lines(proxy, path, seen + 1))[seen]["cache"] == "miss"
    assert await wait_cached(proxy.cache_dir, layer.digest)
    assert blob_path(proxy.cache_dir, layer.digest).read_bytes() == layer.data
    assert await corruptions(proxy) == 1


@pytest.mark.parametrize("state", ["checked", "restarted"])
async def test_a_rotten_bit_in_a_checked_blob_is_never_sent(
    detour_process: DetourProcess, registry: Registry, tmp_path: Path, state: str
) -> None:
    # Checked from the checksums the fetch took: in memory, or after a restart from the file.
    proxy, path, layer, seen = await cached_layer(registry, detour_process, tmp_path, BIG, state)
    cached = blob_path(proxy.cache_dir, layer.digest)
    flip_bit(cached, CHUNK + 12345)  # in the second chunk

    status, length, body, whole = await get(proxy, path)

    # The first chunk matched its checksum and went out; the second did not, so it was never
    # sent and the connection was aborted: the client holds only right bytes, short of the
    # blob. (Resumed with a Range, the rest comes from a fresh copy.)
    assert (status, length, whole) == (200, layer.size, False)
    assert body == layer.data[:CHUNK]
    line = (await access_lines(proxy, path, seen + 1))[seen]
    assert (line["status"], line["cache"], line["aborted"], line["bytes"]) == (
        200,
        "hit",
        "cached blob corrupt",
        CHUNK,
    )
    assert await corruptions(proxy) == 1
    assert not cached.exists()
    await assert_dropped_and_fetched_again(proxy, path, layer, seen + 1)


@pytest.mark.parametrize("state", STATES)
async def test_a_hit_not_in_the_page_cache_comes_whole_from_the_disk(
    detour_process: DetourProcess, registry: Registry, tmp_path: Path, state: str
) -> None:
    # A hit reads what the page cache holds on the event loop, and the rest from the disk in a
    # worker thread: with the file's pages dropped, every chunk takes the second way.
    proxy, path, layer, seen = await cached_layer(registry, detour_process, tmp_path, BIG, state)
    fd = os.open(blob_path(proxy.cache_dir, layer.digest), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)

    assert await get(proxy, path) == (200, layer.size, layer.data, True)
    assert (await access_lines(proxy, path, seen + 1))[seen]["cache"] == "hit"
    assert await corruptions(proxy) == 0


@pytest.mark.parametrize("state", ["checked", "restarted"])
async def test_a_checked_blob_cut_short_is_a_miss(
    detour_process: DetourProcess, registry: Registry, tmp_path: Path, state: str
) -> None:
    proxy, path, layer, seen = await cached_layer(registry, detour_process, tmp_path, BIG, state)
    corrupt(blob_path(proxy.cache_dir, layer.digest), "truncated")

    # Not the size it had when it was checked: dropped before any byte, fetched again.
    assert await get(proxy, path) == (200, layer.size, layer.data, True)
    assert (await access_lines(proxy, path, seen + 1))[seen]["cache"] == "miss"
    assert await corruptions(proxy) == 1


@pytest.mark.parametrize("how", CORRUPTIONS)
async def test_without_checksums_a_corrupt_hit_is_aborted_before_its_last_chunk(
    detour_process: DetourProcess, registry: Registry, tmp_path: Path, how: str
) -> None:
    proxy, path, layer, seen = await cached_layer(
        registry, detour_process, tmp_path, BIG, "unsummed"
    )
    cached = blob_path(proxy.cache_dir, layer.digest)
    corrupt(cached, how)
    size_on_disk = cached.stat().st_size

    status, length, body, whole = await get(proxy, path)

    # No checksums: the file is hashed as it is sent, and the last chunk waits for the
    # digest. It did not match: the connection was aborted short of Content-Length.
    assert (status, length, whole) == (200, size_on_disk, False)
    assert len(body) < size_on_disk
    line = (await access_lines(proxy, path, seen + 1))[seen]
    assert (line["status"], line["cache"], line["aborted"]) == (200, "hit", "cached blob corrupt")
    assert line["bytes"] < size_on_disk
    assert await corruptions(proxy) == 1
    assert not cached.exists()
    await assert_dropped_and_fetched_again(proxy, path, layer, seen + 1)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("how", CORRUPTIONS)
async def test_a_small_corrupt_blob_is_a_miss_before_any_byte(
    detour_process: DetourProcess, registry: Registry, tmp_path: Path, how: str, state: str
) -> None:
    # Up to 8 MiB (configs, small layers), a hit is checked before its headers go out:
    # a bad copy is a miss, fetched again, and the client never knows.
    proxy, path, layer, seen = await cached_layer(
        registry, detour_process, tmp_path, 64 * 1024, state
    )
    corrupt(blob_path(proxy.cache_dir, layer.digest), how)

    assert await get(proxy, path) == (200, layer.size, layer.data, True)
    line = (await access_lines(proxy, path, seen + 1))[seen]
    assert (line["cache"], line.get("aborted")) == ("miss", None)
    assert await corruptions(proxy) == 1
    assert await wait_cached(proxy.cache_dir, layer.digest)
    assert blob_path(proxy.cache_dir, layer.digest).read_bytes() == layer.data


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("how", CORRUPTIONS)
async def test_a_range_of_a_corrupt_blob_is_never_wrong_bytes(
    detour_process: DetourProcess, registry: Registry, tmp_path: Path, how: str, state: str
) -> None:
    proxy, path, layer, seen = await cached_layer(registry, detour_process, tmp_path, BIG, state)
    corrupt(blob_path(proxy.cache_dir, layer.digest), how)  # at the middle: a later chunk
    middle = layer.size // 2
    # A range of that chunk: checked (or, without checksums, the whole file hashed)
    # before the 206. It failed, so the range came from a fresh copy, fetched and verified.
    asked = f"bytes={middle - 1000}-{middle + 999}"

    status, _, body, whole = await get(proxy, path, headers={"Range": asked})

    assert (status, whole, body) == (206, True, layer.data[middle - 1000 : middle + 1000])
    assert await corruptions(proxy) == 1
    assert blob_path(proxy.cache_dir, layer.digest).read_bytes() == layer.data
    # Ranges of a good hit are served from it, without a fetch, and checked: the one chunk
    # they need when the entry has checksums (a Range is how clients resume).
    status, _, body, _ = await get(proxy, path, headers={"Range": "bytes=-10"})
    assert (status, body) == (206, layer.data[-10:])
    status, _, body, _ = await get(proxy, path, headers={"Range": f"bytes={CHUNK - 5}-"})
    assert (status, body) == (206, layer.data[CHUNK - 5 :])
    lines = await access_lines(proxy, path, seen + 3)
    assert [line["cache"] for line in lines[seen:]] == ["miss", "hit", "hit"]
    async with proxy.session.get(
        proxy.url + path, headers={"Range": f"bytes={layer.size}-"}
    ) as response:
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{layer.size}"


async def test_a_file_cut_short_while_it_is_sent_is_no_complete_200(
    detour_process: DetourProcess, registry: Registry, tmp_path: Path
) -> None:
    proxy, path, layer, seen = await cached_layer(
        registry, detour_process, tmp_path, BIG, "checked"
    )
    # A client that reads at its own pace: the proxy is still sending when the file is cut.
    reader, writer, head = await slow_client_get(proxy, path)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {layer.size}\r\n".encode() in head
    received = await reader.readexactly(256 * 1024)

    os.truncate(blob_path(proxy.cache_dir, layer.digest), MiB)
    while chunk := await reader.read(MiB):
        received += chunk
    writer.close()

    assert len(received) < layer.size
    assert received == layer.data[: len(received)]
    assert await corruptions(proxy) == 1
    await assert_dropped_and_fetched_again(proxy, path, layer, seen + 1)


@pytest.mark.parametrize(
    ("state", "layer_size"),
    [("checked", BIG), ("restarted", BIG), ("unsummed", BIG), ("unsummed", SMALL // 2)],
    ids=["checked", "restarted", "unsummed", "unsummed-small-layer"],
)
async def test_containerd_pulls_again_after_a_layer_rotted(
    registry: Registry,
    detour_process: DetourProcess,
    containerd: Containerd,
    tmp_path: Path,
    state: str,
    layer_size: int,
) -> None:
    name = unique_repo("x").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=2, layer_size=layer_size
    )
    config = scenario(registry, tmp_path / "cache")
    proxy = await detour_process(config)
    ref = f"{proxy.host}/{name}:v1"
    (await containerd.pull(ref, plain_http=True)).check()
    (await containerd.remove_image(ref)).check()  # its content too: the next pull fetches
    rotten = image.layers[1]
    rotten_path = f"/v2/{name}/blobs/{rotten.digest}"
    await access_lines(proxy, rotten_path, 1)
    (await containerd.pull(ref, plain_http=True)).check()  # a hit: after it, checked
    (await containerd.remove_image(ref)).check()
    await access_lines(proxy, rotten_path, 2)
    if state != "checked":
        proxy = await restart(proxy, detour_process, config, rotten.digest, state)
        ref = f"{proxy.host}/{name}:v1"
    # In a chunk before the last: without checksums, the last chunk (which waits for the
    # digest) would be held back and ctr never see a wrong byte; this is the worst case.
    flipped = rotten.size // 2
    flip_bit(blob_path(proxy.cache_dir, rotten.digest), flipped)
    before = flipped // CHUNK * CHUNK  # the chunks before it, which are right

    first = await containerd.pull(ref, plain_http=True)

    assert await corruptions(proxy) == 1
    seen = 2 if state == "checked" else 0
    lines = (await access_lines(proxy, rotten_path, seen + (rotten.size > SMALL) + 1))[seen:]
    if rotten.size <= SMALL:
        # Hashed before its headers went out: a miss, fetched again. ctr never knew.
        first.check()
        assert [(r["status"], r["cache"]) for r in lines] == [(200, "miss")]
    elif state in ("checked", "restarted"):
        # Aborted at the chunk that failed its checksum, before a byte of it was sent; ctr
        # resumed with a Range from there, and Detour answered that from a fresh copy. No
        # wrong byte reached ctr, and the pull succeeded.
        first.check()
        assert [(r["status"], r["cache"], r.get("aborted")) for r in lines] == [
            (200, "hit", "cached blob corrupt"),
            (206, "miss", None),
        ]
        assert lines[0]["bytes"] == before
        # ctr resumed from the bytes it had: at most the ones sent (on a busy machine the
        # connection's reset can drop the last of them before ctr reads them), never past.
        resumed_at = rotten.size - lines[1]["bytes"]
        assert 0 <= resumed_at <= before
    else:
        # Sent as it was hashed, and aborted before its last byte. ctr resumes an aborted
        # body with a Range and Detour answers that from a fresh copy, but ctr keeps the
        # wrong bytes it already had: its digest check fails, and this pull with it.
        assert first.returncode != 0
        assert "unexpected commit digest" in first.stderr
        assert [(r["status"], r["cache"], r.get("aborted")) for r in lines] == [
            (200, "hit", "cached blob corrupt"),
            (206, "miss", None),
        ]
        # containerd keeps that pull's wrong download until its garbage collector takes it, a
        # moment after the pull ends; a pull before then fails on it again without asking
        # Detour. kubelet's back-off (10 s at first) waits longer.
        await ingests_collected(containerd)
        # The entry was dropped and fetched again: the next pull gets the right bytes.
        (await containerd.pull(ref, plain_http=True)).check()
    await assert_image(containerd, ref, image)
    assert blob_path(proxy.cache_dir, rotten.digest).read_bytes() == rotten.data


async def ingests_collected(containerd: Containerd, limit: float = 10.0) -> None:
    """Until containerd has no download in progress (``ctr content active`` lists none)."""
    deadline = time.monotonic() + limit
    while len((await containerd.ctr("content", "active")).check().stdout.splitlines()) > 1:
        assert time.monotonic() < deadline, "containerd kept a failed download"
        await asyncio.sleep(0.1)


async def assert_image(containerd: Containerd, ref: str, image: PushedImage) -> None:
    assert await containerd.image_digest(ref) == image.digest
    status = await containerd.image_status(ref)
    assert status is not None
    assert status[1]  # unpacked: every layer was a good tar.gz


def verify(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "cache", "verify", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        timeout=60,
    )


def put(root: Path, kind: str, data: bytes, body: bytes | None = None) -> Path:
    """A file in the cache layout, named for the digest of ``body`` (default: ``data``)."""
    hexpart = hashlib.sha256(data if body is None else body).hexdigest()
    path = root / kind / "sha256" / hexpart[:2] / hexpart
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_cache_verify_drops_what_is_wrong(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    good = put(root, "blobs", os.urandom(3 * MiB))
    flipped = put(root, "blobs", os.urandom(2 * MiB))
    flip_bit(flipped, MiB)
    truncated = put(root, "blobs", os.urandom(MiB))
    os.truncate(truncated, 1000)
    body = json.dumps({"schemaVersion": 2}).encode()
    manifest = put(root, "manifests", b"application/vnd.oci.image.manifest.v1+json\n" + body, body)
    # Named for the whole file, not the manifest after its media type line: wrong.
    rotten_data = b"application/vnd.oci.image.index.v1+json\n" + body
    rotten = put(root, "manifests", rotten_data)
    (root / "tmp").mkdir()
    leftover, writing = root / "tmp" / "ab.1.partial", root / "tmp" / "cd.2.partial"
    leftover.write_bytes(b"x")
    writing.write_bytes(b"y")
    hours_ago = time.time() - 2 * 3600
    os.utime(leftover, (hours_ago, hours_ago))

    result = verify(root)

    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(lines[:-1]) == sorted(
        [
            f"dropped {flipped.relative_to(root)}: does not match its digest ({2 * MiB} bytes)",
            f"dropped {truncated.relative_to(root)}: does not match its digest (1000 bytes)",
            f"dropped {rotten.relative_to(root)}: does not match its digest "
            f"({len(rotten_data)} bytes)",
        ]
    )
    assert lines[-1] == "checked 3 blobs, 2 manifests; dropped 3; removed 1 leftover temp files"
    assert [p.exists() for p in (good, flipped, truncated, manifest, rotten)] == [
        True,
        False,
        False,
        True,
        False,
    ]
    # A temp file a running proxy may still be writing is left alone.
    assert (leftover.exists(), writing.exists()) == (False, True)

    again = verify(root)
    assert (again.returncode, again.stdout) == (0, "checked 1 blobs, 1 manifests; dropped 0\n")
    # The right blob, put there without checksums, now has them: its hits after a restart
    # are checked chunk by chunk.
    fd = os.open(good, os.O_RDONLY)
    try:
        kept = Checksums.load(fd)
    finally:
        os.close(fd)
    assert kept is not None
    data = good.read_bytes()
    chunks = [data[at : at + CHUNK] for at in range(0, len(data), CHUNK)]
    sums = [xxhash.xxh3_64_intdigest(chunk) for chunk in chunks]
    assert (kept.size, list(kept.sums)) == (len(data), sums)

    bad_argument = verify(tmp_path / "nowhere")
    assert bad_argument.returncode == 2
    assert "not a cache directory" in bad_argument.stderr


async def test_cache_verify_beside_a_running_proxy(
    detour_process: DetourProcess, registry: Registry, tmp_path: Path
) -> None:
    proxy, path, layer, seen = await cached_layer(
        registry, detour_process, tmp_path, BIG, "checked"
    )
    flip_bit(blob_path(proxy.cache_dir, layer.digest), 12345)

    result = await asyncio.to_thread(verify, proxy.cache_dir)

    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[-1] == "checked 1 blobs, 0 manifests; dropped 1"
    # The proxy's index still lists the entry; its file is gone: a miss, fetched again.
    assert await get(proxy, path) == (200, layer.size, layer.data, True)
    assert (await access_lines(proxy, path, seen + 1))[seen]["cache"] == "miss"
    assert await corruptions(proxy) == 0
