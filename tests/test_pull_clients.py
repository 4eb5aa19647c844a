"""The issue's scenario with real pull clients (skopeo, containerd's ctr) and `detour serve`.

The mirror plays project-a.azurecr.io: ``docker-mirror/`` mirrors Docker Hub and
``ghcr-mirror/`` mirrors GitHub's registry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.containerd import Containerd
from tests.images import PushedImage, PushedIndex, push_image, push_index
from tests.proxy import Proxy, scenario
from tests.registry import Registry

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


@dataclass
class Site:
    mirror: Registry
    proxy: Proxy
    nats: PushedImage
    nack: PushedIndex


@pytest.fixture
async def site(
    make_registry: Callable[..., Registry], detour_process: StartProxy, tmp_path: Path
) -> Site:
    mirror = make_registry()
    nats = push_image(mirror, "docker-mirror/library/nats", "2.10.26-alpine", layers=3)
    nack = push_index(mirror, "ghcr-mirror/nats-io/nack", "0.17.0")
    proxy = await detour_process(scenario(mirror, tmp_path / "cache"))
    return Site(mirror, proxy, nats, nack)


async def run(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"{args}: {err.decode()}"
    return out.decode()


async def skopeo_copy(source: str, dest: Path) -> None:
    await run("skopeo", "copy", "--src-tls-verify=false", f"docker://{source}", f"oci:{dest}:x")


def oci_layout_manifest_digest(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])


async def test_skopeo_pulls_the_scenario_through_the_mirror(site: Site, tmp_path: Path) -> None:
    mark = site.mirror.mark()
    await skopeo_copy(f"{site.proxy.host}/docker.io/library/nats:2.10.26-alpine", tmp_path / "a")
    assert oci_layout_manifest_digest(tmp_path / "a") == site.nats.digest
    # The mirror was asked only about the redirected repository; docker.io was never tried.
    paths = await site.mirror.wait_paths(mark, at_least=1 + len(site.nats.blobs))
    assert all(p.startswith("/v2/docker-mirror/library/nats/") for p in paths), paths
    assert not [line for line in site.proxy.log_lines() if "docker.io/v2" in line]

    # The same pull by the short name is served from disk: every blob a hit.
    hits_before = await site.proxy.metric("detour_cache_requests_total", kind="blob", result="hit")
    misses_before = await site.proxy.metric(
        "detour_cache_requests_total", kind="blob", result="miss"
    )
    await skopeo_copy(f"{site.proxy.host}/nats:2.10.26-alpine", tmp_path / "b")
    assert oci_layout_manifest_digest(tmp_path / "b") == site.nats.digest
    hits = await site.proxy.metric("detour_cache_requests_total", kind="blob", result="hit")
    misses = await site.proxy.metric("detour_cache_requests_total", kind="blob", result="miss")
    assert hits - hits_before == len(site.nats.blobs)
    assert misses == misses_before


async def test_skopeo_gets_the_ghcr_index_byte_for_byte(site: Site) -> None:
    raw = await run(
        "skopeo",
        "inspect",
        "--raw",
        "--tls-verify=false",
        f"docker://{site.proxy.host}/ghcr.io/nats-io/nack:0.17.0",
    )
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == site.nack.digest


async def test_the_request_log_is_json_without_credentials(
    make_registry: Callable[..., Registry], detour_process: StartProxy, tmp_path: Path
) -> None:
    mirror = make_registry("htpasswd")
    image = push_image(mirror, "docker-mirror/library/nats", "2.10.26-alpine")
    config = scenario(mirror, tmp_path / "cache")
    config["registries"][mirror.host].update(username=mirror.username, password=mirror.password)
    proxy = await detour_process(config)
    await skopeo_copy(f"{proxy.host}/nats:2.10.26-alpine", tmp_path / "a")
    text = "\n".join(proxy.log_lines())
    assert mirror.password not in text
    requests = [json.loads(line) for line in proxy.log_lines() if '"request"' in line]
    manifest = next(r for r in requests if r.get("reference") == "2.10.26-alpine")
    assert manifest["name"] == "docker.io/library/nats"
    assert manifest["cache"] == "miss"
    assert manifest["upstream"] == f"{mirror.host}/docker-mirror/library/nats"
    assert manifest["status"] == 200
    assert manifest["bytes"] == len(image.manifest)
    assert isinstance(manifest["duration_ms"], float)
    blobs = [r for r in requests if r.get("reference", "").startswith("sha256:")]
    assert {r["bytes"] for r in blobs if r["method"] == "GET"} <= {b.size for b in image.blobs}


async def test_containerd_pulls_in_path_mode(site: Site, containerd: Containerd) -> None:
    for ref in (
        f"{site.proxy.host}/docker.io/library/nats:2.10.26-alpine",
        f"{site.proxy.host}/nats:2.10.26-alpine",
    ):
        (await containerd.pull(ref, plain_http=True)).check()
        assert await containerd.image_digest(ref) == site.nats.digest
        status = await containerd.image_status(ref)
        assert status is not None
        assert status[1]  # unpacked: every layer was a good tar.gz
    # The second pull (short name) found everything on disk.
    assert await site.proxy.metric("detour_cache_requests_total", kind="blob", result="miss") == (
        len(site.nats.blobs)
    )


async def test_containerd_pulls_the_ghcr_index_with_its_digest(
    site: Site, containerd: Containerd
) -> None:
    ref = f"{site.proxy.host}/ghcr.io/nats-io/nack:0.17.0"
    (await containerd.pull(ref, plain_http=True, all_platforms=True)).check()
    assert await containerd.image_digest(ref) == site.nack.digest
    fetched = await containerd.content_digests()
    for child in site.nack.children:  # every platform came through
        assert child.digest in fetched
        assert all(blob.digest in fetched for blob in child.blobs)


@pytest.mark.parametrize(
    ("ref", "registry"),
    [
        ("docker.io/library/nats:2.10.26-alpine", "docker.io"),
        ("ghcr.io/nats-io/nack:0.17.0", "ghcr.io"),
    ],
)
async def test_containerd_mirror_mode(
    site: Site, containerd: Containerd, ref: str, registry: str
) -> None:
    """hosts.toml names the proxy; the server is a dead local port, so only the proxy can
    satisfy the pull."""
    hosts = containerd.write_hosts(site.proxy.url, registry)
    mark = site.mirror.mark()
    (await containerd.pull(ref, hosts_dir=hosts)).check()
    expected = site.nats.digest if registry == "docker.io" else site.nack.digest
    assert await containerd.image_digest(ref) == expected
    prefix = "/v2/docker-mirror/" if registry == "docker.io" else "/v2/ghcr-mirror/"
    paths = await site.mirror.wait_paths(mark, at_least=1)
    assert all(p.startswith(prefix) for p in paths), paths
