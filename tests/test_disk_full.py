"""A full disk (ENOSPC) degrades to streaming without caching: never an error for a client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.images import Blob, push_image, unique_repo
from tests.proxy import Proxy, blob_path, scenario, wait_cached, wait_no_temp_files
from tests.registry import Registry

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmpfs: Callable[[str], Path]) -> Path:
    """A real 8 MiB file system (tmpfs) for the cache."""
    return tmpfs("8m")


def hub_layer(registry: Registry, size: int) -> tuple[str, Blob]:
    name = unique_repo("x").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=size)
    return name, image.layers[0]


async def get(proxy: Proxy, name: str, digest: str) -> tuple[int, bytes]:
    async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{digest}") as response:
        return response.status, await response.read()


def cached(proxy: Proxy, digest: str) -> bool:
    return blob_path(proxy.cache_dir, digest).is_file()


async def test_a_full_disk_streams_without_caching(
    make_proxy: MakeProxy, registry: Registry, small_disk: Path
) -> None:
    proxy = await make_proxy(scenario(registry, small_disk / "cache"))
    first_name, first = hub_layer(registry, 5 * MiB)
    big_name, big = hub_layer(registry, 6 * MiB)
    assert await get(proxy, first_name, first.digest) == (200, first.data)
    assert await wait_cached(proxy.cache_dir, first.digest)

    # Runs out of space a few MiB in: three clients, and every one gets the whole blob.
    results = await asyncio.gather(*(get(proxy, big_name, big.digest) for _ in range(3)))
    assert results == [(200, big.data)] * 3
    assert not cached(proxy, big.digest)
    assert await wait_no_temp_files(proxy.cache_dir)  # the partial file, deleted
    failures = await proxy.metric("detour_cache_write_failures_total", reason="disk_full")
    assert failures >= 1
    # What was cached before is still served, and so is the big one, still uncached.
    assert await get(proxy, first_name, first.digest) == (200, first.data)
    assert await get(proxy, big_name, big.digest) == (200, big.data)


async def test_a_disk_with_no_room_at_all(
    make_proxy: MakeProxy, registry: Registry, small_disk: Path
) -> None:
    proxy = await make_proxy(scenario(registry, small_disk / "cache"))
    filler = small_disk / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * MiB)
                out.flush()
        except OSError:
            pass
    name, layer = hub_layer(registry, 2 * MiB)
    assert await get(proxy, name, layer.digest) == (200, layer.data)
    assert not cached(proxy, layer.digest)
    async with proxy.session.get(f"{proxy.url}/readyz") as response:
        assert response.status == 503  # not ready: the cache can't take anything
