"""Upstream auth against real distribution: token dance, Basic, passthrough, redirects."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.settings import Settings
from proxy.upstream.auth import parse_challenges
from tests.images import ACCEPT_ALL, PushedImage, push_image, unique_repo
from tests.proxy import Proxy
from tests.registry import Registry
from tests.relay import Relay
from tests.token_issuer import TokenIssuer

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


def config_for(
    mirror: Registry, tmp_path: Path, prefix: str, **registry_conf: Any
) -> dict[str, Any]:
    return {
        "cache": {"dir": str(tmp_path / "cache")},
        "redirects": [{"src": "docker.io/", "to": f"{mirror.host}/{prefix}/"}],
        "registries": {mirror.host: {"insecure": True, **registry_conf}, **mirror.named_hosts},
    }


def hub_image(mirror: Registry, prefix: str, **kwargs: Any) -> tuple[str, PushedImage]:
    name = unique_repo("team")
    return name, push_image(mirror, f"{prefix}/{name}", "v1", **kwargs)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


async def pull(proxy: Proxy, name: str, image: PushedImage, **headers: str) -> None:
    """Fetch the manifest by tag and every blob, checking the bytes."""
    url = f"{proxy.url}/v2/{name}/manifests/v1"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL, **headers}) as response:
        assert response.status == 200, await response.text()
        assert await response.read() == image.manifest

    async def blob(data: bytes, digest: str) -> None:
        url = f"{proxy.url}/v2/{name}/blobs/{digest}"
        async with proxy.session.get(url, headers=headers) as response:
            assert response.status == 200
            assert await response.read() == data

    await asyncio.gather(*(blob(b.data, b.digest) for b in image.blobs))


async def test_token_auth_with_configured_credentials(
    make_proxy: MakeProxy, token_registry: Registry, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    creds = {"username": token_issuer.reader_user, "password": token_issuer.reader_password}
    proxy = await make_proxy(config_for(token_registry, tmp_path, "readable/hub", **creds))
    name, image = hub_image(token_registry, "readable/hub", layers=6, layer_size=4096)
    token_issuer.reset()  # forget the pusher's tokens
    await pull(proxy, name, image)
    # Eight requests met a 401 at once (manifest, config, six layers were pulled in parallel),
    # and the token was fetched once, with the configured user, for the redirected repository.
    served = token_issuer.served()
    assert [(r.user, r.scopes) for r in served] == [
        (token_issuer.reader_user, (f"repository:readable/hub/{name}:pull",))
    ]
    # Cached until it expires: a second pull of another tag needs no new token.
    push_image(token_registry, f"readable/hub/{name}", "v2", layers=1, layer_size=1024)
    token_issuer.reset()
    url = f"{proxy.url}/v2/{name}/manifests/v2"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
    assert token_issuer.served() == []
    assert (
        await proxy.metric(
            "detour_token_requests_total", registry=token_registry.host, outcome="issued"
        )
        == 1
    )


async def test_a_rejected_token_is_refreshed_once_then_the_401_relayed(
    make_proxy: MakeProxy, token_registry: Registry, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    creds = {"username": token_issuer.reader_user, "password": token_issuer.reader_password}
    proxy = await make_proxy(config_for(token_registry, tmp_path, "readable/hub", **creds))
    name, _ = hub_image(token_registry, "readable/hub", layers=1, layer_size=1024)
    token_issuer.reset()
    token_issuer.token_lifetime = -120  # every token it issues is already expired
    url = f"{proxy.url}/v2/{name}/manifests/v1"
    for attempt in (1, 2):
        async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
            assert response.status == 401
            assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
            assert parse_challenges(response.headers["WWW-Authenticate"])[0].scheme == "bearer"
        # Each request: one token fetched, one retry, then the 401 goes to the client.
        assert len(token_issuer.served()) == attempt


async def test_anonymous_token(
    make_proxy: MakeProxy, token_registry: Registry, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    proxy = await make_proxy(config_for(token_registry, tmp_path, "public/hub"))
    name, image = hub_image(token_registry, "public/hub", layers=2, layer_size=1024)
    token_issuer.reset()
    await pull(proxy, name, image)
    assert {r.user for r in token_issuer.served()} == {None}


async def test_passthrough_relays_the_challenge_and_never_caches(
    make_proxy: MakeProxy, token_registry: Registry, token_issuer: TokenIssuer, tmp_path: Path
) -> None:
    """No credentials configured: a client holding its own does the dance through us."""
    proxy = await make_proxy(config_for(token_registry, tmp_path, "readable/private"))
    name, image = hub_image(token_registry, "readable/private", layers=1, layer_size=2048)
    url = f"{proxy.url}/v2/{name}/manifests/v1"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 401
        challenge = parse_challenges(response.headers["WWW-Authenticate"])[0]
    assert challenge.params["realm"] == token_issuer.realm

    # The client does the dance itself, with the realm and scope we relayed.
    auth = basic(token_issuer.reader_user, token_issuer.reader_password)
    params = {"service": challenge.params["service"], "scope": challenge.params["scope"]}
    async with proxy.session.get(challenge.params["realm"], params=params, headers=auth) as answer:
        token = (await answer.json())["token"]
    await pull(proxy, name, image, Authorization=f"Bearer {token}")

    # Nothing private was kept: without credentials it is still 401, and the disk is empty.
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 401
    blob_url = f"{proxy.url}/v2/{name}/blobs/{image.layers[0].digest}"
    async with proxy.session.get(blob_url) as response:
        assert response.status == 401
    assert not [p for p in (proxy.cache_dir / "blobs").rglob("*") if p.is_file()]
    assert not [p for p in (proxy.cache_dir / "manifests").rglob("*") if p.is_file()]
    assert await proxy.metric("detour_cache_requests_total", kind="blob", result="bypass") == 2


async def test_private_content_reaches_no_anonymous_client_by_any_route(
    make_proxy: MakeProxy, htpasswd_registry: Registry, tmp_path: Path
) -> None:
    """A client pulls a private image with its own credentials (passthrough); an anonymous one
    then tries every way in: the tag, the manifest and blobs by digest (GET and HEAD), a blob
    under another repository's name, and joining the private fetch while it runs."""
    mirror = htpasswd_registry
    name, image = hub_image(mirror, "hub", layers=1, layer_size=3 * 1024 * 1024)
    async with Relay(mirror, rate=4 * 1024 * 1024) as slow:  # so a fetch is still running
        config = {
            "cache": {"dir": str(tmp_path / "cache")},
            "redirects": [{"src": "docker.io/", "to": f"{slow.host}/hub/"}],
            "registries": {slow.host: {"insecure": True}},  # no credentials: passthrough
        }
        proxy = await make_proxy(config)
        owner = basic(mirror.username, mirror.password)
        layer = image.layers[0]
        blob_url = f"{proxy.url}/v2/{name}/blobs/{layer.digest}"

        async def anonymous(url: str, method: str = "GET") -> int:
            async with proxy.session.request(method, url) as response:
                body = await response.read()
                assert layer.data not in body
                return response.status

        # The owner's fetch is under way when the anonymous client asks for the same blob.
        async with proxy.session.get(blob_url, headers=owner) as response:
            assert response.status == 200
            first = await response.content.readexactly(64 * 1024)
            assert await anonymous(blob_url) == 401
            assert first + await response.read() == layer.data
        await pull(proxy, name, image, **owner)

        routes = [
            (f"{proxy.url}/v2/{name}/manifests/v1", "GET"),
            (f"{proxy.url}/v2/{name}/manifests/{image.digest}", "GET"),
            (f"{proxy.url}/v2/{name}/manifests/{image.digest}", "HEAD"),
            (blob_url, "GET"),
            (blob_url, "HEAD"),
            (f"{proxy.url}/v2/{name}/blobs/{image.config.digest}", "GET"),
            (f"{proxy.url}/v2/{slow.host.replace(':', '_')}/hub/other/blobs/{layer.digest}", "GET"),
        ]
        for url, method in routes:
            assert await anonymous(url, method) in (401, 403, 404), (url, method)
    assert not [p for p in (proxy.cache_dir / "blobs").rglob("*") if p.is_file()]
    assert not [p for p in (proxy.cache_dir / "manifests").rglob("*") if p.is_file()]


