"""``detour cache ls|rm|prune``: a cache an operator can see and manage, also while it serves.

Against ``detour serve`` as a real process: what ``ls`` lists is what was pulled, by name:tag,
digest and size; ``rm`` and ``prune`` go through the proxy, so ``detour_cache_size_bytes``
drops by exactly what was removed, and a removed image is fetched again, whole. Offline, the
same commands work on a directory no proxy serves. The graph rules (shared blobs, indexes, two
tags of one digest, removal by digest) are checked on a cache written through CacheStore.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.api.admin import from_loopback
from proxy.cache.inventory import scan
from proxy.cache.removals import NotCached, plan_prune, plan_remove
from proxy.cache.store import CacheStore, TagRecord
from proxy.files import write_atomic
from proxy.oci import StoredManifest
from proxy.reference import Digest, ImageName
from tests.images import (
    OCI_MANIFEST,
    PushedImage,
    build_image,
    push_image,
    sha256_digest,
    unique_repo,
    upload_image,
)
from tests.proxy import (
    Proxy,
    blob_path,
    pull_image,
    scenario,
    slow_client_get,
    stop_process,
    wait_cached,
)
from tests.registry import Registry

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
DAY = 86400.0


async def detour(*args: str) -> tuple[int, str, str]:
    """Run ``detour ARGS`` as a process: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def ls(*where: str) -> dict[str, Any]:
    code, out, err = await detour("cache", "ls", "--json", *where)
    assert code == 0, err
    document: dict[str, Any] = json.loads(out)
    return document


def hub_image(registry: Registry, **kwargs: Any) -> tuple[str, PushedImage]:
    """An image the proxy serves as ``docker.io/library/<name>:v1`` (from the mirror)."""
    name = unique_repo("x").split("/")[1]
    return name, push_image(registry, f"docker-mirror/library/{name}", "v1", **kwargs)


def sharing_image(registry: Registry, base: PushedImage) -> tuple[str, PushedImage]:
    """Another image whose first layer is ``base``'s."""
    name = unique_repo("x").split("/")[1]
    repo = f"docker-mirror/library/{name}"
    own = build_image(repo, "v1", layers=1)
    layers = (base.layers[0], *own.layers)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": own.config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }
    ).encode()
    digest = sha256_digest(manifest)
    image = PushedImage(
        repo, "v1", manifest, digest, OCI_MANIFEST, own.config, layers, own.platform
    )
    upload_image(registry, image)
    return name, image


def on_disk(image: PushedImage) -> int:
    """What an image takes in the cache: its manifest file ("<media type>\\n<body>") and blobs."""
    return len(image.media_type) + 1 + len(image.manifest) + sum(b.size for b in image.blobs)


def manifest_path(cache: Path, digest: str) -> Path:
    hexpart = digest.removeprefix("sha256:")
    return cache / "manifests" / "sha256" / hexpart[:2] / hexpart


def tag_path(cache: Path, name: str, tag: str) -> Path:
    key = hashlib.sha256(f"docker.io/library/{name}:{tag}".encode()).hexdigest()
    return cache / "tags" / key[:2] / key


def files_of(cache: Path, name: str, image: PushedImage) -> list[Path]:
    return [
        tag_path(cache, name, "v1"),
        manifest_path(cache, image.digest),
        *(blob_path(cache, blob.digest) for blob in image.blobs),
    ]


async def pull(proxy: Proxy, name: str, image: PushedImage) -> None:
    """Pull ``name:v1`` whole through the proxy, checking every byte, until it is cached."""
    await pull_image(proxy, name, image)
    for blob in image.blobs:
        assert await wait_cached(proxy.cache_dir, blob.digest)


async def settled(proxy: Proxy) -> int:
    """The proxy's ``detour_cache_size_bytes`` once the cache is at rest and it agrees with the
    files (fetched blobs committed, removed files deleted)."""
    usage = size = -1.0
    for _ in range(250):
        usage = sum(
            p.stat().st_size
            for kind in ("blobs", "manifests")
            for p in (proxy.cache_dir / kind).rglob("*")
            if p.is_file()
        )
        size = await proxy.metric("detour_cache_size_bytes")
        if usage == size and not list((proxy.cache_dir / "tmp").iterdir()):
            return int(size)
        await asyncio.sleep(0.02)
    raise AssertionError(f"never settled: {usage} bytes on disk, the proxy counts {size}")


