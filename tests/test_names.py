"""Names that round-trip: what the webhook writes is what the proxy fetches.

A registry host ending in ``-<digits>`` (``registry.team-2``) is that host, not
``registry.team`` on port 2; a registry on a port is spelled ``_<port>`` in path mode and still
pulls, as do the ``-<port>`` paths older pods carry for ``localhost`` and IPv4 addresses. The
pod goes through the real webhook application, its rewritten images are pulled by skopeo
through a real Detour, and the real registry's access log shows where each pull went.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.settings import Settings
from proxy.tools.cli import main
from proxy.webhook import create_webhook_app
from tests.images import ACCEPT_ALL, push_image, unique_repo
from tests.proxy import Proxy
from tests.registry import Registry

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


async def skopeo_copy(image: str, dest: Path) -> str:
    """Pull ``image`` in full into an OCI layout; the manifest digest it got."""
    process = await asyncio.create_subprocess_exec(
        "skopeo",
        "copy",
        "--src-tls-verify=false",
        f"docker://{image}",
        f"oci:{dest}:x",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"skopeo copy {image}: {err.decode()}"
    return str(json.loads((dest / "index.json").read_text())["manifests"][0]["digest"])


async def webhook_rewrites(aiohttp_server: Any, prefix: str, images: list[str]) -> list[str]:
    """A pod with one container per image, through the webhook's ``/mutate``: the images its
    JSONPatch writes, in container order."""
    settings = Settings.model_validate({"webhook": {"prefix": prefix}})
    server = await aiohttp_server(create_webhook_app(settings), host="127.0.0.1")
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "names",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default",
            "operation": "CREATE",
            "object": {"metadata": {"name": "app"}, "spec": {"containers": containers}},
        },
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{server.port}/mutate", json=review) as response,
    ):
        assert response.status == 200
        answer = await response.json()
    rewritten = list(images)
    for op in json.loads(base64.b64decode(answer["response"]["patch"])):
        if op["op"] == "replace":
            index = op["path"].removeprefix("/spec/containers/").removesuffix("/image")
            rewritten[int(index)] = op["value"]
    return rewritten


async def test_webhook_output_pulls_from_the_registry_it_names(
    make_proxy: MakeProxy, registry: Registry, aiohttp_server: Any, tmp_path: Path
) -> None:
    team = unique_repo("team-two").split("/", 1)[1]
    local = unique_repo("local-5000").split("/", 1)[1]
    direct = unique_repo("on-port")
    images = {
        "team-two": push_image(registry, f"team-two/{team}", "v1", layers=1, layer_size=1024),
        "local-5000": push_image(registry, f"local-5000/{local}", "v1", layers=1, layer_size=1024),
        "on-port": push_image(registry, direct, "v1", layers=1, layer_size=1024),
    }
    proxy = await make_proxy(
        {
            "cache": {"dir": str(tmp_path / "cache")},
            "redirects": [
                # registry.team-2 can't be resolved here, so a rule names where it is served;
                # the decoy catches the old misreading, registry.team on port 2.
                {"src": "registry.team-2/", "to": f"{registry.host}/team-two/"},
                {"src": "registry.team:2/", "to": f"{registry.host}/misread/"},
                {"src": "registry.local:5000/", "to": f"{registry.host}/local-5000/"},
            ],
            "registries": {registry.host: {"insecure": True}},
        }
    )
    port = registry.port

    rewritten = await webhook_rewrites(
        aiohttp_server,
        proxy.host,
        [
            f"registry.team-2/{team}:v1",
            f"registry.local:5000/{local}:v1",
            f"{registry.host}/{direct}:v1",
        ],
    )

    assert rewritten == [
        f"{proxy.host}/registry.team-2/{team}:v1",
        f"{proxy.host}/registry.local_5000/{local}:v1",
        f"{proxy.host}/127.0.0.1_{port}/{direct}:v1",
    ]
    for image, (served_from, pushed) in zip(rewritten, images.items(), strict=True):
        mark = registry.mark()
        assert await skopeo_copy(image, tmp_path / served_from) == pushed.digest
        paths = await registry.wait_paths(mark, at_least=1 + len(pushed.blobs))
        assert all(p.startswith(f"/v2/{pushed.repo}/") for p in paths), (image, paths)
    assert not [p for p in registry.access_paths() if "/misread/" in p]

    # A pod rewritten before the _<port> spelling still pulls: -<port> after an IPv4 address.
    legacy = f"{proxy.url}/v2/127.0.0.1-{port}/{direct}/manifests/v1"
    async with proxy.session.get(legacy, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
        assert await response.read() == images["on-port"].manifest


def test_resolve_reads_and_writes_path_mode(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``detour resolve`` takes an image as a pod spec has it before or after the webhook,
    and shows the path-mode spelling the webhook writes."""
    for key in [k for k in os.environ if k.startswith("DETOUR_")]:
        monkeypatch.delenv(key)  # the default settings: prefix localhost:7439, no rules
    for image in (
        "registry.local:5000/team/app:v1",
        "localhost:7439/registry.local_5000/team/app:v1",
    ):
        assert main(["resolve", image]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[:2] == [
            "image:  registry.local:5000/team/app:v1",
            "name:   registry.local:5000/team/app",
        ]
        assert "  1. https://registry.local:5000/v2/team/app/manifests/v1  (origin)" in lines
        assert lines[-1] == "path:   localhost:7439/registry.local_5000/team/app:v1"

    assert main(["resolve", "localhost:7439/registry.team-2/app:v1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "image:  registry.team-2/app:v1"
    assert lines[-1] == "path:   localhost:7439/registry.team-2/app:v1"

    assert main(["resolve", "localhost:7439/registry.local_70000/app:v1"]) == 2
    assert "port outside 1-65535" in capsys.readouterr().err