def test_cache_private_is_gone_with_a_reason() -> None:
    with pytest.raises(ValueError, match="give Detour the credentials"):
        Settings.model_validate({"cache": {"cache_private": True}})


async def test_htpasswd_basic_auth(
    make_proxy: MakeProxy, htpasswd_registry: Registry, tmp_path: Path
) -> None:
    name, image = hub_image(htpasswd_registry, "hub", layers=2, layer_size=1024)
    anonymous = await make_proxy(config_for(htpasswd_registry, tmp_path / "a", "hub"))
    url = f"{anonymous.url}/v2/{name}/manifests/v1"
    async with anonymous.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 401
        assert parse_challenges(response.headers["WWW-Authenticate"])[0].scheme == "basic"
    creds = {"username": htpasswd_registry.username, "password": htpasswd_registry.password}
    proxy = await make_proxy(config_for(htpasswd_registry, tmp_path / "b", "hub", **creds))
    await pull(proxy, name, image)


async def test_credentials_from_a_pull_secret(
    make_proxy: MakeProxy, htpasswd_registry: Registry, tmp_path: Path
) -> None:
    user_pass = f"{htpasswd_registry.username}:{htpasswd_registry.password}".encode()
    secret = tmp_path / "config.json"
    secret.write_text(
        json.dumps(
            {"auths": {htpasswd_registry.host: {"auth": base64.b64encode(user_pass).decode()}}}
        )
    )
    config = config_for(htpasswd_registry, tmp_path, "hub")
    config["docker_config"] = str(secret)
    proxy = await make_proxy(config)
    name, image = hub_image(htpasswd_registry, "hub", layers=1, layer_size=1024)
    await pull(proxy, name, image)


