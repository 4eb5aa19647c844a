"""A cold pull on a slow disk: the client is fed at the network's pace, not the disk's.

The cache is on :class:`tests.slow_disk.SlowDisk`, an ext4 file system whose writes the block
layer holds to 8 MB/s; the mirror serves from loopback, far faster. What reached the disk when
the client had its last byte tells whether the client waited for the disk.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from tests.images import Client, unique_repo
from tests.proxy import Proxy, scenario, wait_cached
from tests.registry import Registry
from tests.slow_disk import SlowDisk

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
MiB = 1 << 20
DISK_RATE = 8_000_000  # bytes a second: an SD card's writes
BLOB = 64 * MiB  # 8.4 s of the disk's time


@pytest.fixture
def slow_disk() -> Iterator[SlowDisk]:
    with SlowDisk(DISK_RATE) as disk:
        yield disk


def push_blob(mirror: Registry) -> tuple[str, str, bytes]:
    """A 64 MiB blob in a Docker Hub repository of the mirror: (name, digest, bytes)."""
    name = unique_repo("slow").split("/")[1]
    data = random.Random(7).randbytes(BLOB)
    digest = Client(mirror).push_blob(f"docker-mirror/library/{name}", data)
    return name, digest, data


async def cold_get(proxy: Proxy, disk: SlowDisk, name: str, digest: str) -> tuple[bytes, int]:
    """The whole blob, and the bytes the disk had written when the client had its last one."""
    url = f"{proxy.url}/v2/{name}/blobs/{digest}"
    async with proxy.session.get(url) as response:
        assert response.status == 200
        body = await response.read()
        return body, disk.written()


@pytest.mark.parametrize(
    ("write_buffer", "mode"),
    [
        ("128MiB", "direct"),  # the whole blob fits: held in memory, written with O_DIRECT
        ("16MiB", "buffered"),  # 16 MiB held, then the rest through the page cache
    ],
)
async def test_a_cold_blob_reaches_the_client_before_the_slow_disk_has_it(
    slow_disk: SlowDisk,
    make_registry: Callable[..., Registry],
    detour_process: StartProxy,
    write_buffer: str,
    mode: str,
) -> None:
    mirror = make_registry()
    name, digest, data = push_blob(mirror)
    config = scenario(mirror, slow_disk.path / "cache")
    config["cache"]["write_buffer"] = write_buffer
    proxy = await detour_process(config)
    before = slow_disk.written()
    body, written = await cold_get(proxy, slow_disk, name, digest)
    assert hashlib.sha256(body).hexdigest() == digest.removeprefix("sha256:")
    # The client had every byte while the disk had not written half of them: fed at the
    # network's pace, with Detour's write buffer (and past it the page cache) taking what the
    # disk could not yet.
    assert written - before < BLOB / 2, f"{(written - before) / MiB:.0f} MiB on the disk"
    # The cache copy is completed behind the client, verified, and serves the next pull.
    assert await wait_cached(proxy.cache_dir, digest, limit=30), "\n".join(proxy.log_lines()[-15:])
    mark = mirror.mark()
    async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{digest}") as response:
        assert await response.read() == data
    assert mirror.paths_since(mark) == []
    modes = [
        json.loads(line).get("mode") for line in proxy.log_lines() if '"cache_blob_writes"' in line
    ]
    assert modes[-1] == mode, modes


async def test_a_disk_further_behind_than_write_behind_costs_the_copy_not_the_client(
    slow_disk: SlowDisk, make_registry: Callable[..., Registry], detour_process: StartProxy
) -> None:
    mirror = make_registry()
    name, digest, data = push_blob(mirror)
    config = scenario(mirror, slow_disk.path / "cache")
    config["cache"]["write_buffer"] = "8MiB"
    config["cache"]["write_behind"] = "8MiB"
    proxy = await detour_process(config)
    before = slow_disk.written()
    body, written = await cold_get(proxy, slow_disk, name, digest)
    assert body == data
    assert written - before < BLOB / 2, f"{(written - before) / MiB:.0f} MiB on the disk"
    failures = "detour_cache_write_failures_total"
    assert await proxy.metric(failures, reason="disk_behind") == 1
    # Not kept: the next pull fetches it again, whole and right.
    assert not await wait_cached(proxy.cache_dir, digest, limit=2)
    mark = mirror.mark()
    async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{digest}") as response:
        assert await response.read() == data
    paths = await mirror.wait_paths(mark, at_least=1)
    assert paths == [f"/v2/docker-mirror/library/{name}/blobs/{digest}"]
