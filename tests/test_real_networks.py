"""Real networks: bodies that arrive in many reads, and Accept negotiation that must never
change what a tag means.

Every pull here crosses a relay (tests.relay) that either holds each segment for half of a
20 ms round trip with a 64 KiB window, as a WAN does, or throttles to 2 MiB/s; on loopback a
body arrives in one read and hides what these catch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.containerd import Containerd
from tests.images import (
    ACCEPT_ALL,
    build_image,
    push_image,
    push_index,
    put_manifest,
    unique_repo,
    upload_image,
)
from tests.proxy import Proxy, parse_metrics, scenario
from tests.registry import Registry
from tests.relay import Relay

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MiB = 1024 * 1024
# The conformance suite's "large manifest" is 3.9 MB; the spec's floor for a limit is 4 MiB.
SIZES = {"4k": 4_000, "60k": 60_000, "200k": 200_000, "1m": 1_000_000, "3.9m": 3_900_000}
LINKS: dict[str, dict[str, Any]] = {
    "wan-20ms": {"rtt": 0.020},
    "throttled-2MiBps": {"rate": 2 * MiB},
}


def padded_manifest(registry: Registry, repo: str, tag: str, size: int) -> tuple[str, bytes]:
    """Push an OCI image whose manifest is ``size`` bytes (an annotation pads it out)."""
    image = build_image(repo, tag, layers=1, layer_size=256, seed=size)
    upload_image(registry, image)
    doc = json.loads(image.manifest)
    doc["annotations"] = {"pad": ""}
    filler = size - len(json.dumps(doc, indent=2).encode())
    doc["annotations"]["pad"] = "x" * filler
    body = json.dumps(doc, indent=2).encode()
    assert len(body) == size
    return put_manifest(registry, repo, tag, body, image.media_type), body


def add_tags(registry: Registry, repo: str, digest: str, count: int) -> list[str]:
    """``count`` tags on one manifest, written into distribution's filesystem storage (as its
    own tag PUT does) rather than over 3,000 HTTP round trips."""
    tags_dir = registry.storage / "docker/registry/v2/repositories" / repo / "_manifests/tags"
    tags = [f"t{i:04d}" for i in range(count)]
    for tag in tags:
        current = tags_dir / tag / "current"
        current.mkdir(parents=True)
        (current / "link").write_text(digest)
        index = tags_dir / tag / "index" / digest.replace(":", "/")
        index.mkdir(parents=True)
        (index / "link").write_text(digest)
    return tags


async def proxy_before(
    manifests: Callable[[web.Request], Awaitable[web.StreamResponse]],
    aiohttp_server: Any,
    make_proxy: MakeProxy,
    tmp_path: Path,
) -> tuple[Proxy, Any]:
    """Detour in front of a small upstream of the test's own that answers manifests with
    ``manifests``, as docker.io's mirror: the proxy, and the upstream's server."""
    app = web.Application()
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", manifests)
    upstream = await aiohttp_server(app, host="127.0.0.1")
    host = f"127.0.0.1:{upstream.port}"
    proxy = await make_proxy(
        {
            "cache": {"dir": str(tmp_path / "cache")},
            "redirects": [{"src": "docker.io/", "to": f"{host}/mirror/"}],
            "registries": {host: {"insecure": True}},
        }
    )
    return proxy, upstream


async def mismatches(proxy: Proxy) -> float:
    async with proxy.session.get(f"{proxy.url}/metrics") as response:
        samples = parse_metrics(await response.text())
    return sum(v for (name, _), v in samples.items() if name == "detour_digest_mismatches_total")


@pytest.fixture(params=sorted(LINKS))
async def link(request: pytest.FixtureRequest, registry: Registry) -> AsyncIterator[Relay]:
    async with Relay(registry, **LINKS[request.param]) as relay:
        yield relay


async def test_manifests_of_every_size_arrive_whole_over_real_links(
    link: Relay, registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    repo = unique_repo("big")
    pushed = {
        tag: padded_manifest(registry, f"docker-mirror/{repo}", tag, size)
        for tag, size in SIZES.items()
    }
    proxy = await make_proxy(
        {
            "cache": {"dir": str(tmp_path / "cache")},
            "redirects": [{"src": "docker.io/", "to": f"{link.host}/docker-mirror/"}],
            "registries": {link.host: {"insecure": True}},
        }
    )
    for tag, (digest, body) in pushed.items():
        for reference in (digest, tag):  # both from upstream: a tag not seen is fetched
            url = f"{proxy.url}/v2/{repo}/manifests/{reference}"
            async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
                got = await response.read()
                assert response.status == 200, (tag, reference, got[:300])
                assert response.headers["Docker-Content-Digest"] == digest
            assert got == body, (tag, reference, len(got))
            assert "sha256:" + hashlib.sha256(got).hexdigest() == digest
    assert await mismatches(proxy) == 0
    # Stored whole: the same manifests come back from disk with the mirror out of the way.
    registry.stop()
    for digest, body in pushed.values():
        async with proxy.session.get(f"{proxy.url}/v2/{repo}/manifests/{digest}") as response:
            assert response.status == 200
            assert await response.read() == body


async def test_a_3000_tag_list_arrives_whole_over_real_links(
    link: Relay, registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    repo = unique_repo("tags")
    image = push_image(registry, f"docker-mirror/{repo}", "latest", layers=1, layer_size=256)
    tags = add_tags(registry, f"docker-mirror/{repo}", image.digest, 3000)
    proxy = await make_proxy(
        {
            "cache": {"dir": str(tmp_path / "cache")},
            "redirects": [{"src": "docker.io/", "to": f"{link.host}/docker-mirror/"}],
            "registries": {link.host: {"insecure": True}},
        }
    )
    async with proxy.session.get(f"{proxy.url}/v2/{repo}/tags/list") as response:
        assert response.status == 200, await response.text()
        listing = await response.json()
    assert listing["name"] == repo
    assert sorted(listing["tags"]) == sorted([*tags, "latest"])


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_manifest_over_the_limit_is_a_502_naming_it_not_a_mismatch(
    aiohttp_server: Any, make_proxy: MakeProxy, tmp_path: Path, chunked: bool
) -> None:
    """distribution refuses to store a manifest over 4 MiB; a small upstream of our own sends
    one, with its length announced or not."""
    body = json.dumps({"schemaVersion": 2, "pad": "x" * (4 * MiB)}).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()

    async def manifest(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest}
        if not chunked:
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 64 * 1024):
            await response.write(body[start : start + 64 * 1024])
        await response.write_eof()
        return response

    proxy, _ = await proxy_before(manifest, aiohttp_server, make_proxy, tmp_path)
    for reference in ("v1", digest):
        async with proxy.session.get(f"{proxy.url}/v2/huge/manifests/{reference}") as response:
            assert response.status == 502
            error = (await response.json())["errors"][0]
        assert str(4 * MiB) in error["message"]
    assert await mismatches(proxy) == 0


# ----------------------------------------------------------------- Accept and what a tag means


async def get_manifest_through(proxy: Proxy, name: str, accept: str | None) -> tuple[int, str]:
    headers = {"Accept": accept} if accept is not None else {}
    url = f"{proxy.url}/v2/{name}/manifests/v1"
    async with proxy.session.get(url, headers=headers) as response:
        body = await response.read()
        return response.status, "sha256:" + hashlib.sha256(body).hexdigest()


async def skopeo_arm64_layers(ref: str, dest: Path) -> list[str]:
    """``skopeo copy --override-arch arm64`` to an OCI layout: the layers it copied, once its
    config is seen to say arm64 (skopeo rewrites a docker manifest and config as OCI, so their
    digests change; the layers' don't)."""
    process = await asyncio.create_subprocess_exec(
        "skopeo",
        "copy",
        "--override-arch",
        "arm64",
        "--src-tls-verify=false",
        f"docker://{ref}",
        f"oci:{dest}:x",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    manifest_digest = json.loads((dest / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((dest / "blobs" / manifest_digest.replace(":", "/")).read_text())
    config = json.loads(
        (dest / "blobs" / manifest["config"]["digest"].replace(":", "/")).read_text()
    )
    assert config["architecture"] == "arm64"
    return [str(layer["digest"]) for layer in manifest["layers"]]


async def test_a_narrowed_answer_never_changes_what_a_multi_arch_tag_means(
    make_registry: Callable[..., Registry],
    detour_process: StartProxy,
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    mirror = make_registry()
    name = unique_repo("multi").split("/")[1]
    index = push_index(mirror, f"docker-mirror/library/{name}", "v1", media="docker")
    amd64, arm64 = index.children
    proxy = await detour_process(
        scenario(
            mirror, tmp_path / "cache", cache={"dir": str(tmp_path / "cache"), "tag_ttl": "1s"}
        )
    )
    ref = f"{proxy.host}/docker.io/library/{name}:v1"

    async def arm64_pulls_get_arm64(round_: int) -> None:
        (await containerd.pull(ref, plain_http=True, platform="linux/arm64")).check()
        assert await containerd.image_digest(ref) == index.digest
        fetched = await containerd.content_digests()
        assert arm64.digest in fetched
        assert amd64.digest not in fetched
        assert {b.digest for b in arm64.blobs} <= fetched
        (await containerd.remove_image(ref)).check()
        layers = await skopeo_arm64_layers(ref, tmp_path / f"oci-{round_}")
        assert layers == [layer.digest for layer in arm64.layers]

    # A client that takes only docker's v2 manifest is given the amd64 child, as distribution
    # itself does...
    assert await get_manifest_through(proxy, name, DOCKER_V2) == (200, amd64.digest)
    # ...and every arm64 client still gets arm64, by the index.
    await arm64_pulls_get_arm64(1)
    # Revalidated (past the TTL) in the other order: the index first, then the narrowed one.
    await asyncio.sleep(1.1)
    assert await get_manifest_through(proxy, name, ACCEPT_ALL) == (200, index.digest)
    assert await get_manifest_through(proxy, name, DOCKER_V2) == (200, amd64.digest)
    await arm64_pulls_get_arm64(2)

    # The mirror down, past the TTL: each representation served stale, still the right one.
    mirror.stop()
    await asyncio.sleep(1.1)
    await arm64_pulls_get_arm64(3)
    assert await get_manifest_through(proxy, name, DOCKER_V2) == (200, amd64.digest)
    for accept in (ACCEPT_ALL, None, "*/*"):
        assert await get_manifest_through(proxy, name, accept) == (200, index.digest)
    assert await mismatches(proxy) == 0


async def test_accept_any_is_no_accept_and_schema1_is_refused_by_name(
    registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """distribution answers ``Accept: */*`` for a docker v2 manifest with schema1, whose digest
    is not the hash of its bytes: Detour asks for current types instead."""
    name = unique_repo("any").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=256, media="docker"
    )
    proxy = await make_proxy(scenario(registry, tmp_path / "cache"))
    assert await get_manifest_through(proxy, name, "*/*") == (200, image.digest)
    # A client that takes only schema1 can't be served it, and is told why.
    schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    other = unique_repo("old").split("/")[1]
    push_image(
        registry, f"docker-mirror/library/{other}", "v1", layers=1, layer_size=256, media="docker"
    )
    url = f"{proxy.url}/v2/{other}/manifests/v1"
    async with proxy.session.get(url, headers={"Accept": schema1}) as response:
        assert response.status == 406
        error = (await response.json())["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert "schema1" in error["message"]
    assert await mismatches(proxy) == 0


async def test_without_a_digest_header_a_manifest_is_still_read_whole_and_checked(
    aiohttp_server: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """An upstream that sends no Docker-Content-Digest: by tag, the manifest is whatever bytes
    arrive, so it must be all of them, and a manifest, before it is served or cached."""
    image = build_image("x/app", "v1", layers=1, layer_size=256)
    served: dict[str, bytes] = {"whole": image.manifest, "cut": image.manifest}

    async def manifest(request: web.Request) -> web.StreamResponse:
        tag = request.match_info["reference"]
        body = served.get(tag, b"<html>not a manifest</html>")
        response = web.StreamResponse(headers={"Content-Type": OCI_MANIFEST})
        response.content_length = len(body)
        await response.prepare(request)
        for start in range(0, len(body), 100):  # many small writes, as over a WAN
            if tag == "cut" and start >= len(body) // 2:
                assert request.transport is not None
                request.transport.close()  # the link drops mid-manifest
                return response
            await response.write(body[start : start + 100])
            await asyncio.sleep(0.002)
        await response.write_eof()
        return response

    proxy, upstream = await proxy_before(manifest, aiohttp_server, make_proxy, tmp_path)
    async with proxy.session.get(f"{proxy.url}/v2/app/manifests/whole") as response:
        assert response.status == 200
        assert await response.read() == image.manifest
        assert response.headers["Docker-Content-Digest"] == image.digest
    for tag in ("cut", "html"):
        async with proxy.session.get(f"{proxy.url}/v2/app/manifests/{tag}") as response:
            assert response.status == 502, tag
            assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
    await upstream.close()
    # Only the whole one was kept: with the upstream gone it is served, the others are not.
    async with proxy.session.get(f"{proxy.url}/v2/app/manifests/{image.digest}") as response:
        assert response.status == 200
    for tag in ("cut", "html"):
        async with proxy.session.get(f"{proxy.url}/v2/app/manifests/{tag}") as response:
            assert response.status == 502, tag
    assert await mismatches(proxy) == 0


async def test_real_clients_pull_whole_images_over_real_links(
    link: Relay,
    registry: Registry,
    detour_process: StartProxy,
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    """The pull paths end to end, the mirror behind the relay: containerd and skopeo get every
    byte of a multi-layer image and a multi-arch index, verified by their own digests."""
    name = unique_repo("pull").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=3, layer_size=300_000
    )
    index = push_index(registry, f"docker-mirror/library/{name}", "multi", layer_size=200_000)
    proxy = await detour_process(
        {
            "cache": {"dir": str(tmp_path / "cache")},
            "redirects": [{"src": "docker.io/", "to": f"{link.host}/docker-mirror/"}],
            "registries": {link.host: {"insecure": True}},
        }
    )
    ref = f"{proxy.host}/docker.io/library/{name}:v1"
    (await containerd.pull(ref, plain_http=True)).check()
    assert await containerd.image_digest(ref) == image.digest
    multi = f"{proxy.host}/docker.io/library/{name}:multi"
    (await containerd.pull(multi, plain_http=True, all_platforms=True)).check()
    assert await containerd.image_digest(multi) == index.digest
    layers = await skopeo_arm64_layers(multi, tmp_path / "oci")
    assert layers == [layer.digest for layer in index.children[1].layers]
    assert await mismatches(proxy) == 0