@pytest.fixture
async def redirecting_registry(
    aiohttp_server: Any, htpasswd_registry: Registry
) -> tuple[str, str, list[dict[str, str]]]:
    """A registry front that, like one backed by object storage, answers blob GETs with a 307
    to a storage host on another origin. The storage host records the headers it received."""
    seen: list[dict[str, str]] = []

    async def storage(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        path = request.match_info["path"]
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{htpasswd_registry.url}/{path}",
                headers=basic(htpasswd_registry.username, htpasswd_registry.password),
            ) as upstream,
        ):
            return web.Response(body=await upstream.read(), status=upstream.status)

    storage_server = await aiohttp_server(_app("/{path:.+}", storage), host="127.0.0.1")
    storage_host = f"127.0.0.1:{storage_server.port}"

    async def front(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") is None:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="front"'})
        path = request.match_info["path"]
        if "/blobs/" in path and request.method == "GET":
            raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{storage_server.port}/{path}")
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                f"{htpasswd_registry.url}/{path}",
                headers={
                    "Accept": request.headers.get("Accept", "*/*"),
                    **basic(htpasswd_registry.username, htpasswd_registry.password),
                },
            ) as upstream,
        ):
            headers = {k: v for k, v in upstream.headers.items() if k.startswith("Docker-")}
            headers["Content-Type"] = upstream.headers.get("Content-Type", "")
            return web.Response(body=await upstream.read(), status=upstream.status, headers=headers)

    front_server = await aiohttp_server(_app("/{path:.+}", front), host="127.0.0.1")
    return f"127.0.0.1:{front_server.port}", storage_host, seen


def _app(
    path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.Application:
    app = web.Application()
    app.router.add_route("*", path, handler)
    return app


async def test_blob_redirects_never_carry_the_registrys_authorization(
    make_proxy: MakeProxy,
    htpasswd_registry: Registry,
    redirecting_registry: tuple[str, str, list[dict[str, str]]],
    tmp_path: Path,
) -> None:
    front, storage_host, storage_seen = redirecting_registry
    name, image = hub_image(htpasswd_registry, "hub", layers=2, layer_size=50_000)
    config = {
        "cache": {"dir": str(tmp_path / "cache")},
        "redirects": [{"src": "docker.io/", "to": f"{front}/hub/"}],
        "registries": {
            front: {"insecure": True, "username": "u", "password": "secret-pw"},
            storage_host: {},  # the storage it redirects to is on loopback: named to be reached
        },
    }
    proxy = await make_proxy(config)
    await pull(proxy, name, image)
    assert len(storage_seen) == len(image.blobs)  # every blob went through object storage
    assert not [h for h in storage_seen if "Authorization" in h]
