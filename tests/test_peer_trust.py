"""The site tier when a peer lies, a request fails, or someone pretends to be a peer.

Real ``detour serve`` nodes on 127.0.0.x:7439 (as a DaemonSet's pods), real distribution as the
mirror; a lying or hostile peer is a small aiohttp app of the test's own, listed in the nodes'
``cluster.peers`` like any other.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.cluster.peering import blob_key, manifest_key, rendezvous
from tests.images import ACCEPT_ALL, PushedImage, push_image, unique_repo
from tests.proxy import Proxy
from tests.registry import Registry
from tests.support import free_port

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
KiB = 1024


def node_addresses(count: int, first: int = 20) -> list[str]:
    return [f"127.0.0.{first + i}:7439" for i in range(count)]


async def start_nodes(
    detour_process: StartProxy,
    mirror: Registry,
    tmp_path: Path,
    peers: list[str],
    nodes: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[Proxy]:
    """One ``detour serve`` per address of ``nodes`` (default: every peer), each advertising
    its own address, docker.io/ going to ``mirror``; ``extra`` merged into each config."""
    started = []
    for address in nodes or peers:
        config: dict[str, Any] = {
            "listen": address,
            "cache": {"dir": str(tmp_path / address.replace(":", "_"))},
            "redirects": [{"src": "docker.io/", "to": f"{mirror.host}/docker-mirror/"}],
            "registries": {mirror.host: {"insecure": True}},
            "cluster": {"peers": peers, "advertise": address},
        }
        for key, value in (extra or {}).items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            elif isinstance(value, list) and isinstance(config.get(key), list):
                config[key] = config[key] + value
            else:
                config[key] = value
        started.append(await detour_process(config))
    return started


async def pull(proxy: Proxy, name: str, image: PushedImage) -> None:
    """What a runtime does: the manifest by tag, then every blob, each checked."""
    url = f"{proxy.url}/v2/{name}/manifests/v1"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200, await response.text()
        assert await response.read() == image.manifest

    async def blob(data: bytes, digest: str) -> None:
        async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{digest}") as response:
            assert response.status == 200, await response.text()
            body = await response.read()
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
        assert body == data

    await asyncio.gather(*(blob(b.data, b.digest) for b in image.blobs))


def digest_owned_by(peers: list[str], owner: str) -> str:
    """A made-up blob digest whose owner among ``peers`` is ``owner``."""
    while True:
        digest = "sha256:" + secrets.token_hex(32)
        if rendezvous(peers, blob_key(digest))[0] == owner:
            return digest


async def peer_requests(node: Proxy) -> float:
    return sum(
        [
            await node.metric("detour_peer_requests_total", result=result)
            for result in ("served", "failed", "skipped")
        ]
    )


async def test_a_rollout_after_refused_requests_still_costs_one_mirror_get_per_blob(
    detour_process: StartProxy, registry: Registry, htpasswd_registry: Registry, tmp_path: Path
) -> None:
    """Every node first asks each other node for something it answers 401 (an anonymous pull
    from a registry that wants credentials), and for a name its egress policy refuses (an
    unnamed registry on a loopback address): ordinary answers, so no peer is marked down, and
    the rollout that follows still costs the mirror one GET per blob."""
    name = unique_repo("rollout401").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=8, layer_size=64 * KiB
    )
    peers = node_addresses(3)
    private = {
        "redirects": [{"src": "private.example/", "to": f"{htpasswd_registry.host}/private/"}],
        "registries": {htpasswd_registry.host: {"insecure": True}},
    }
    nodes = await start_nodes(detour_process, registry, tmp_path, peers, extra=private)
    for node, address in zip(nodes, peers, strict=True):
        for other in (peer for peer in peers if peer != address):
            digest = digest_owned_by(peers, other)
            url = f"{node.url}/v2/private.example/app/blobs/{digest}"
            async with node.session.get(url) as response:
                assert response.status == 401, await response.text()
                assert "WWW-Authenticate" in response.headers  # the challenge, to answer
        asked = await peer_requests(node)
        # A name this node refuses is refused here, before any peer is asked.
        internal = f"127.0.0.1_{free_port()}/library/{name}"
        async with node.session.get(f"{node.url}/v2/{internal}/manifests/v1") as response:
            assert response.status == 403, await response.text()
            assert (await response.json())["errors"][0]["code"] == "DENIED"
        assert await peer_requests(node) == asked
        assert await node.metric("detour_peer_requests_total", result="failed") == 0

    mark = registry.mark()
    await asyncio.gather(*(pull(node, name, image) for node in nodes))
    blobs = {f"/v2/docker-mirror/library/{name}/blobs/{b.digest}" for b in image.blobs}
    entries = await registry.wait_paths(mark, at_least=len(blobs))
    gets = Counter(e for e in entries if e in blobs)
    per_blob = sum(gets.values()) / len(blobs)
    assert f"{per_blob:.2f}" == "1.00", gets
    for node in nodes:
        assert await node.metric("detour_peer_requests_total", result="skipped") == 0


class FakePeer:
    """A small aiohttp app on ``address`` (host:port) standing where a peer should be; each
    request it gets is recorded, and answered by ``handler``."""

    def __init__(
        self, address: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> None:
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self.requests: list[web.Request] = []
        self._handler = handler
        self._runner: web.AppRunner | None = None

    async def _record(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        return await self._handler(request)

    async def __aenter__(self) -> FakePeer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_a_peer_redirect_is_not_followed_and_the_pull_goes_on(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """A "peer" answers ``302 Location: http://localhost:PORT/...``, an internal service no
    client may reach: Detour does not follow it, marks that peer down, and the client gets
    the blob from the mirror, whole and right."""
    name = unique_repo("redirect").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=KiB)
    blob = image.layers[0]
    internal_hits: list[str] = []

    async def internal(request: web.Request) -> web.Response:
        internal_hits.append(request.path)
        return web.Response(body=b"internal secret" * 100)

    port = free_port()
    service = FakePeer(f"127.0.0.1:{port}", internal)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://localhost:{port}/latest/meta-data")

    peers = node_addresses(2, first=30)
    fake_address = next(p for p in peers if rendezvous(peers, blob_key(blob.digest))[0] == p)
    (node_address,) = (p for p in peers if p != fake_address)
    async with service, FakePeer(fake_address, redirect) as fake:
        (node,) = await start_nodes(detour_process, registry, tmp_path, peers, [node_address])
        for _ in range(2):
            url = f"{node.url}/v2/{name}/blobs/{blob.digest}"
            async with node.session.get(url) as response:
                assert response.status == 200, await response.text()
                assert await response.read() == blob.data
        assert len(fake.requests) == 1  # then marked down: the second pull skipped it
    assert internal_hits == []
    assert await node.metric("detour_peer_requests_total", result="failed") == 1


def flipped(data: bytes) -> bytes:
    return bytes(byte ^ 0xFF for byte in data)


@pytest.mark.parametrize("kind", ["blob", "manifest"])
async def test_a_peer_that_sends_wrong_bytes_costs_the_client_nothing(
    detour_process: StartProxy, registry: Registry, tmp_path: Path, kind: str
) -> None:
    """The owner of a blob (its bytes flipped) or of a manifest by digest (another image's
    manifest, under the digest asked for) lies: the client gets the right bytes, whole, from
    one extra source (the mirror), the peer is marked down at once and counted."""
    peers = node_addresses(2, first=40)
    fake_address, node_address = peers
    repo = f"docker-mirror/library/{unique_repo('liar').split('/')[1]}"
    name = repo.removeprefix("docker-mirror/")
    other = push_image(registry, f"{repo}-other", "v1", layers=1, layer_size=KiB)
    for _ in range(50):  # an image whose key the fake peer owns
        image = push_image(registry, repo, "v1", layers=1, layer_size=256 * KiB)
        key = blob_key(image.layers[0].digest) if kind == "blob" else manifest_key(image.digest)
        if rendezvous(peers, key)[0] == fake_address:
            break
    else:
        raise AssertionError("no image owned by the fake peer")
    blob = image.layers[0]

    async def liar(request: web.Request) -> web.StreamResponse:
        if kind == "blob":
            headers = {"Docker-Content-Digest": blob.digest}
            return web.Response(body=flipped(blob.data), headers=headers)
        headers = {"Docker-Content-Digest": image.digest, "Content-Type": other.media_type}
        return web.Response(body=other.manifest, headers=headers)

    async with FakePeer(fake_address, liar) as fake:
        (node,) = await start_nodes(detour_process, registry, tmp_path, peers, [node_address])
        mark = registry.mark()
        for _ in range(2):
            if kind == "blob":
                url, wanted = f"{node.url}/v2/{name}/blobs/{blob.digest}", blob.data
            else:
                url, wanted = f"{node.url}/v2/{name}/manifests/{image.digest}", image.manifest
            async with node.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
                assert response.status == 200, await response.text()
                assert await response.read() == wanted
        assert len(fake.requests) == 1  # asked once: marked down at once, then skipped
    path = f"/v2/{repo}/blobs/{blob.digest}" if kind == "blob" else f"/v2/{repo}/manifests/"
    fetched = [p for p in await registry.wait_paths(mark, at_least=1) if p.startswith(path)]
    assert len(fetched) == 1  # one extra source: the mirror, once (then it was cached)
    lie = "wrong_blob" if kind == "blob" else "wrong_manifest"
    assert await node.metric("detour_peers_bypassed_total", reason=lie) == 1


async def test_a_large_blob_from_a_lying_peer_aborts_one_pull_and_not_the_next(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """Past ``cluster.verify_peer_blobs_first`` a peer's blob is sent as it arrives: wrong bytes
    abort that pull (never a whole 200), and the peer is bypassed at once, so the retry gets
    the right bytes from the mirror."""
    peers = node_addresses(2, first=50)
    fake_address, node_address = peers
    repo = f"docker-mirror/library/{unique_repo('big').split('/')[1]}"
    for _ in range(50):
        image = push_image(registry, repo, "v1", layers=1, layer_size=256 * KiB)
        if rendezvous(peers, blob_key(image.layers[0].digest))[0] == fake_address:
            break
    blob = image.layers[0]

    async def liar(request: web.Request) -> web.StreamResponse:
        return web.Response(body=flipped(blob.data))

    extra = {"cluster": {"verify_peer_blobs_first": "64KiB"}}
    async with FakePeer(fake_address, liar):
        (node,) = await start_nodes(
            detour_process, registry, tmp_path, peers, [node_address], extra=extra
        )
        url = f"{node.url}/v2/{repo.removeprefix('docker-mirror/')}/blobs/{blob.digest}"
        with pytest.raises(aiohttp.ClientPayloadError):
            async with node.session.get(url) as response:
                await response.read()
        async with node.session.get(url) as response:
            assert response.status == 200
            assert await response.read() == blob.data
    assert await node.metric("detour_peers_bypassed_total", reason="wrong_blob") == 1
