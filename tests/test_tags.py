"""The tag policy: trusted for tag_ttl, revalidated with a HEAD, served stale when the
uplink is down, dropped on a 404, never served stale past a 401."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.images import ACCEPT_ALL, PushedImage, delete_manifest, push_image, unique_repo
from tests.proxy import Proxy, scenario
from tests.registry import Registry
from tests.token_issuer import TokenIssuer

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
TTL = 0.2  # seconds; the tests wait it out


def hub_image(registry: Registry, tag: str = "v1") -> tuple[str, PushedImage]:
    name = unique_repo("x").split("/")[1]
    return name, push_image(
        registry, f"docker-mirror/library/{name}", tag, layers=1, layer_size=512
    )


async def get_tag(
    proxy: Proxy, name: str, tag: str = "v1", method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    url = f"{proxy.url}/v2/{name}/manifests/{tag}"
    async with proxy.session.request(method, url, headers={"Accept": ACCEPT_ALL}) as response:
        return response.status, dict(response.headers), await response.read()


async def results(proxy: Proxy) -> dict[str, float]:
    return {
        result: await proxy.metric("detour_cache_requests_total", kind="manifest", result=result)
        for result in ("hit", "miss", "revalidated", "stale")
    }


@pytest.fixture
async def proxy(make_proxy: MakeProxy, registry: Registry, tmp_path: Path) -> Proxy:
    return await make_proxy(
        scenario(
            registry,
            tmp_path / "cache",
            cache={"dir": str(tmp_path / "cache"), "tag_ttl": f"{TTL}s"},
        )
    )


async def test_within_the_ttl_a_tag_is_served_from_disk(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await make_proxy(scenario(registry, tmp_path / "cache"))  # default 5m TTL
    name, image = hub_image(registry)
    assert (await get_tag(proxy, name))[0] == 200
    mark = registry.mark()
    assert (await get_tag(proxy, name))[2] == image.manifest
    assert registry.paths_since(mark) == []
    assert (await results(proxy))["hit"] == 1


async def test_after_the_ttl_a_head_revalidates(proxy: Proxy, registry: Registry) -> None:
    name, image = hub_image(registry)
    await get_tag(proxy, name)
    await asyncio.sleep(TTL)
    mark = registry.mark()
    status, _, body = await get_tag(proxy, name)
    assert (status, body) == (200, image.manifest)
    entries = await registry.wait_entries(mark, at_least=1)
    assert [e.method for e in entries] == ["HEAD"]
    assert (await results(proxy))["revalidated"] == 1


async def test_a_moved_tag_is_followed(proxy: Proxy, registry: Registry) -> None:
    name, _ = hub_image(registry)
    await get_tag(proxy, name)
    moved = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=700)
    await asyncio.sleep(TTL)
    status, headers, body = await get_tag(proxy, name)
    assert (status, body) == (200, moved.manifest)
    assert headers["Docker-Content-Digest"] == moved.digest


async def test_with_the_mirror_down_a_tag_is_served_stale_promptly(
    proxy: Proxy, registry: Registry
) -> None:
    name, image = hub_image(registry)
    await get_tag(proxy, name)
    await asyncio.sleep(TTL)
    registry.stop()
    started = time.monotonic()
    status, headers, body = await get_tag(proxy, name)
    assert (status, body) == (200, image.manifest)
    status, headers, body = await get_tag(proxy, name, method="HEAD")
    assert status == 200
    assert body == b""
    assert headers["Docker-Content-Digest"] == image.digest
    assert headers["Content-Length"] == str(len(image.manifest))
    assert headers["Content-Type"] == image.media_type
    assert time.monotonic() - started < 2
    assert (await results(proxy))["stale"] == 2


async def test_a_hung_uplink_costs_one_timeout_then_stale_at_once(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    cache = {"dir": str(tmp_path / "cache"), "tag_ttl": f"{TTL}s"}
    proxy = await make_proxy(
        # read_timeout stays at its default, 30 s
        scenario(registry, tmp_path, cache=cache, upstream={"connect_timeout": "1s"})
    )
    name, image = hub_image(registry)
    other, other_image = hub_image(registry)
    await get_tag(proxy, name)
    await get_tag(proxy, other)
    await asyncio.sleep(TTL)
    registry.freeze()  # the link is up, nothing answers
    started = time.monotonic()
    assert (await get_tag(proxy, name))[2] == image.manifest
    first = time.monotonic() - started
    started = time.monotonic()
    assert (await get_tag(proxy, other))[2] == other_image.manifest
    second = time.monotonic() - started
    assert first < 3  # a revalidation gives up after connect_timeout, not read_timeout
    assert second < 0.5  # the registry is known to be down: no second wait
    registry.thaw()


async def test_a_tag_deleted_upstream_is_dropped(proxy: Proxy, registry: Registry) -> None:
    name, image = hub_image(registry)
    assert (await get_tag(proxy, name))[0] == 200
    delete_manifest(registry, f"docker-mirror/library/{name}", image.digest)
    await asyncio.sleep(TTL)
    status, _, body = await get_tag(proxy, name)
    assert status == 404
    assert b"MANIFEST_UNKNOWN" in body
    # The manifest itself stays, reachable by digest.
    assert (await get_tag(proxy, name, image.digest))[2] == image.manifest


async def test_revoked_access_is_never_served_stale(
    make_proxy: MakeProxy, token_registry: Registry, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    config = {
        "cache": {"dir": str(tmp_path / "cache"), "tag_ttl": f"{TTL}s"},
        "redirects": [{"src": "docker.io/", "to": f"{token_registry.host}/readable/hub/"}],
        "registries": {
            token_registry.host: {
                "insecure": True,
                "username": token_issuer.reader_user,
                "password": token_issuer.reader_password,
            },
            **token_registry.named_hosts,
        },
    }
    token_issuer.expires_in = 1  # tokens are short-lived, so revocation shows at once
    proxy = await make_proxy(config)
    name = unique_repo("x").split("/")[1]
    push_image(token_registry, f"readable/hub/library/{name}", "v1", layers=1, layer_size=64)
    assert (await get_tag(proxy, name))[0] == 200
    token_issuer.reader_prefix = "nothing/"  # the reader loses access
    await asyncio.sleep(TTL)
    status, headers, _ = await get_tag(proxy, name)
    assert status == 401
    assert "WWW-Authenticate" in headers


async def test_a_range_on_a_miss_waits_for_verified_bytes(proxy: Proxy, registry: Registry) -> None:
    name = unique_repo("x").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=4 << 20
    )
    layer = image.layers[0]
    url = f"{proxy.url}/v2/{name}/blobs/{layer.digest}"
    async with proxy.session.get(url, headers={"Range": "bytes=1000-1999"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-1999/{layer.size}"
        assert await response.read() == layer.data[1000:2000]


async def test_heads_and_gets_of_a_cold_tag_share_one_upstream_get(
    make_proxy: MakeProxy, make_registry: Callable[..., Registry], tmp_path: Path
) -> None:
    """Nodes resolving a new tag at once (containerd and dockerd with HEAD, others with GET):
    one manifest GET upstream, every client answered with the same digest, the tag kept."""
    mirror = make_registry()
    proxy = await make_proxy(scenario(mirror, tmp_path / "cache"))
    name, image = hub_image(mirror)
    mark = mirror.mark()
    mirror.freeze()  # the first request's fetch waits; the others arrive and join it
    try:
        asked = [
            asyncio.ensure_future(get_tag(proxy, name, method=method))
            for method in ("HEAD", "GET", "HEAD", "GET", "HEAD", "GET")
        ]
        await asyncio.sleep(2)  # plenty for six requests on loopback to reach Detour
    finally:
        mirror.thaw()
    answers = await asyncio.gather(*asked)
    assert {(status, headers["Docker-Content-Digest"]) for status, headers, _ in answers} == {
        (200, image.digest)
    }
    assert [body for _, _, body in answers] == [b"", image.manifest] * 3
    entries = await mirror.wait_entries(mark, at_least=1)
    assert [(e.method, e.path) for e in entries] == [
        ("GET", f"/v2/docker-mirror/library/{name}/manifests/v1")
    ]
    counted = {
        result: await proxy.metric("detour_cache_requests_total", kind="manifest", result=result)
        for result in ("miss", "joined")
    }
    assert counted == {"miss": 1, "joined": 5}
    mark = mirror.mark()
    assert (await get_tag(proxy, name, method="HEAD"))[0] == 200
    assert await proxy.metric("detour_cache_requests_total", kind="manifest", result="hit") == 1
    assert mirror.paths_since(mark) == []
