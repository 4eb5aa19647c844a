"""``detour warm``: after warming, the mirror can go away and pulls still work.

Each test warms through Detour (in-process from settings, as the ``detour warm`` command, or a
running ``detour serve`` through ``--endpoint``), then stops the mirror and pulls the image in
full through a proxy on the same cache directory: only what warming put there can answer.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from proxy.reference import Digest
from proxy.settings import Settings
from proxy.tools.cli import main
from proxy.tools.humanize import human_bytes
from proxy.tools.platforms import Platform
from proxy.tools.warm import Failed, Warmed, warm
from tests.images import (
    ACCEPT_ALL,
    OCI_MANIFEST,
    PushedImage,
    PushedIndex,
    build_image,
    push_image,
    push_index,
    unique_repo,
)
from tests.proxy import Proxy, blob_path, pull_image, scenario
from tests.registry import Registry

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


def settings_of(config: dict[str, Any]) -> Settings:
    return Settings.model_validate({k: v for k, v in config.items() if k != "listen"})


def hub_repo() -> tuple[str, str]:
    """A fresh Docker Hub-style repository: (name under docker.io, path on the mirror)."""
    name = unique_repo("library").split("/", 1)[1]
    return name, f"docker-mirror/library/{name}"


async def pull_index(proxy: Proxy, name: str, tag: str, index: PushedIndex) -> None:
    async with proxy.session.get(
        f"{proxy.url}/v2/{name}/manifests/{tag}", headers={"Accept": ACCEPT_ALL}
    ) as response:
        assert response.status == 200, await response.text()
        assert await response.read() == index.manifest


async def status_of(proxy: Proxy, path: str) -> int:
    async with proxy.session.get(f"{proxy.url}{path}", headers={"Accept": ACCEPT_ALL}) as r:
        await r.read()
        return r.status


def blob_bytes(image: PushedImage) -> int:
    return sum(blob.size for blob in image.blobs)


async def test_a_warmed_image_pulls_with_the_mirror_down(
    registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    name, mirror_repo = hub_repo()
    image = push_image(registry, mirror_repo, "2.10.26-alpine", layers=3)
    config = scenario(registry, tmp_path / "cache")
    reports: list[Warmed | Failed] = []
    mark = registry.mark()

    outcomes = await warm([f"{name}:2.10.26-alpine"], settings_of(config), report=reports.append)

    assert outcomes == reports
    assert outcomes == [
        Warmed(
            f"docker.io/library/{name}:2.10.26-alpine",
            Digest.parse(image.digest),
            (),
            4,
            blob_bytes(image),
        )
    ]
    # Fetched through the rule, from the mirror's docker-mirror/ (never from docker.io).
    paths = await registry.wait_paths(mark, at_least=5)
    assert all(p.startswith(f"/v2/{mirror_repo}/") for p in paths), paths
    registry.stop()
    proxy = await make_proxy(config)
    await pull_image(proxy, f"docker.io/library/{name}", image, "2.10.26-alpine")
    await pull_image(proxy, name, image, image.digest)


async def test_one_platform_of_an_index_is_warmed(
    registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    repo = unique_repo("nats-io")
    index = push_index(registry, f"ghcr-mirror/{repo}", "0.17.0")
    amd64, arm64 = index.children
    config = scenario(registry, tmp_path / "cache")

    [outcome] = await warm(
        [f"ghcr.io/{repo}:0.17.0"], settings_of(config), platform=Platform.parse("linux/arm64")
    )

    assert isinstance(outcome, Warmed), outcome
    assert outcome.digest == Digest.parse(index.digest)
    assert outcome.platforms == ("linux/arm64",)
    assert (outcome.blobs, outcome.bytes) == (2, blob_bytes(arm64))
    cache = tmp_path / "cache"
    assert all(blob_path(cache, blob.digest).is_file() for blob in arm64.blobs)
    assert not any(blob_path(cache, blob.digest).exists() for blob in amd64.blobs)

    registry.stop()
    proxy = await make_proxy(config)
    await pull_index(proxy, f"ghcr.io/{repo}", "0.17.0", index)
    await pull_image(proxy, f"ghcr.io/{repo}", arm64, arm64.digest)
    # amd64 was left out: with the mirror down, nothing can answer for it.
    assert await status_of(proxy, f"/v2/ghcr.io/{repo}/manifests/{amd64.digest}") == 502
    assert await status_of(proxy, f"/v2/ghcr.io/{repo}/blobs/{amd64.layers[0].digest}") == 502


async def test_all_platforms_of_an_index_are_warmed(
    registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    repo = unique_repo("nats-io")
    index = push_index(
        registry,
        f"ghcr-mirror/{repo}",
        "0.17.0",
        (("linux", "amd64"), ("linux", "arm64", "v8"), ("linux", "arm", "v7")),
        media="docker",
    )
    config = scenario(registry, tmp_path / "cache")

    [outcome] = await warm([f"ghcr.io/{repo}:0.17.0"], settings_of(config), all_platforms=True)

    assert isinstance(outcome, Warmed), outcome
    assert outcome.platforms == ("linux/amd64", "linux/arm64/v8", "linux/arm/v7")
    assert outcome.blobs == 6
    assert outcome.bytes == sum(blob_bytes(child) for child in index.children)
    registry.stop()
    proxy = await make_proxy(config)
    await pull_index(proxy, f"ghcr.io/{repo}", "0.17.0", index)
    for child in index.children:
        await pull_image(proxy, f"ghcr.io/{repo}", child, child.digest)


async def test_the_default_platform_is_this_machines(registry: Registry, tmp_path: Path) -> None:
    host = Platform.host()
    mine: tuple[str, str] | tuple[str, str, str] = (host.os, host.architecture)
    if host.variant is not None:
        mine = (host.os, host.architecture, host.variant)
    repo = unique_repo("nats-io")
    index = push_index(registry, f"ghcr-mirror/{repo}", "v1", (mine, ("linux", "s390x")))
    settings = settings_of(scenario(registry, tmp_path / "cache"))

    [outcome] = await warm([f"ghcr.io/{repo}:v1"], settings)

    assert isinstance(outcome, Warmed), outcome
    assert outcome.platforms == (str(host),)
    assert (outcome.blobs, outcome.bytes) == (2, blob_bytes(index.children[0]))

    [outcome] = await warm([f"ghcr.io/{repo}:v1"], settings, platform=Platform("linux", "riscv64"))
    assert isinstance(outcome, Failed)
    assert outcome.error == (
        f"no manifest for linux/riscv64 in the index {index.digest} "
        f"(it has {host}, linux/s390x; try --platform or --all-platforms)"
    )


async def test_warm_through_a_running_proxy(
    registry: Registry, detour_process: MakeProxy, tmp_path: Path
) -> None:
    name, mirror_repo = hub_repo()
    image = push_image(registry, mirror_repo, "v1")
    repo = unique_repo("nats-io")
    index = push_index(registry, f"ghcr-mirror/{repo}", "0.17.0")
    proxy = await detour_process(scenario(registry, tmp_path / "cache"))

    outcomes = await warm(
        [f"{name}:v1", f"ghcr.io/{repo}:0.17.0"],
        endpoint=proxy.url,
        platform=Platform.parse("linux/amd64"),
    )

    assert [type(o) for o in outcomes] == [Warmed, Warmed], outcomes
    registry.stop()
    await pull_image(proxy, name, image, "v1")
    await pull_index(proxy, f"ghcr.io/{repo}", "0.17.0", index)
    await pull_image(proxy, f"ghcr.io/{repo}", index.children[0], index.children[0].digest)
    # The running proxy did the fetching and counted it.
    assert await proxy.metric("detour_cache_requests_total", kind="blob", result="miss") == 5


async def test_an_unreachable_endpoint_fails_every_image_at_once(tmp_path: Path) -> None:
    outcomes = await warm(["nats:1", "ghcr.io/a/b:2"], endpoint="http://127.0.0.1:1")
    assert [type(o) for o in outcomes] == [Failed, Failed]
    assert all("cannot reach the proxy at http://127.0.0.1:1" in o.line() for o in outcomes)


async def test_the_command_warms_the_rest_when_one_image_is_unknown(
    registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """``python -m proxy warm``, as an operator runs it: exit 1, a message, the rest warmed."""
    name, mirror_repo = hub_repo()
    image = push_image(registry, mirror_repo, "v1", layers=3)
    missing, _ = hub_repo()
    config = scenario(registry, tmp_path / "cache")
    config_file = tmp_path / "detour.yaml"
    # No listen: warm starts its own Detour on 127.0.0.1 at a port of its choosing.
    config_file.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "listen"}))

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "warm",
        "--config",
        str(config_file),
        f"{missing}:v1",
        f"{name}:v1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("DETOUR_")},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 1, err.decode()
    assert out.decode().splitlines() == [
        f"warmed docker.io/library/{name}:v1 {image.digest} "
        f"(4 blobs, {human_bytes(blob_bytes(image))})"
    ]
    assert re.fullmatch(r"warmed \S+ sha256:[0-9a-f]{64} \(4 blobs, \d+\.\d kB\)\n", out.decode())
    assert err.decode().splitlines() == [
        f"detour: warm docker.io/library/{missing}:v1: manifest unknown to upstream: "
        f"{registry.url}/v2/docker-mirror/library/{missing}/manifests/v1 "
        "(MANIFEST_UNKNOWN, HTTP 404)",
        "detour: 1 of 2 images not warmed",
    ]

    registry.stop()
    proxy = await make_proxy(config)
    await pull_image(proxy, name, image, "v1")
    # A real client agrees: skopeo copies the whole image with the mirror down.
    skopeo = await asyncio.create_subprocess_exec(
        "skopeo",
        "copy",
        "--src-tls-verify=false",
        f"docker://{proxy.host}/docker.io/library/{name}:v1",
        f"oci:{tmp_path / 'copy'}:x",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, skopeo_err = await asyncio.wait_for(skopeo.communicate(), 60)
    assert skopeo.returncode == 0, skopeo_err.decode()


async def test_a_corrupt_blob_on_the_mirror_is_reported_and_the_next_image_warms(
    registry: Registry, tmp_path: Path
) -> None:
    bad_name, bad_repo = hub_repo()
    bad = push_image(registry, bad_repo, "v1", layers=2, layer_size=2 * 1024 * 1024)
    good_name, good_repo = hub_repo()
    push_image(registry, good_repo, "v1")
    layer = bad.layers[1]
    path = registry.stored_blob(layer.digest)
    corrupt = bytearray(path.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    cache = tmp_path / "cache"

    first, second = await warm(
        [f"{bad_name}:v1", f"{good_name}:v1"], settings_of(scenario(registry, cache))
    )

    assert isinstance(first, Failed), first
    assert first.error.startswith(f"blob {layer.digest}: "), first.error
    assert not blob_path(cache, layer.digest).exists()
    assert blob_path(cache, bad.layers[0].digest).is_file()  # the sound blobs were still cached
    assert isinstance(second, Warmed), second


async def test_wrong_bytes_under_a_200_are_caught(aiohttp_server: Any) -> None:
    """Whatever answers at the endpoint, warm checks each blob against its descriptor."""
    image = build_image("library/x", "v1", layers=1)
    layer = image.layers[0]
    wrong = bytes(b ^ 0xFF for b in layer.data)  # same size

    async def serve(request: web.Request) -> web.Response:
        tail = request.match_info["tail"]
        if "/manifests/" in tail:
            return web.Response(
                body=image.manifest,
                headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": image.digest},
            )
        data = wrong if tail.endswith(layer.digest) else image.config.data
        return web.Response(body=data)

    async def root(_: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v2/", root)
    app.router.add_get("/v2/{tail:.+}", serve)
    server = await aiohttp_server(app, host="127.0.0.1")

    [outcome] = await warm(["x:v1"], endpoint=f"http://127.0.0.1:{server.port}")

    assert outcome == Failed(
        "docker.io/library/x:v1",
        f"blob {layer.digest}: the bytes received do not match the digest",
    )


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "detour.yaml"
    config.write_text(yaml.safe_dump({"cache": {"dir": str(tmp_path / "cache")}}))
    assert main(["warm", "--config", str(config), "Nats:1"]) == 2
    assert "invalid image reference 'Nats:1'" in capsys.readouterr().err
    assert main(["warm", "--config", str(config), "--platform", "linux", "nats"]) == 2
    assert "invalid platform 'linux'" in capsys.readouterr().err
    assert main(["warm", "--endpoint", "127.0.0.1:7439", "nats"]) == 2
    assert "expected e.g. http://127.0.0.1:7439" in capsys.readouterr().err
    assert main(["warm", "--config", str(tmp_path / "nope.yaml"), "nats"]) == 2
    with pytest.raises(SystemExit):
        main(["warm", "--platform", "linux/arm64", "--all-platforms", "nats"])
    assert not (tmp_path / "cache").exists()  # nothing was started


@pytest.mark.parametrize(
    ("wanted", "child", "matches"),
    [
        ("linux/amd64", "linux/amd64", True),
        ("linux/amd64", "linux/arm64", False),
        ("linux/arm64", "linux/arm64/v8", True),
        ("linux/arm64/v8", "linux/arm64", True),  # arm64 without a variant is v8
        ("linux/arm/v7", "linux/arm/v6", False),
        ("linux/arm", "linux/arm/v6", True),
        ("LINUX/AMD64", "linux/amd64", True),
        ("windows/amd64", "linux/amd64", False),
    ],
)
def test_platform_matching(wanted: str, child: str, matches: bool) -> None:
    assert Platform.parse(wanted).matches(Platform.parse(child)) is matches


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d", ""])
def test_bad_platforms(text: str) -> None:
    with pytest.raises(ValueError, match="invalid platform"):
        Platform.parse(text)


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (12_345_678, "12.3 MB"), (2 * 10**12, "2.0 TB")],
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


async def test_warm_asks_in_path_mode_and_survives_json_nested_too_deeply(
    aiohttp_server: Any,
) -> None:
    """Names are spelled as the proxy reads them (a port as ``_<port>``, a host ending in
    ``-<digits>`` as it is); a manifest or an error body nested deeper than a JSON parser goes
    is a failure with a reason, not a crash."""
    deep = b"[" * 100_000 + b"]" * 100_000
    asked: list[str] = []

    async def serve(request: web.Request) -> web.Response:
        asked.append(request.path)
        if request.path.startswith("/v2/registry.team-2/"):
            digest = Digest.of(deep)
            return web.Response(
                body=deep,
                headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": str(digest)},
            )
        error = b"[" * 30_000 + b"]" * 30_000  # under warm's cap on error bodies
        return web.Response(status=502, body=error, content_type="application/json")

    async def root(_: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v2/", root)
    app.router.add_get("/v2/{tail:.+}", serve)
    server = await aiohttp_server(app, host="127.0.0.1")

    outcomes = await warm(
        ["registry.team-2/app:v1", "registry.local:5000/team/app:v1"],
        endpoint=f"http://127.0.0.1:{server.port}",
    )

    assert asked == [
        "/v2/registry.team-2/app/manifests/v1",
        "/v2/registry.local_5000/team/app/manifests/v1",
    ]
    first, second = outcomes
    assert first == Failed("registry.team-2/app:v1", f"manifest {Digest.of(deep)}: not valid JSON")
    assert isinstance(second, Failed)
    assert second.error.startswith("HTTP 502: [[[["), second.error