def by_image(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {image["image"]: image for image in document["images"]}


async def test_ls_and_rm_through_the_running_proxy(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    (a_name, a), (b_name, b) = hub_image(registry), hub_image(registry, layers=3)
    proxy = await detour_process(scenario(registry, cache))
    await pull(proxy, a_name, a)
    await pull(proxy, a_name, a)  # a hit: its tag and manifest are now kept in memory too
    await pull(proxy, b_name, b)
    total = await settled(proxy)
    assert total == on_disk(a) + on_disk(b)

    listing = await ls("--endpoint", proxy.url)
    images = by_image(listing)
    a_ref, b_ref = f"docker.io/library/{a_name}:v1", f"docker.io/library/{b_name}:v1"
    assert sorted(images) == sorted([a_ref, b_ref])
    for ref, image in ((a_ref, a), (b_ref, b)):
        assert images[ref]["digest"] == image.digest
        assert images[ref]["size"] == images[ref]["unique_size"] == on_disk(image)
        assert (images[ref]["manifests"], images[ref]["blobs"]) == (1, len(image.blobs))
        assert images[ref]["missing_blobs"] == 0
    assert listing["untagged"] == []
    assert listing["totals"]["size"] == listing["proxy"]["cache_size"] == total

    code, table, _ = await detour("cache", "ls", "--endpoint", proxy.url)
    assert code == 0
    assert f"{a_ref}  {a.digest[:19]}" in table
    assert "2 images, 0 untagged; 2 manifests, 7 blobs" in table

    # rm, as an operator types it: the short name.
    code, out, err = await detour("cache", "rm", "--endpoint", proxy.url, f"{a_name}:v1")
    assert code == 0, err
    assert f"removed {a_ref}" in out
    assert await proxy.metric("detour_cache_size_bytes") == total - on_disk(a)
    assert not any(path.exists() for path in files_of(cache, a_name, a))
    assert all(path.exists() for path in files_of(cache, b_name, b))
    assert sorted(by_image(await ls("--endpoint", proxy.url))) == [b_ref]

    # The next pull is a miss: the registry serves the whole image again, and it is cached.
    mark = registry.mark()
    await pull(proxy, a_name, a)
    fetched = await registry.wait_paths(mark, at_least=len(a.blobs) + 1)
    repo = f"/v2/docker-mirror/library/{a_name}"
    assert f"{repo}/manifests/v1" in fetched
    assert {f"{repo}/blobs/{blob.digest}" for blob in a.blobs} <= set(fetched)
    assert await settled(proxy) == total
    assert blob_path(cache, a.layers[0].digest).read_bytes() == a.layers[0].data
    assert by_image(await ls("--endpoint", proxy.url))[a_ref]["size"] == on_disk(a)

    # By digest, as ls shows it (12 hex digits): the image goes, under every tag.
    code, out, err = await detour("cache", "rm", "--endpoint", proxy.url, b.digest[:19])
    assert code == 0, err
    assert await proxy.metric("detour_cache_size_bytes") == on_disk(a)
    code, _, err = await detour("cache", "rm", "--endpoint", proxy.url, f"{b_name}:v1")
    assert code == 1
    assert f"docker.io/library/{b_name}:v1 is not in the cache" in err


async def test_prune_removes_what_was_not_used_and_keeps_shared_blobs(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    old_name, old = hub_image(registry)
    new_name, new = sharing_image(registry, old)  # shares old's first layer
    proxy = await detour_process(scenario(registry, cache))
    await pull(proxy, old_name, old)
    await pull(proxy, new_name, new)
    total = await settled(proxy)
    shared = old.layers[0].size
    assert total == on_disk(old) + on_disk(new) - shared
    images = by_image(await ls("--endpoint", proxy.url))
    old_ref = f"docker.io/library/{old_name}:v1"
    assert images[old_ref]["unique_size"] == on_disk(old) - shared

    forty_days_ago = time.time() - 40 * DAY
    for path in files_of(cache, old_name, old):
        if path != blob_path(cache, old.layers[0].digest):  # also new's, used just now
            os.utime(path, (forty_days_ago, forty_days_ago))

    code, out, err = await detour("cache", "prune", "--older-than", "30d", "--endpoint", proxy.url)
    assert code == 0, err
    assert f"removed {old_ref}" in out
    assert await proxy.metric("detour_cache_size_bytes") == total - (on_disk(old) - shared)
    assert blob_path(cache, old.layers[0].digest).exists()
    assert not manifest_path(cache, old.digest).exists()
    assert sorted(by_image(await ls("--endpoint", proxy.url))) == [
        f"docker.io/library/{new_name}:v1"
    ]
    # Nothing else is that old.
    code, out, _ = await detour("cache", "prune", "--older-than", "30d", "--endpoint", proxy.url)
    assert code == 0
    assert "0 tags, 0 manifests, 0 blobs removed; 0 B freed" in out
    assert await settled(proxy) == on_disk(new)


async def test_offline_commands_work_on_the_files_and_refuse_a_served_directory(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    (a_name, a), (b_name, b) = hub_image(registry), hub_image(registry)
    proxy = await detour_process(scenario(registry, cache))
    await pull(proxy, a_name, a)
    await pull(proxy, b_name, b)
    await settled(proxy)
    online = await ls("--endpoint", proxy.url)
    config = str(tmp_path / "detour-0" / "detour.yaml")  # written by detour_process

    # While the proxy serves the directory, the files are its to remove.
    code, _, err = await detour("cache", "rm", "--config", config, f"{a_name}:v1")
    assert code == 2
    assert f"use --endpoint {proxy.url}" in err
    assert manifest_path(cache, a.digest).exists()

    await stop_process(proxy)
    offline = await ls(str(cache))
    del online["proxy"]
    assert offline == online
    code, out, err = await detour("cache", "rm", "--config", config, f"{a_name}:v1")
    assert code == 0, err
    assert f"removed docker.io/library/{a_name}:v1" in out
    assert not any(path.exists() for path in files_of(cache, a_name, a))
    assert not list((cache / "tmp").iterdir())
    assert sorted(by_image(await ls(str(cache)))) == [f"docker.io/library/{b_name}:v1"]
    code, _, err = await detour("cache", "ls", str(tmp_path))
    assert code == 2
    assert "is not a cache directory" in err


def non_loopback_address() -> str | None:
    """One of this machine's addresses that is not a loopback one, if it has any."""
    for target in ("192.0.2.1", "10.255.255.255", "198.51.100.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((target, 9))  # UDP: picks the source address, sends nothing
            except OSError:
                continue
            address: str = probe.getsockname()[0]
            if not address.startswith("127."):
                return address
    return None


async def test_admin_requests_only_from_loopback(
    make_proxy: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await make_proxy(scenario(registry, tmp_path / "cache"))
    async with proxy.session.get(f"{proxy.url}/_detour/cache") as response:
        assert response.status == 200
        assert (await response.json())["images"] == []
    address = non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback address here (the check itself is tested below)")
    # From another of this machine's addresses to the same 127.0.0.1 listener: what counts is
    # the client's address.
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    async with aiohttp.ClientSession(connector=connector) as outsider:
        for method, path in (
            ("GET", "/_detour/cache"),
            ("DELETE", "/_detour/cache/nats:1"),
            ("POST", "/_detour/cache/prune?older_than=1s"),
        ):
            async with outsider.request(method, f"{proxy.url}{path}") as response:
                assert response.status == 403
                body = await response.json()
                assert body["errors"][0]["code"] == "DENIED"


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # a dual-stack listener's spelling
        ("192.0.2.2", False),
        ("10.244.1.1", False),  # the node, as the hostPort's masquerade makes it
        ("::ffff:192.0.2.2", False),
        ("fe80::1%eth0", False),
        ("", False),
        (None, False),
        ("localhost", False),
    ],
)
def test_loopback_check(remote: str | None, loopback: bool) -> None:
    assert from_loopback(remote) is loopback


async def test_rm_waits_for_a_blob_being_sent(
    make_proxy: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """A hit being sent is never taken from under its reader: rm waits for the send to end,
    the client gets the whole blob, then the file goes."""
    name, image = hub_image(registry, layers=1, layer_size=24 * 1024 * 1024)
    proxy = await make_proxy(scenario(registry, tmp_path / "cache"))
    await pull(proxy, name, image)
    layer = image.layers[0]
    # A small receive buffer: the kernel can't take the whole blob off Detour's hands.
    reader, writer, head = await slow_client_get(proxy, f"/v2/{name}/blobs/{layer.digest}")
    assert head.startswith(b"HTTP/1.1 200 "), head
    try:
        first = await reader.readexactly(1024)  # then read nothing: the send stalls
        removing = asyncio.ensure_future(
            proxy.session.delete(f"{proxy.url}/_detour/cache/{name}:v1")
        )
        await asyncio.sleep(0.5)
        assert not removing.done()
        assert blob_path(proxy.cache_dir, layer.digest).exists()
        body = first + await reader.read()  # to the end: the connection closes after it
    finally:
        writer.close()
    assert hashlib.sha256(body).hexdigest() == layer.digest.removeprefix("sha256:")
    async with await removing as answer:
        outcome = await answer.json()
    assert answer.status == 200
    assert outcome["busy"] == []
    assert {e["ref"] for e in outcome["removed"] if e["kind"] == "blob"} == {
        blob.digest for blob in image.blobs
    }
    assert not blob_path(proxy.cache_dir, layer.digest).exists()
    assert await proxy.metric("detour_cache_size_bytes") == 0


# --------------------------------------------------------------------------- the graph's rules


async def _cache(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A cache written through CacheStore, with (on the right, what each holds):

    app:1           index I → child C1 (cached: config K1, layers L1 L2; L3 not cached), C2 (not)
    app:2, latest   manifest M2 → config K2, layers L1 (shared with C1), L4
    app:gone        C2 (evicted: only the tag record is left)
    (untagged)      manifest U → layer L5; blob O that no manifest names
    """
    root = tmp_path / "cache"
    store = CacheStore(root)
    store.open()
    names = ("K1", "L1", "L2", "K2", "L4", "L5", "O")
    blobs = {name: f"{name} {'x' * 100 * i}".encode() for i, name in enumerate(names, start=1)}
    digests = {name: sha256_digest(data) for name, data in blobs.items()}
    digests["L3"] = sha256_digest(b"L3, never cached")
    for name, data in blobs.items():
        write_atomic(store.blob_path(Digest.parse(digests[name])), data)

    def manifest(config: str, layers: list[str]) -> bytes:
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"digest": digests[config], "size": 1},
                "layers": [{"digest": digests[layer], "size": 1} for layer in layers],
            }
        ).encode()

    bodies = {
        "C1": manifest("K1", ["L1", "L2", "L3"]),
        "C2": manifest("K2", ["L4"]),  # not cached
        "M2": manifest("K2", ["L1", "L4"]),
        "U": manifest("K1", ["L5"]),
    }
    index = {
        "schemaVersion": 2,
        "manifests": [{"digest": sha256_digest(bodies[c])} for c in ("C1", "C2")],
    }
    bodies["I"] = json.dumps(index).encode()
    for name, body in bodies.items():
        digests[name] = sha256_digest(body)
        if name != "C2":
            media = "application/vnd.oci.image.index.v1+json" if name == "I" else OCI_MANIFEST
            await store.put_manifest(StoredManifest(Digest.parse(digests[name]), media, body))
    app = ImageName.parse("app")
    for tag, target in (("1", "I"), ("2", "M2"), ("latest", "M2"), ("gone", "C2")):
        record = TagRecord(Digest.parse(digests[target]), "x", time.time())
        await store.put_tag(app, tag, record)
    return root, digests


def _sizes(root: Path, digests: dict[str, str], *names: str) -> int:
    inventory = scan(root)
    return sum(
        (inventory.blobs.get(digests[n]) or inventory.manifests[digests[n]].file).size
        for n in names
    )


def _removed(root: Path, digests: dict[str, str], *targets: str) -> set[str]:
    """The entries (by their names above) and tags that removing ``targets`` takes."""
    plan = plan_remove(scan(root), list(targets))
    names = {digest: name for name, digest in digests.items()}
    return {names[digest] for (_, digest), _ in plan.entries} | {tag.tag for tag in plan.tags}


async def test_listing_counts_shared_blobs_once(tmp_path: Path) -> None:
    root, d = await _cache(tmp_path)
    document = scan(root).document()
    images = by_image(document)
    assert sorted(images) == [f"docker.io/library/app:{tag}" for tag in ("1", "2", "latest")]
    one = images["docker.io/library/app:1"]
    assert one["size"] == _sizes(root, d, "I", "C1", "K1", "L1", "L2")
    assert one["unique_size"] == _sizes(root, d, "I", "C1", "L2")  # K1: U's too; L1: M2's
    assert (one["manifests"], one["blobs"], one["missing_blobs"]) == (2, 3, 1)  # L3
    two = images["docker.io/library/app:2"]
    assert two["size"] == _sizes(root, d, "M2", "K2", "L1", "L4")
    assert two["unique_size"] == 0  # app:latest is the same image
    untagged = {(e["kind"], e["digest"]): e for e in document["untagged"]}
    assert set(untagged) == {("manifest", d["U"]), ("blob", d["O"])}
    assert untagged[("manifest", d["U"])]["unique_size"] == _sizes(root, d, "U", "L5")
    assert document["uncached_tags"] == ["docker.io/library/app:gone"]
    assert document["totals"]["size"] == _sizes(
        root, d, "I", "C1", "M2", "U", "K1", "L1", "L2", "K2", "L4", "L5", "O"
    )
    counts = {"images": 3, "untagged": 2, "manifests": 4, "blobs": 7}
    assert document["totals"] == counts | {"size": document["totals"]["size"]}


async def test_what_rm_takes(tmp_path: Path) -> None:
    root, d = await _cache(tmp_path)
    assert _removed(root, d, "app:2") == {"2"}  # app:latest still needs all of it
    assert _removed(root, d, "app:1") == {"1", "I", "C1", "L2"}
    assert _removed(root, d, d["M2"]) == {"2", "latest", "M2", "K2", "L4"}
    assert _removed(root, d, d["C1"][:19]) == {"C1", "L2"}  # a platform's manifest, in an index
    assert _removed(root, d, d["L1"]) == {"L1"}  # named: removed, though others use it
    assert _removed(root, d, d["U"]) == {"U", "L5"}
    assert _removed(root, d, d["O"]) == {"O"}
    assert _removed(root, d, "app:gone") == _removed(root, d, d["C2"]) == {"gone"}
    for missing in ("app:3", "other:1", d["L3"], "sha256:" + "0" * 12):
        with pytest.raises(NotCached):
            plan_remove(scan(root), [missing])
    with pytest.raises(ValueError, match="invalid"):
        plan_remove(scan(root), ["App:1"])


async def test_what_prune_takes(tmp_path: Path) -> None:
    root, d = await _cache(tmp_path)
    inventory = scan(root)
    old = time.time() - 40 * DAY
    for tag in inventory.tags:
        if tag.tag == "1":
            os.utime(tag.file.path, (old, old))
    for name in ("I", "C1", "K1", "L1", "L2", "U", "L5", "O"):
        path = (inventory.blobs.get(d[name]) or inventory.manifests[d[name]].file).path
        os.utime(path, (old, old))
    plan = plan_prune(scan(root), 30 * DAY, in_use=lambda _: False)
    names = {digest: name for name, digest in d.items()}
    # K1 was C1's and U's, both old: it goes. L1 is M2's too, used since: it stays.
    pruned = {names[digest] for (_, digest), _ in plan.entries}
    assert pruned == {"I", "C1", "K1", "L2", "U", "L5", "O"}
    assert [tag.tag for tag in plan.tags] == ["1"]
    # Anything being sent is in use: its image is not pruned (nor K1, which it reaches).
    pinned = inventory.blobs[d["L2"]].path
    plan = plan_prune(scan(root), 30 * DAY, in_use=lambda path: path == pinned)
    assert {names[digest] for (_, digest), _ in plan.entries} == {"U", "L5", "O"}
