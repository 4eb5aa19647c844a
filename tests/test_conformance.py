"""Two points of the OCI distribution spec's pull side, answered as distribution answers them:
every blob answer says ``Accept-Ranges: bytes`` (a HEAD, a cold GET, a hit, a range of one), and
a manifest asked for by a tag that is not valid is a 404 ``MANIFEST_UNKNOWN`` (``TAG_INVALID`` is
for pushes)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.images import ACCEPT_ALL, push_image, unique_repo
from tests.proxy import Proxy, scenario, wait_cached
from tests.registry import Registry

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


async def answer(
    session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with session.request(method, url, headers=headers or {}) as response:
        return response.status, dict(response.headers), await response.read()


async def test_every_blob_answer_says_it_takes_ranges(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await make_proxy(scenario(registry, tmp_path / "cache"))
    name = unique_repo("r").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1)
    layer = image.layers[0]
    url = f"{proxy.url}/v2/{name}/blobs/{layer.digest}"
    direct = f"{registry.url}/v2/docker-mirror/library/{name}/blobs/{layer.digest}"

    # distribution's own answers, which Detour's follow.
    for method in ("HEAD", "GET"):
        status, headers, _ = await answer(proxy.session, method, direct)
        assert (status, headers.get("Accept-Ranges")) == (200, "bytes"), method

    seen: list[tuple[str, int, str | None]] = []
    status, headers, _ = await answer(proxy.session, "HEAD", url)  # cold: an upstream HEAD
    seen.append(("HEAD, not cached", status, headers.get("Accept-Ranges")))
    status, headers, body = await answer(proxy.session, "GET", url)  # cold: streamed
    assert body == layer.data
    seen.append(("GET, not cached", status, headers.get("Accept-Ranges")))
    assert await wait_cached(proxy.cache_dir, layer.digest)
    status, headers, _ = await answer(proxy.session, "HEAD", url)
    seen.append(("HEAD, a hit", status, headers.get("Accept-Ranges")))
    status, headers, body = await answer(proxy.session, "GET", url)
    assert body == layer.data
    seen.append(("GET, a hit", status, headers.get("Accept-Ranges")))
    status, headers, body = await answer(proxy.session, "GET", url, {"Range": "bytes=10-19"})
    assert body == layer.data[10:20]
    seen.append(("GET of a range, a hit", status, headers.get("Accept-Ranges")))
    beyond = {"Range": f"bytes={layer.size + 5}-"}
    status, headers, _ = await answer(proxy.session, "GET", url, beyond)
    seen.append(("GET of a range beyond the end", status, headers.get("Accept-Ranges")))

    assert seen == [
        ("HEAD, not cached", 200, "bytes"),
        ("GET, not cached", 200, "bytes"),
        ("HEAD, a hit", 200, "bytes"),
        ("GET, a hit", 200, "bytes"),
        ("GET of a range, a hit", 206, "bytes"),
        ("GET of a range beyond the end", 416, "bytes"),
    ]

    # A cold GET of a range: answered once the fetch is verified, and says so too.
    other = push_image(registry, f"docker-mirror/library/{name}", "v2", layers=1).layers[0]
    cold = f"{proxy.url}/v2/{name}/blobs/{other.digest}"
    status, headers, body = await answer(proxy.session, "GET", cold, {"Range": "bytes=0-9"})
    assert (status, headers.get("Accept-Ranges"), body) == (206, "bytes", other.data[:10])


@pytest.mark.parametrize("tag", ["-bad", "...", "t" * 129, ".hidden", "a+b"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_an_invalid_tag_is_an_unknown_manifest(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path, method: str, tag: str
) -> None:
    proxy = await make_proxy(scenario(registry, tmp_path / "cache"))
    name = unique_repo("t").split("/")[1]
    push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=256)
    headers = {"Accept": ACCEPT_ALL}

    distribution = f"{registry.url}/v2/docker-mirror/library/{name}/manifests/{tag}"
    their_status, _, _ = await answer(proxy.session, method, distribution, headers)
    url = f"{proxy.url}/v2/{name}/manifests/{tag}"
    status, answered, body = await answer(proxy.session, method, url, headers)

    assert (status, their_status) == (404, 404)
    assert answered["Content-Type"].startswith("application/json")
    if method == "GET":
        (error,) = json.loads(body)["errors"]
        assert error["code"] == "MANIFEST_UNKNOWN"
        assert "not a valid tag" in error["message"]
