"""A bounded cache: least recently used entries go first, never one under its reader."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.images import ACCEPT_ALL, PushedImage, push_image, unique_repo
from tests.proxy import Proxy, scenario
from tests.registry import Registry

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
MiB = 1024 * 1024


def disk_usage(proxy: Proxy) -> int:
    return sum(
        p.stat().st_size
        for kind in ("blobs", "manifests")
        for p in (proxy.cache_dir / kind).rglob("*")
        if p.is_file()
    )


async def settled_usage(proxy: Proxy) -> int:
    """Disk usage once the cache is at rest: verified blobs committed (just after their clients
    are served), evicted files deleted (by a worker thread), and the index agreeing with disk."""
    for _ in range(250):
        usage = disk_usage(proxy)
        in_flight = list((proxy.cache_dir / "tmp").iterdir())
        if not in_flight and usage == await proxy.metric("detour_cache_size_bytes"):
            return usage
        await asyncio.sleep(0.02)
    raise AssertionError(f"the cache never settled: {usage} bytes on disk, {in_flight}")


def cached(proxy: Proxy, digest: str) -> bool:
    hexpart = digest.removeprefix("sha256:")
    return (proxy.cache_dir / "blobs" / "sha256" / hexpart[:2] / hexpart).is_file()


def images(registry: Registry, count: int, size: int) -> list[tuple[str, PushedImage]]:
    out = []
    for _ in range(count):
        name = unique_repo("x").split("/")[1]
        image = push_image(
            registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=size
        )
        out.append((name, image))
    return out


async def pull(proxy: Proxy, name: str, image: PushedImage) -> None:
    url = f"{proxy.url}/v2/{name}/manifests/v1"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
    for blob in image.blobs:
        async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{blob.digest}") as response:
            assert await response.read() == blob.data


async def bounded_proxy(make_proxy: MakeProxy, registry: Registry, tmp_path: Path) -> Proxy:
    cache = {"dir": str(tmp_path / "cache"), "max_size": "10MiB"}
    return await make_proxy(scenario(registry, tmp_path / "cache", cache=cache))


async def test_the_cache_stays_under_max_size_while_pulls_go_on(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await bounded_proxy(make_proxy, registry, tmp_path)
    pushed = images(registry, 9, 3 * MiB)
    for name, image in pushed[:5]:
        await pull(proxy, name, image)
        assert await settled_usage(proxy) <= 10 * MiB
    # Concurrent pulls too; once they are done nothing is pinned and the bound holds again.
    await asyncio.gather(*(pull(proxy, name, image) for name, image in pushed[5:]))
    assert await settled_usage(proxy) <= 10 * MiB
    assert await proxy.metric("detour_cache_evictions_total") >= 6


async def test_a_hit_refreshes_an_entry(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await bounded_proxy(make_proxy, registry, tmp_path)
    (a, image_a), (b, image_b), (c, image_c), (d, image_d) = images(registry, 4, 3 * MiB)
    for name, image in ((a, image_a), (b, image_b), (c, image_c)):
        await pull(proxy, name, image)
        await settled_usage(proxy)
    await pull(proxy, a, image_a)  # a hit: A is now the most recently used
    await pull(proxy, d, image_d)
    await settled_usage(proxy)
    assert cached(proxy, image_a.layers[0].digest)
    assert not cached(proxy, image_b.layers[0].digest)
    assert cached(proxy, image_d.layers[0].digest)


async def test_an_entry_being_served_is_not_evicted_under_its_reader(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    cache = {"dir": str(tmp_path / "cache"), "max_size": "40MiB"}
    proxy = await make_proxy(scenario(registry, tmp_path / "cache", cache=cache))
    # Big enough that sendfile can't hand it all to socket buffers while the client waits.
    ((big, image_big),) = images(registry, 1, 32 * MiB)
    others = images(registry, 3, 12 * MiB)
    await pull(proxy, big, image_big)
    layer = image_big.layers[0]
    url = f"{proxy.url}/v2/{big}/blobs/{layer.digest}"
    async with proxy.session.get(url) as slow:  # a hit, read slowly
        first = await slow.content.readexactly(MiB)
        for name, image in others:  # each of these pushes the cache over 40 MiB
            await pull(proxy, name, image)
        await settled_usage(proxy)
        assert cached(proxy, layer.digest)  # the oldest entry, still there under its reader
        assert first + await slow.read() == layer.data
    # Once its reader is done, it goes like any other old entry.
    name, image = others[0]
    await pull(proxy, name, image)
    await settled_usage(proxy)
    assert not cached(proxy, layer.digest)


async def test_the_index_is_rebuilt_from_disk_after_a_restart(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await bounded_proxy(make_proxy, registry, tmp_path)
    for name, image in images(registry, 2, 2 * MiB):
        await pull(proxy, name, image)
    on_disk = await settled_usage(proxy)
    restarted = await bounded_proxy(make_proxy, registry, tmp_path)
    assert await restarted.metric("detour_cache_size_bytes") == on_disk
    # A smaller bound at start-up trims what is already there.
    cache = {"dir": str(tmp_path / "cache"), "max_size": "3MiB"}
    smaller = await make_proxy(scenario(registry, tmp_path / "cache", cache=cache))
    assert await settled_usage(smaller) <= 3 * MiB
