"""Nothing corrupt is cached or served, and one upstream fetch serves every client."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.images import Blob, push_image, unique_repo
from tests.proxy import Proxy, blob_path, scenario, wait_cached, wait_no_temp_files
from tests.registry import Registry
from tests.relay import Relay

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


def cached(proxy: Proxy, digest: str) -> Path:
    return blob_path(proxy.cache_dir, digest)


def hub_layer(registry: Registry, size: int) -> tuple[str, Blob]:
    name = unique_repo("x").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=size)
    return name, image.layers[0]


async def fetch(proxy: Proxy, name: str, digest: str) -> tuple[int, bytes | None]:
    """(status, body), or (status, None) when the connection was cut before the end."""
    async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{digest}") as response:
        try:
            return response.status, await response.read()
        except aiohttp.ClientPayloadError:
            return response.status, None


@pytest.fixture
async def proxy(make_proxy: MakeProxy, registry: Registry, tmp_path: Path) -> Proxy:
    return await make_proxy(scenario(registry, tmp_path / "cache"))


async def test_corrupt_upstream_bytes_never_reach_a_client_whole(
    proxy: Proxy, registry: Registry
) -> None:
    name, layer = hub_layer(registry, 2 * 1024 * 1024)
    path = registry.stored_blob(layer.digest)
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # same size, one byte flipped: only the digest can tell
    path.write_bytes(bytes(bad))

    results = await asyncio.gather(*(fetch(proxy, name, layer.digest) for _ in range(4)))
    for status, body in results:
        # Headers may have gone out as 200, but the body never completes.
        assert status in (200, 502)
        assert body is None or status == 502
    assert not cached(proxy, layer.digest).exists()
    assert await wait_no_temp_files(proxy.cache_dir)
    assert (
        await proxy.metric("detour_digest_mismatches_total", kind="blob", registry=registry.host)
        == 1
    )

    path.write_bytes(good)  # the mirror is repaired: the next pull is right, and cached
    assert await fetch(proxy, name, layer.digest) == (200, layer.data)
    assert await wait_cached(proxy.cache_dir, layer.digest)
    assert cached(proxy, layer.digest).read_bytes() == layer.data


async def test_corrupt_manifest_is_refused(proxy: Proxy, registry: Registry) -> None:
    name = unique_repo("x").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=64)
    path = registry.stored_blob(image.digest)
    path.write_bytes(image.manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    url = f"{proxy.url}/v2/{name}/manifests/{image.digest}"
    async with proxy.session.get(url, headers={"Accept": image.media_type}) as response:
        assert response.status == 502
        assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert not [p for p in (proxy.cache_dir / "manifests").rglob("*") if p.is_file()]


async def test_sixteen_concurrent_cold_pulls_share_one_upstream_get(
    proxy: Proxy, registry: Registry
) -> None:
    name, layer = hub_layer(registry, 8 * 1024 * 1024)
    mark = registry.mark()
    results = await asyncio.gather(*(fetch(proxy, name, layer.digest) for _ in range(16)))
    assert all(result == (200, layer.data) for result in results)
    entries = await registry.wait_entries(mark, at_least=1)
    gets = [e for e in entries if e.method == "GET" and layer.digest in e.path]
    assert len(gets) == 1
    joined = await proxy.metric("detour_cache_requests_total", kind="blob", result="joined")
    missed = await proxy.metric("detour_cache_requests_total", kind="blob", result="miss")
    assert (missed, joined) == (1, 15)


async def test_a_client_that_leaves_does_not_cancel_the_fetch(
    proxy: Proxy, registry: Registry
) -> None:
    name, layer = hub_layer(registry, 16 * 1024 * 1024)
    async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{layer.digest}") as response:
        await response.content.readexactly(1024)
        response.close()  # hang up after the first KiB
    assert await wait_cached(proxy.cache_dir, layer.digest)
    assert hashlib.sha256(cached(proxy, layer.digest).read_bytes()).hexdigest() == layer.digest[7:]


@pytest.fixture
async def relay(registry: Registry) -> AsyncIterator[Relay]:
    async with Relay(registry, cut_after=3 * 1024 * 1024, cuts=2) as relay:
        yield relay


async def test_an_upstream_cut_mid_blob_is_resumed(
    make_proxy: MakeProxy, registry: Registry, relay: Relay, tmp_path: Path
) -> None:
    name, layer = hub_layer(registry, 8 * 1024 * 1024)
    config = {
        "cache": {"dir": str(tmp_path / "cache")},
        "redirects": [{"src": "docker.io/", "to": f"{relay.host}/docker-mirror/"}],
        "registries": {relay.host: {"insecure": True}},
    }
    proxy = await make_proxy(config)
    mark = registry.mark()
    assert await fetch(proxy, name, layer.digest) == (200, layer.data)
    entries = await registry.wait_entries(mark, at_least=3)
    # The first GET and two resumes with Range, which distribution answers from the byte asked.
    assert [e.method for e in entries if layer.digest in e.path] == ["GET", "GET", "GET"]
    assert await wait_cached(proxy.cache_dir, layer.digest)
    assert cached(proxy, layer.digest).read_bytes() == layer.data


async def test_an_upstream_cut_for_good_never_becomes_a_whole_200(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    name, layer = hub_layer(registry, 8 * 1024 * 1024)
    async with Relay(registry, cut_after=1024 * 1024, cuts=100) as relay:
        config = {
            "cache": {"dir": str(tmp_path / "cache")},
            "redirects": [{"src": "docker.io/", "to": f"{relay.host}/docker-mirror/"}],
            "registries": {relay.host: {"insecure": True}},
        }
        proxy = await make_proxy(config)
        status, body = await fetch(proxy, name, layer.digest)
    assert status == 200  # the headers went out...
    assert body is None  # ...but the body was cut, never completed
    assert not cached(proxy, layer.digest).exists()
    assert await wait_no_temp_files(proxy.cache_dir)
