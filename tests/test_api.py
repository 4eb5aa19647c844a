"""The read side of the OCI API through Detour, with real distribution as the mirror."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.api.handlers import rewrite_link
from tests.images import (
    ACCEPT_ALL,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    push_image,
    push_index,
    unique_repo,
)
from tests.proxy import Proxy, blob_path, scenario
from tests.registry import Registry

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


@pytest.fixture
async def proxy(make_proxy: MakeProxy, registry: Registry, tmp_path: Path) -> Proxy:
    return await make_proxy(scenario(registry, tmp_path / "cache"))


def hub_repo() -> tuple[str, str]:
    """A fresh Docker Hub-style repository: (name under docker.io, path on the mirror)."""
    name = unique_repo("library").split("/", 1)[1]
    return name, f"docker-mirror/library/{name}"


async def test_api_root(proxy: Proxy) -> None:
    async with proxy.session.get(f"{proxy.url}/v2/") as response:
        assert response.status == 200
        assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


async def test_manifest_by_tag_is_redirected_and_headers_are_right(
    proxy: Proxy, registry: Registry
) -> None:
    name, mirror_repo = hub_repo()
    image = push_image(registry, mirror_repo, "2.10.26-alpine")
    mark = registry.mark()
    for path in (f"docker.io/library/{name}", name):  # full and short names
        url = f"{proxy.url}/v2/{path}/manifests/2.10.26-alpine"
        async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
            body = await response.read()
            assert response.status == 200
            assert body == image.manifest
            assert response.headers["Docker-Content-Digest"] == image.digest
            assert response.headers["Content-Type"] == OCI_MANIFEST
            assert response.headers["Content-Length"] == str(len(image.manifest))
            assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    paths = await registry.wait_paths(mark, at_least=1)
    assert paths
    assert all(p.startswith(f"/v2/{mirror_repo}/") for p in paths), paths


async def test_head_gives_headers_and_no_body(proxy: Proxy, registry: Registry) -> None:
    """A HEAD by tag, as containerd and dockerd resolve a tag, fetches and keeps the manifest
    (the GET by digest that follows is a hit); a blob HEAD downloads no blob."""
    name, mirror_repo = hub_repo()
    image = push_image(registry, mirror_repo, "v1")
    mark = registry.mark()
    layer = image.layers[0]
    for url, digest, length in (
        (f"{proxy.url}/v2/{name}/manifests/v1", image.digest, len(image.manifest)),
        (f"{proxy.url}/v2/{name}/blobs/{layer.digest}", layer.digest, layer.size),
    ):
        async with proxy.session.head(url, headers={"Accept": ACCEPT_ALL}) as response:
            assert response.status == 200
            assert response.headers["Docker-Content-Digest"] == digest
            assert response.headers["Content-Length"] == str(length)
            assert await response.read() == b""
    entries = await registry.wait_entries(mark, at_least=2)
    assert sorted((e.method, e.path.rsplit("/", 2)[-2]) for e in entries) == [
        ("GET", "manifests"),
        ("HEAD", "blobs"),
    ]
    assert not list((proxy.cache_dir / "blobs").rglob("*"))
    mark = registry.mark()
    url = f"{proxy.url}/v2/{name}/manifests/{image.digest}"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
        assert await response.read() == image.manifest
    assert registry.entries_since(mark) == []
    assert await proxy.metric("detour_cache_requests_total", kind="manifest", result="hit") == 1


async def test_blob_miss_then_hit(proxy: Proxy, registry: Registry) -> None:
    name, mirror_repo = hub_repo()
    image = push_image(registry, mirror_repo, "v1", layer_size=3 * 1024 * 1024)
    layer = image.layers[0]
    url = f"{proxy.url}/v2/{name}/blobs/{layer.digest}"
    for _ in range(2):
        async with proxy.session.get(url) as response:
            assert response.status == 200
            assert await response.read() == layer.data
            assert response.headers["Docker-Content-Digest"] == layer.digest
            assert response.headers["Content-Length"] == str(layer.size)
    assert await proxy.metric("detour_cache_requests_total", kind="blob", result="miss") == 1
    assert await proxy.metric("detour_cache_requests_total", kind="blob", result="hit") == 1
    cached = blob_path(proxy.cache_dir, layer.digest)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == layer.digest[7:]
    # Range requests on a hit.
    async with proxy.session.get(url, headers={"Range": "bytes=10-19"}) as response:
        assert response.status == 206
        assert await response.read() == layer.data[10:20]


async def test_second_pull_is_served_from_disk_with_the_mirror_gone(
    proxy: Proxy, registry: Registry
) -> None:
    name, mirror_repo = hub_repo()
    image = push_image(registry, mirror_repo, "v1")
    digest_url = f"{proxy.url}/v2/{name}/manifests/{image.digest}"
    for blob in image.blobs:
        async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{blob.digest}") as response:
            assert await response.read() == blob.data
    async with proxy.session.get(digest_url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
    registry.stop()
    async with proxy.session.get(digest_url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
        assert await response.read() == image.manifest
    for blob in image.blobs:
        async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{blob.digest}") as response:
            assert response.status == 200
            assert await response.read() == blob.data


async def test_accept_is_passed_upstream(proxy: Proxy, registry: Registry) -> None:
    """distribution refuses an OCI manifest to a client that doesn't accept it; so do we."""
    name, mirror_repo = hub_repo()
    push_image(registry, mirror_repo, "v1", media="oci")
    url = f"{proxy.url}/v2/{name}/manifests/v1"
    async with proxy.session.get(url, headers={"Accept": DOCKER_MANIFEST}) as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    async with proxy.session.get(url, headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == 200
    # Cached now, but still not handed to a client that can't take it.
    async with proxy.session.get(url, headers={"Accept": DOCKER_MANIFEST}) as response:
        assert response.status == 404


async def test_ghcr_index_passes_through_byte_for_byte(proxy: Proxy, registry: Registry) -> None:
    repo = unique_repo("nats-io")
    index = push_index(registry, f"ghcr-mirror/{repo}", "0.17.0")
    mark = registry.mark()
    for reference in ("0.17.0", index.digest, index.digest):  # miss by tag, hit by digest
        url = f"{proxy.url}/v2/ghcr.io/{repo}/manifests/{reference}"
        async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
            body = await response.read()
            assert response.status == 200
            assert response.headers["Content-Type"] == OCI_INDEX
            assert response.headers["Docker-Content-Digest"] == index.digest
            assert "sha256:" + hashlib.sha256(body).hexdigest() == index.digest
    paths = await registry.wait_paths(mark, at_least=1)
    assert all(p.startswith(f"/v2/ghcr-mirror/{repo}/") for p in paths), paths


async def test_tags_list_names_the_clients_repository(proxy: Proxy, registry: Registry) -> None:
    name, mirror_repo = hub_repo()
    for tag in ("a", "b", "c"):
        push_image(registry, mirror_repo, tag, layers=1, layer_size=1024)
    async with proxy.session.get(f"{proxy.url}/v2/{name}/tags/list") as response:
        assert response.status == 200
        listing = await response.json()
        assert listing["name"] == name
        assert sorted(listing["tags"]) == ["a", "b", "c"]
    # Paging parameters go upstream (distribution 2.8 ignores them; 3.x pages).
    mark = registry.mark()
    async with proxy.session.get(f"{proxy.url}/v2/{name}/tags/list?n=2&last=a") as response:
        assert response.status == 200
    assert await registry.wait_paths(mark, at_least=1) == [
        f"/v2/{mirror_repo}/tags/list?n=2&last=a"
    ]


@pytest.mark.parametrize(
    ("link", "ns", "expected"),
    [
        (
            '</v2/docker-mirror/library/nats/tags/list?last=b&n=2>; rel="next"',
            None,
            '</v2/nats/tags/list?last=b&n=2>; rel="next"',
        ),
        (
            '<https://m.example/v2/x/tags/list?n=1&last=a>; rel="next"',
            "docker.io",
            '</v2/nats/tags/list?n=1&last=a&ns=docker.io>; rel="next"',
        ),
    ],
)
def test_pagination_links_point_back_at_the_proxy(link: str, ns: str | None, expected: str) -> None:
    assert rewrite_link(link, "nats", ns) == expected


async def test_mirror_mode_uses_ns(proxy: Proxy, registry: Registry) -> None:
    name, mirror_repo = hub_repo()
    image = push_image(registry, mirror_repo, "v1")
    url = f"{proxy.url}/v2/library/{name}/manifests/v1?ns=docker.io"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
        assert await response.read() == image.manifest


async def test_unknown_manifest_and_blob(proxy: Proxy, registry: Registry) -> None:
    name, _ = hub_repo()
    async with proxy.session.get(f"{proxy.url}/v2/{name}/manifests/nope") as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    missing = "sha256:" + "0" * 64
    async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{missing}") as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_mirrors_in_order_then_origin(
    make_proxy: MakeProxy,
    registry: Registry,
    make_registry: Callable[..., Registry],
    tmp_path: Path,
) -> None:
    """A dead mirror is skipped; fallback_to_origin adds the origin last."""
    dead = make_registry()
    dead.stop()
    origin = make_registry()
    repo = unique_repo("team")
    image = push_image(origin, repo, "v1")
    config: dict[str, Any] = {
        "cache": {"dir": str(tmp_path / "cache")},
        "redirects": [
            {
                "src": origin.host,
                "to": [f"{dead.host}/x", f"{registry.host}/nothing-here"],
                "fallback_to_origin": False,
            },
        ],
        "registries": {h: {"insecure": True} for h in (dead.host, registry.host, origin.host)},
    }
    path = f"{origin.host}/{repo}".replace(":", "-", 1)
    proxy = await make_proxy(config)
    url = f"{proxy.url}/v2/{path}/manifests/v1"
    # The dead mirror is skipped; the live one answers 404, which is final.
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 404
    config["redirects"][0]["to"] = [f"{dead.host}/x"]
    config["redirects"][0]["fallback_to_origin"] = True
    proxy = await make_proxy(config)
    url = f"{proxy.url}/v2/{path}/manifests/v1"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
        assert await response.read() == image.manifest
