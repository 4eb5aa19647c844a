"""The site tier when a peer lies, a request fails, or someone pretends to be a peer.

Real ``detour serve`` nodes on 127.0.0.x:7439 (as a DaemonSet's pods), real distribution as the
mirror; a lying or hostile peer is a small aiohttp app of the test's own, listed in the nodes'
``cluster.peers`` like any other.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.cluster.peering import PEER_HEADER, blob_key, manifest_key, rendezvous, tag_key
from proxy.metrics import PEER_RESULTS
from proxy.reference import ImageName
from proxy.upstream.peer_auth import PROOF_HEADER, PeerAuth, fingerprint, new_secret
from tests.images import ACCEPT_ALL, PushedImage, push_image, unique_repo
from tests.proxy import Proxy, pull_image
from tests.registry import Registry
from tests.support import free_port
from tests.test_cluster import blob_owner

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
    """What a runtime does: the manifest by tag, then every blob at once, each checked."""
    await pull_image(proxy, name, image, at_once=True)


def digest_owned_by(peers: list[str], owner: str) -> str:
    """A made-up blob digest whose owner among ``peers`` is ``owner``."""
    while True:
        digest = "sha256:" + secrets.token_hex(32)
        if rendezvous(peers, blob_key(digest))[0] == owner:
            return digest


async def peer_requests(node: Proxy) -> float:
    return sum(
        [await node.metric("detour_peer_requests_total", result=result) for result in PEER_RESULTS]
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


async def test_a_held_blob_goes_on_down_the_tree_as_it_arrives_and_wrong_bytes_stop_there(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """A node holds a peer's blob from its own client until it is verified, but a peer that
    asks it for that blob (the next hop down the tree) is sent the bytes as they arrive, so
    each hop doesn't wait for the whole blob. When the bytes turn out wrong, that peer's
    response is cut short (never a whole 200), and the node's own client gets the right blob
    from the mirror."""
    peers = node_addresses(2, first=60)
    fake_address, node_address = peers
    repo = f"docker-mirror/library/{unique_repo('relay').split('/')[1]}"
    for _ in range(50):
        image = push_image(registry, repo, "v1", layers=1, layer_size=1024 * KiB)
        if rendezvous(peers, blob_key(image.layers[0].digest))[0] == fake_address:
            break
    blob = image.layers[0]
    half_sent, release = asyncio.Event(), asyncio.Event()

    async def slow_liar(request: web.Request) -> web.StreamResponse:
        wrong = flipped(blob.data)
        response = web.StreamResponse(headers={"Docker-Content-Digest": blob.digest})
        response.content_length = len(wrong)
        await response.prepare(request)
        await response.write(wrong[: len(wrong) // 2])
        half_sent.set()
        await release.wait()
        await response.write(wrong[len(wrong) // 2 :])
        return response

    extra = {"cluster": {"read_timeout": "60s"}}  # the source's pause is not taken as a hang
    async with FakePeer(fake_address, slow_liar):
        (node,) = await start_nodes(
            detour_process, registry, tmp_path, peers, [node_address], extra=extra
        )
        path = f"/v2/{repo.removeprefix('docker-mirror/')}/blobs/{blob.digest}"

        async def client_pull() -> bytes:
            async with node.session.get(node.url + path) as response:
                assert response.status == 200, await response.text()
                return await response.read()

        client = asyncio.create_task(client_pull())
        try:
            async with asyncio.timeout(30):
                await half_sent.wait()
            # The next node down the tree (from an address of the peer set: a proven peer).
            connector = aiohttp.TCPConnector(local_addr=(fake_address.split(":")[0], 0))
            async with aiohttp.ClientSession(connector=connector) as as_peer:
                headers = {PEER_HEADER: fake_address}
                async with asyncio.timeout(20):  # while the source still holds back its rest
                    relayed = await as_peer.get(node.url + path, headers=headers)
                    assert relayed.status == 200, await relayed.text()
                    assert await relayed.content.readany()
                async with relayed:
                    assert not client.done()  # the node's own client: still held
                    release.set()
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await relayed.read()
            async with asyncio.timeout(60):
                assert await client == blob.data
        finally:
            release.set()  # the fake peer's handler ends, whatever happened
    assert await node.metric("detour_peers_bypassed_total", reason="wrong_blob") == 1


def write_secrets(directory: Path, current: str | None, accepted: str | None = None) -> None:
    """``cluster.secret_dir`` as a mounted Secret holds it: each file replaced at once."""
    directory.mkdir(parents=True, exist_ok=True)
    for file, value in (("current", current), ("accepted", accepted)):
        path = directory / file
        if value is None:
            path.unlink(missing_ok=True)
        else:
            temp = directory / f".{file}.tmp"
            temp.write_text(value + "\n")
            temp.replace(path)


def tag_owned_by(peers: list[str], owner: str, name: str) -> str:
    """A tag of ``docker.io/library/<name>`` whose owner among ``peers`` is ``owner``."""
    while True:
        tag = f"t{secrets.token_hex(4)}"
        if rendezvous(peers, tag_key(ImageName.from_path(name, None), tag))[0] == owner:
            return tag


async def get_manifest(node: Proxy, name: str, tag: str) -> bytes:
    url = f"{node.url}/v2/{name}/manifests/{tag}"
    async with node.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200, await response.text()
        return await response.read()


async def test_an_unproven_peer_gets_client_treatment_and_cannot_set_a_tag(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """With cluster.secret_dir: a "peer" in the peer set without the secret (a pod that
    matches the peers' Service, say) owns a tag and answers it with another image, under that
    image's own digest: not taken, the real tag comes from the mirror. A request marked as a
    peer's and asking only for what B holds, from a peer's own address but without proof, is a
    client's: forwarded to the owner as a client's would be; with proof, B answers from its own
    cache alone, and it holds nothing."""
    peers = node_addresses(3, first=60)
    fake_address, a_address, b_address = peers
    secret = new_secret()
    write_secrets(tmp_path / "secret", secret)
    extra = {"cluster": {"secret_dir": str(tmp_path / "secret")}}
    repo = f"docker-mirror/library/{unique_repo('tagged').split('/')[1]}"
    name = repo.removeprefix("docker-mirror/")
    tag = tag_owned_by(peers, fake_address, name)
    image = push_image(registry, repo, tag, layers=1, layer_size=KiB)
    other = push_image(registry, f"{repo}-other", "v1", layers=1, layer_size=KiB)

    async def liar(request: web.Request) -> web.StreamResponse:
        headers = {"Docker-Content-Digest": other.digest, "Content-Type": other.media_type}
        return web.Response(body=other.manifest, headers=headers)

    async with FakePeer(fake_address, liar) as fake:
        a, b = await start_nodes(
            detour_process, registry, tmp_path, peers, [a_address, b_address], extra=extra
        )
        assert await get_manifest(a, name, tag) == image.manifest
        assert len(fake.requests) == 1
    assert await a.metric("detour_peers_bypassed_total", reason="unproven_tag") == 1

    # B's peer-marked requests, sent from A's address: forwarded to the owner (A) unless
    # proven.
    digest = digest_owned_by([a_address, b_address], a_address)
    path = f"/v2/{name}/blobs/{digest}"
    auth = PeerAuth(tmp_path / "secret")
    connector = aiohttp.TCPConnector(local_addr=(a_address.split(":")[0], 0))
    async with aiohttp.ClientSession(connector=connector) as as_a:
        before = await b.metric("detour_peer_requests_total", result="served")
        cached = {"Cache-Control": "only-if-cached"}
        headers = {PEER_HEADER: a_address, **cached}
        async with as_a.get(f"{b.url}{path}", headers=headers) as response:
            assert response.status == 404  # the owner's answer: the mirror has no such blob
        assert await b.metric("detour_peer_requests_total", result="served") == before + 1
        proof = auth.sign_request("GET", path, a_address)
        assert proof is not None
        headers = {PEER_HEADER: a_address, PROOF_HEADER: proof, **cached}
        mark = registry.mark()
        async with as_a.get(f"{b.url}{path}", headers=headers) as response:
            assert response.status == 504, await response.text()
        assert await b.metric("detour_peer_requests_total", result="served") == before + 1
        assert await registry.wait_paths(mark) == []
    assert any("peer_proof_refused" in line for line in b.log_lines())


async def wait_loaded(node: Proxy, current: str, accepted: str | None = None) -> None:
    """Until ``node`` logs that it now signs with ``current`` and accepts it (and
    ``accepted``): it reads the directory every cluster.refresh, whenever its loop gets to it."""
    wanted = {
        "event": "peer_secret_loaded",
        "current": fingerprint(current.encode()),
        "accepted": [fingerprint(k.encode()) for k in (current, accepted) if k is not None],
    }
    async with asyncio.timeout(30):
        while True:
            lines = [json.loads(line) for line in node.log_lines() if line.startswith("{")]
            loaded = [line for line in lines if line.get("event") == "peer_secret_loaded"]
            if loaded and {k: loaded[-1].get(k) for k in wanted} == wanted:
                return
            await asyncio.sleep(0.05)


async def test_the_secret_is_rotated_without_downtime(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """Two nodes, each with its own copy of the Secret, updated one after the other (as the
    kubelet does): accepted := new; current := new, accepted := old; accepted removed. At
    every step each node takes the other's tags and the other takes its requests as a peer's.
    A node left with a secret the other doesn't accept is refused, both ways."""
    peers = node_addresses(2, first=70)
    dirs = [tmp_path / "secret-a", tmp_path / "secret-b"]
    old, new = new_secret(), new_secret()
    for directory in dirs:
        write_secrets(directory, old)
    nodes = []
    for address, directory in zip(peers, dirs, strict=True):
        extra = {"cluster": {"secret_dir": str(directory), "refresh": "0.2s"}}
        nodes.extend(
            await start_nodes(detour_process, registry, tmp_path, peers, [address], extra=extra)
        )
    repo = f"docker-mirror/library/{unique_repo('rotate').split('/')[1]}"
    name = repo.removeprefix("docker-mirror/")

    async def both_ways() -> tuple[float, float]:
        """Each node pulls a tag the other owns: (tags it took from the other, lies seen)."""
        for owner, node in ((peers[0], nodes[1]), (peers[1], nodes[0])):
            tag = tag_owned_by(peers, owner, name)
            image = push_image(registry, repo, tag, layers=1, layer_size=KiB)
            assert await get_manifest(node, name, tag) == image.manifest
        served = sum([await n.metric("detour_peer_requests_total", result="served") for n in nodes])
        lies = sum(
            [await n.metric("detour_peers_bypassed_total", reason="unproven_tag") for n in nodes]
        )
        return served, lies

    states = [(old, new), (new, old), (new, None)]  # (current, accepted), the three steps
    checks = 0
    for current, accepted in states:
        for node, directory in zip(nodes, dirs, strict=True):  # one after the other
            write_secrets(directory, current, accepted)
            await wait_loaded(node, current, accepted)
            served, lies = await both_ways()
            checks += 2
            assert (served, lies) == (checks, 0)
    assert not any("peer_proof_refused" in line for n in nodes for line in n.log_lines())

    unknown = new_secret()
    write_secrets(dirs[0], unknown)  # A alone moves on to a secret B doesn't know
    await wait_loaded(nodes[0], unknown)
    _, lies = await both_ways()
    assert lies == 2  # each took the other's tag answer for unproven
    assert any("peer_proof_refused" in line for line in nodes[1].log_lines())


def test_a_request_proof_holds_only_for_its_method_path_peer_time_and_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = new_secret(), new_secret()
    write_secrets(tmp_path / "a", first)
    write_secrets(tmp_path / "b", second, first)  # rotating: accepts both
    write_secrets(tmp_path / "c", second)
    a, b, c = (PeerAuth(tmp_path / name) for name in "abc")
    target, peer = "/v2/library/nats/manifests/v1?ns=docker.io", "10.0.1.2:7439"
    proof = a.sign_request("GET", target, peer)
    assert proof is not None
    assert b.check_request("GET", target, peer, proof, None)
    assert not c.check_request("GET", target, peer, proof, None)  # not a secret c accepts
    for method, path, name in (
        ("HEAD", target, peer),
        ("GET", target.replace("v1", "v2"), peer),
        ("GET", target, "10.0.1.3:7439"),
    ):
        assert not b.check_request(method, path, name, proof, None)
    for forged in (None, "", "abc", f"{proof}0", proof.replace(":", ":0", 1)):
        assert not b.check_request("GET", target, peer, forged, None)
    monkeypatch.setattr(time, "time", lambda: float(proof.split(":")[0]) + 301)
    assert not b.check_request("GET", target, peer, proof, None)  # too old


def test_a_tag_answer_proof_is_bound_to_the_request_and_the_digest(tmp_path: Path) -> None:
    secret = new_secret()
    write_secrets(tmp_path / "s", secret)
    auth = PeerAuth(tmp_path / "s")
    proof = auth.sign_request("GET", "/v2/x/manifests/v1", "p:1")
    assert proof is not None
    headers = {"Docker-Content-Digest": "sha256:" + "a" * 64, "Age": "3"}
    signed = {**headers, PROOF_HEADER: auth.sign_answer(proof, 200, headers)}
    assert auth.check_answer(proof, 200, signed)
    assert not auth.check_answer(None, 200, signed)
    assert not auth.check_answer(proof + "0", 200, signed)
    assert not auth.check_answer(proof, 200, {**signed, "Age": "0"})
    assert not auth.check_answer(
        proof, 200, {**signed, "Docker-Content-Digest": "sha256:" + "b" * 64}
    )
    assert not auth.check_answer(proof, 200, headers)


def test_a_short_or_missing_secret_signs_nothing(tmp_path: Path) -> None:
    write_secrets(tmp_path / "short", "too-short")
    for directory in (tmp_path / "short", tmp_path / "absent"):
        auth = PeerAuth(directory)
        assert auth.required
        assert auth.sign_request("GET", "/v2/", "p:1") is None
        assert not auth.check_request("GET", "/v2/", "p:1", "1:abc", None)


async def test_two_nodes_that_place_a_layer_differently_still_serve_it(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """Node B has served an image's manifest, so it lays the layer's tree over the image's
    order; node A, without the site's secret yet (B answers it as it would a client), is asked
    for the layer alone and lays it over the layer's own digest. A asks B, B's tree leads back
    to A, and A refuses the loop: B takes that refusal as no answer, fetches the layer itself,
    and A's client gets it, not a 403. Neither node is taken for down."""
    peers = node_addresses(2, first=90)
    a_address, b_address = peers
    repo = f"docker-mirror/library/{unique_repo('placed').split('/')[1]}"
    name = repo.removeprefix("docker-mirror/")
    tag = tag_owned_by(peers, b_address, name)  # B asks nobody for it (A can't prove a tag)
    for _ in range(100):
        image = push_image(registry, repo, tag, layers=1, layer_size=KiB)
        layer = image.layers[0]
        by_digest, by_image = (
            blob_owner(peers, layer.digest),
            blob_owner(peers, layer.digest, image),
        )
        if by_digest == b_address and by_image == a_address:
            break
    else:
        raise AssertionError("no image whose layer B owns by digest and A by image")
    write_secrets(tmp_path / "secret", new_secret())
    (b,) = await start_nodes(
        detour_process,
        registry,
        tmp_path,
        peers,
        [b_address],
        extra={"cluster": {"secret_dir": str(tmp_path / "secret")}},
    )
    (a,) = await start_nodes(
        detour_process,
        registry,
        tmp_path,
        peers,
        [a_address],
        extra={"cluster": {"secret_dir": str(tmp_path / "empty")}},
    )
    assert await get_manifest(b, name, tag) == image.manifest  # B now knows the layer's place
    async with a.session.get(f"{a.url}/v2/{name}/blobs/{layer.digest}") as response:
        assert response.status == 200, await response.text()
        assert await response.read() == layer.data
    assert await b.metric("detour_peer_requests_total", result="not_held") == 1  # A's refusal
    for node in (a, b):
        assert await node.metric("detour_peers_down") == 0


async def test_a_node_without_the_secret_still_shares_blobs_but_asks_no_peer_for_tags(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """cluster.secret_dir set but empty (the Secret not created yet): the node's tags come from
    the mirror, its blobs still from their owners (their digests are checked), and no peer is
    taken for down."""
    peers = node_addresses(2, first=80)
    owner_address, node_address = peers
    repo = f"docker-mirror/library/{unique_repo('nosecret').split('/')[1]}"
    name = repo.removeprefix("docker-mirror/")
    tag = tag_owned_by(peers, owner_address, name)
    for _ in range(50):
        image = push_image(registry, repo, tag, layers=1, layer_size=KiB)
        # The node is asked for the manifest first: the layer's tree is its image's.
        if blob_owner(peers, image.layers[0].digest, image) == owner_address:
            break
    write_secrets(tmp_path / "secret", new_secret())
    (owner,) = await start_nodes(
        detour_process,
        registry,
        tmp_path,
        peers,
        [owner_address],
        extra={"cluster": {"secret_dir": str(tmp_path / "secret")}},
    )
    (node,) = await start_nodes(
        detour_process,
        registry,
        tmp_path,
        peers,
        [node_address],
        extra={"cluster": {"secret_dir": str(tmp_path / "empty")}},
    )
    assert any("peer_secret_missing" in line for line in node.log_lines())
    assert await get_manifest(node, name, tag) == image.manifest
    url = f"{node.url}/v2/{name}/blobs/{image.layers[0].digest}"
    async with node.session.get(url) as response:
        assert response.status == 200
        assert await response.read() == image.layers[0].data
    assert await node.metric("detour_peer_requests_total", result="served") == 1  # the blob
    assert await node.metric("detour_peer_requests_total", result="failed") == 0
    assert await node.metric("detour_peers_bypassed_total", reason="unproven_tag") == 0
    assert await owner.metric("detour_cache_requests_total", kind="manifest", result="miss") == 0
