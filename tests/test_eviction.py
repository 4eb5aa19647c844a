"""A bounded cache: least recently used entries go first, never one under its reader."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.images import PushedImage, push_image, unique_repo
from tests.proxy import Proxy, blob_path, pull_image, scenario, slow_client_get
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
    return blob_path(proxy.cache_dir, digest).is_file()


def images(registry: Registry, count: int, size: int) -> list[tuple[str, PushedImage]]:
    out = []
    for _ in range(count):
        name = unique_repo("x").split("/")[1]
        image = push_image(
            registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=size
        )
        out.append((name, image))
    return out


async def bounded_proxy(make_proxy: MakeProxy, registry: Registry, tmp_path: Path) -> Proxy:
    cache = {"dir": str(tmp_path / "cache"), "max_size": "10MiB"}
    return await make_proxy(scenario(registry, tmp_path / "cache", cache=cache))


async def test_the_cache_stays_under_max_size_while_pulls_go_on(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await bounded_proxy(make_proxy, registry, tmp_path)
    pushed = images(registry, 9, 3 * MiB)
    for name, image in pushed[:5]:
        await pull_image(proxy, name, image)
        assert await settled_usage(proxy) <= 10 * MiB
    # Concurrent pulls too; once they are done nothing is pinned and the bound holds again.
    await asyncio.gather(*(pull_image(proxy, name, image) for name, image in pushed[5:]))
    assert await settled_usage(proxy) <= 10 * MiB
    assert await proxy.metric("detour_cache_evictions_total") >= 6


async def test_a_hit_refreshes_an_entry(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await bounded_proxy(make_proxy, registry, tmp_path)
    (a, image_a), (b, image_b), (c, image_c), (d, image_d) = images(registry, 4, 3 * MiB)
    for name, image in ((a, image_a), (b, image_b), (c, image_c)):
        await pull_image(proxy, name, image)
        await settled_usage(proxy)
    await pull_image(proxy, a, image_a)  # a hit: A is now the most recently used
    await pull_image(proxy, d, image_d)
    await settled_usage(proxy)
    assert cached(proxy, image_a.layers[0].digest)
    assert not cached(proxy, image_b.layers[0].digest)
    assert cached(proxy, image_d.layers[0].digest)


def send_buffer_max() -> int:
    """The most a socket's send buffer grows to (Linux's ``tcp_wmem``; 4 MiB by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * MiB


async def test_an_entry_being_served_is_not_evicted_under_its_reader(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    cache = {"dir": str(tmp_path / "cache"), "max_size": "40MiB"}
    proxy = await make_proxy(scenario(registry, tmp_path / "cache", cache=cache))
    ((big, image_big),) = images(registry, 1, 32 * MiB)
    others = images(registry, 3, 12 * MiB)
    layer = image_big.layers[0]
    # Bigger than what the kernel can hold between the proxy and a slow reader.
    assert send_buffer_max() + 2 * MiB < layer.size, "tcp_wmem's maximum is too large here"
    await pull_image(proxy, big, image_big)
    await settled_usage(proxy)  # committed: the next GET is a hit
    reader, writer, head = await slow_client_get(proxy, f"/v2/{big}/blobs/{layer.digest}")
    assert head.startswith(b"HTTP/1.1 200 "), head
    try:
        first = await reader.readexactly(MiB)
        for name, image in others:  # each of these pushes the cache over 40 MiB
            await pull_image(proxy, name, image)
        await settled_usage(proxy)
        assert cached(proxy, layer.digest)  # the oldest entry, still there under its reader
        # To the end of the connection (Connection: close): the proxy is done with the file.
        assert first + await reader.read() == layer.data
    finally:
        writer.close()
    # Once its reader is done, it goes like any other old entry.
    name, image = others[0]
    await pull_image(proxy, name, image)
    await settled_usage(proxy)
    assert not cached(proxy, layer.digest)


async def test_the_index_is_rebuilt_from_disk_after_a_restart(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await bounded_proxy(make_proxy, registry, tmp_path)
    for name, image in images(registry, 2, 2 * MiB):
        await pull_image(proxy, name, image)
    on_disk = await settled_usage(proxy)
    restarted = await bounded_proxy(make_proxy, registry, tmp_path)
    assert await restarted.metric("detour_cache_size_bytes") == on_disk
    # A smaller bound at start-up trims what is already there.
    cache = {"dir": str(tmp_path / "cache"), "max_size": "3MiB"}
    smaller = await make_proxy(scenario(registry, tmp_path / "cache", cache=cache))
    assert await settled_usage(smaller) <= 3 * MiB
