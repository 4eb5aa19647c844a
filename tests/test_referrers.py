"""OCI 1.1 referrers (signatures, SBOMs): passed through the rules, auth and mirror order.

distribution 2.8 (the registry these tests run) has no referrers API; newer registries
(distribution 3, Harbor, ACR) do, so one is played by a small aiohttp app of the test's own.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from tests.images import ACCEPT_ALL, push_image, put_manifest, unique_repo
from tests.proxy import Proxy, scenario
from tests.registry import Registry

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
SUBJECT = "sha256:" + "ab" * 32


def referrers_index() -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + "01" * 32,
                "size": 500,
                "artifactType": SIGNATURE,
            },
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + "02" * 32,
                "size": 700,
                "artifactType": SBOM,
            },
        ],
    }


class ReferrersRegistry:
    """A registry with the referrers API behind Basic auth; ``filters`` says whether it
    applies ``artifactType`` itself (the spec lets a registry leave that to the client)."""

    def __init__(self, *, filters: bool, status: int = 200) -> None:
        self.filters = filters
        self.status = status
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/{name:.+}/referrers/{digest}", self.referrers)
        return app

    async def referrers(self, request: web.Request) -> web.Response:
        self.seen.append((request.path_qs, request.headers.get("Authorization")))
        if request.headers.get("Authorization") != "Basic " + base64.b64encode(
            b"reader:secret"
        ).decode("ascii"):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if self.status != 200:
            return web.Response(status=self.status)
        index = referrers_index()
        headers = {"Content-Type": OCI_INDEX}
        wanted = request.query.get("artifactType")
        if wanted is not None and self.filters:
            index["manifests"] = [m for m in index["manifests"] if m["artifactType"] == wanted]
            headers["OCI-Filters-Applied"] = "artifactType"
        return web.Response(body=json.dumps(index, indent=3).encode(), headers=headers)


async def start(aiohttp_server: Any, registry: ReferrersRegistry) -> str:
    server = await aiohttp_server(registry.app(), host="127.0.0.1")
    return f"127.0.0.1:{server.port}"


def config(tmp_path: Path, *mirrors: str) -> dict[str, Any]:
    return {
        "cache": {"dir": str(tmp_path / "cache")},
        "redirects": [{"src": "docker.io/", "to": [f"{m}/hub/" for m in mirrors]}],
        "registries": {
            m: {"insecure": True, "username": "reader", "password": "secret"} for m in mirrors
        },
    }


async def test_referrers_come_from_the_mirror_with_auth_byte_for_byte(
    aiohttp_server: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream = ReferrersRegistry(filters=True)
    host = await start(aiohttp_server, upstream)
    proxy = await make_proxy(config(tmp_path, host))
    url = f"{proxy.url}/v2/docker.io/library/nats/referrers/{SUBJECT}"
    async with proxy.session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == OCI_INDEX
        body = await response.read()
    assert json.loads(body) == referrers_index()
    # The rule's mirror was asked, for the rule's repository, with the configured credentials.
    path, auth = upstream.seen[-1]
    assert path == f"/v2/hub/library/nats/referrers/{SUBJECT}"
    assert auth is not None

    async with proxy.session.get(url, params={"artifactType": SBOM}) as response:
        assert response.status == 200
        assert response.headers["OCI-Filters-Applied"] == "artifactType"
        index = await response.json(content_type=None)
    assert [m["artifactType"] for m in index["manifests"]] == [SBOM]
    assert parse_qs(urlsplit(upstream.seen[-1][0]).query) == {"artifactType": [SBOM]}


async def test_an_upstream_that_ignores_the_filter_is_filtered_here(
    aiohttp_server: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    host = await start(aiohttp_server, ReferrersRegistry(filters=False))
    proxy = await make_proxy(config(tmp_path, host))
    url = f"{proxy.url}/v2/nats/referrers/{SUBJECT}"
    async with proxy.session.get(url, params={"artifactType": SIGNATURE}) as response:
        assert response.status == 200
        assert response.headers["OCI-Filters-Applied"] == "artifactType"
        index = await response.json(content_type=None)
    assert [m["artifactType"] for m in index["manifests"]] == [SIGNATURE]


async def test_referrers_follow_the_mirror_order(
    aiohttp_server: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    broken = ReferrersRegistry(filters=True, status=503)
    working = ReferrersRegistry(filters=True)
    first, second = await start(aiohttp_server, broken), await start(aiohttp_server, working)
    proxy = await make_proxy(config(tmp_path, first, second))
    async with proxy.session.get(f"{proxy.url}/v2/nats/referrers/{SUBJECT}") as response:
        assert response.status == 200
    assert broken.seen
    assert working.seen


async def test_without_the_api_upstream_the_client_falls_back_to_the_tag_schema(
    registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """distribution 2.8 has no referrers API: the 404 reaches the client, which then asks for
    the ``sha256-<hex>`` tag (as cosign, notation and oras do); that comes through."""
    name = unique_repo("signed").split("/")[1]
    repo = f"docker-mirror/library/{name}"
    image = push_image(registry, repo, "v1", layers=1, layer_size=256)
    signature = {**image.descriptor(), "artifactType": SIGNATURE}
    fallback = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [signature]}
    ).encode()
    fallback_tag = image.digest.replace(":", "-")
    put_manifest(registry, repo, fallback_tag, fallback, OCI_INDEX)
    proxy = await make_proxy(scenario(registry, tmp_path / "cache"))

    async with proxy.session.get(f"{proxy.url}/v2/{name}/referrers/{image.digest}") as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"]
    url = f"{proxy.url}/v2/{name}/manifests/{fallback_tag}"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
        assert await response.read() == fallback
        assert response.headers["Docker-Content-Digest"] == (
            "sha256:" + hashlib.sha256(fallback).hexdigest()
        )


async def test_bad_referrers_requests_are_400(
    aiohttp_server: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream = ReferrersRegistry(filters=True)
    host = await start(aiohttp_server, upstream)
    proxy = await make_proxy(config(tmp_path, host))
    for path, query, code in (
        ("referrers/latest", {}, "DIGEST_INVALID"),
        (f"referrers/{SUBJECT}", {"artifactType": "not a media type"}, "UNSUPPORTED"),
    ):
        async with proxy.session.get(f"{proxy.url}/v2/nats/{path}", params=query) as response:
            assert response.status == 400
            assert (await response.json())["errors"][0]["code"] == code
    assert upstream.seen == []
