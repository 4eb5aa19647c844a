"""Hostile and broken requests get a clean 4xx OCI error, or a prompt 502/504 for a broken
upstream; never a 500, nothing outside the cache is touched, and the proxy keeps serving."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.images import ACCEPT_ALL, push_image, unique_repo
from tests.proxy import Proxy, scenario
from tests.registry import Registry

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HEX = "ab" * 32


@pytest.fixture
async def proxy(make_proxy: MakeProxy, registry: Registry, tmp_path: Path) -> Proxy:
    return await make_proxy(scenario(registry, tmp_path / "cache"))


async def still_serves(proxy: Proxy, registry: Registry) -> None:
    name = unique_repo("x").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "ok", layers=1, layer_size=512)
    url = f"{proxy.url}/v2/{name}/manifests/ok"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
        assert await response.read() == image.manifest


async def raw_request(
    proxy: Proxy, method: str, path: str, extra_headers: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """Send the request exactly as written: HTTP clients would normalize the path."""
    host, port = proxy.host.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    extra = f"{extra_headers}\r\n" if extra_headers else ""
    request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n"
    writer.write(request.encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        # traversal in names, tags and digests (raw, so the client sends them as written)
        ("GET", "/v2/docker.io/../../etc/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/docker.io/%2e%2e/%2e%2e/etc/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/docker.io/..%2F..%2Fetc/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/nats/manifests/..", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/nats/manifests/%2e%2e%2f%2e%2e%2fpasswd", 404, "UNSUPPORTED"),
        ("GET", "/v2/nats/blobs/sha256:..%2F..%2F..%2Fetc%2Fpasswd", 404, "UNSUPPORTED"),
        ("GET", "/v2/nats/blobs/sha256:..", 400, "DIGEST_INVALID"),
        ("GET", "/v2/nats/manifests/sha256:../../../etc/passwd", 404, "UNSUPPORTED"),
        ("GET", "/v2/library/nats/manifests/latest?ns=..%2F..", 400, "NAME_INVALID"),
        # invalid digests and references
        ("GET", "/v2/nats/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("GET", f"/v2/nats/blobs/md5:{HEX}", 400, "DIGEST_INVALID"),
        ("GET", f"/v2/nats/blobs/sha256:{HEX.upper()}", 400, "DIGEST_INVALID"),
        ("HEAD", "/v2/nats/blobs/latest", 400, "DIGEST_INVALID"),
        ("GET", f"/v2/nats/manifests/sha256:{HEX}0", 400, "DIGEST_INVALID"),
        ("GET", "/v2/Nats/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/nats/manifests/-bad", 404, "MANIFEST_UNKNOWN"),
        # over-long names and tags
        ("GET", f"/v2/{'a' * 300}/manifests/latest", 400, "NAME_INVALID"),
        ("GET", f"/v2/{'/'.join(['abcdefgh'] * 40)}/manifests/latest", 400, "NAME_INVALID"),
        ("GET", f"/v2/nats/manifests/{'t' * 129}", 404, "MANIFEST_UNKNOWN"),
        # ports outside 1-65535, in a path (every spelling) or in ?ns=
        ("GET", "/v2/registry.local_70000/a/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/registry.local:70000/a/manifests/v1", 400, "NAME_INVALID"),
        ("GET", f"/v2/127.0.0.1-99999/a/blobs/sha256:{HEX}", 400, "NAME_INVALID"),
        ("GET", "/v2/[::1]:70000/a/tags/list", 400, "NAME_INVALID"),
        ("GET", "/v2/a/b/manifests/v1?ns=registry.local:70000", 400, "NAME_INVALID"),
        ("GET", "/v2/a/b/manifests/v1?ns=registry.local:0", 400, "NAME_INVALID"),
        # tags/list?n= that is not a whole number, as distribution answers it
        ("GET", "/v2/nats/tags/list?n=abc", 400, "PAGINATION_NUMBER_INVALID"),
        ("GET", "/v2/nats/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
        ("GET", "/v2/nats/tags/list?n=%C2%B2", 400, "PAGINATION_NUMBER_INVALID"),  # "²"
        # push and delete methods
        ("POST", "/v2/nats/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/nats/blobs/uploads/1234", 405, "UNSUPPORTED"),
        ("PUT", "/v2/nats/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", f"/v2/nats/blobs/sha256:{HEX}", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/nats/manifests/latest", 405, "UNSUPPORTED"),
        ("PUT", "/v2/", 405, "UNSUPPORTED"),
        # nothing else lives here
        ("GET", "/v2/_catalog", 404, "UNSUPPORTED"),
        ("GET", "/v2/nats/referrers/x", 400, "DIGEST_INVALID"),
        ("GET", f"/v2/nats/referrer/sha256:{HEX}", 404, "UNSUPPORTED"),
        ("GET", "/etc/passwd", 404, "UNSUPPORTED"),
    ],
)
async def test_bad_requests_get_oci_errors(
    proxy: Proxy, registry: Registry, method: str, path: str, status: int, code: str
) -> None:
    got, headers, body = await raw_request(proxy, method, path)
    assert got == status
    assert headers["docker-distribution-api-version"] == "registry/2.0"
    if method != "HEAD":
        assert headers["content-type"].startswith("application/json")
        error = json.loads(body)["errors"][0]
        assert error["code"] == code
        assert isinstance(error["message"], str)
    # Nothing was written outside the cache, and nothing but the layout inside it.
    assert not [p for p in proxy.cache_dir.rglob("*") if p.is_file()]
    await still_serves(proxy, registry)


async def test_huge_headers_get_an_oci_error_from_detour_serve(
    detour_process: Callable[[dict[str, Any]], Awaitable[Proxy]],
    registry: Registry,
    tmp_path: Path,
) -> None:
    """aiohttp's HTTP parser refuses these before any handler runs; `detour serve` still
    answers with an OCI error body, and keeps serving."""
    proxy = await detour_process(scenario(registry, tmp_path / "cache"))
    big = "X-Big: " + "a" * 100_000
    many = "\r\n".join(f"X-{i}: v" for i in range(200))
    secret = "Authorization: Bearer SECRET-TOKEN-" + "x" * 9000
    for extra in (big, many, secret):
        status, headers, body = await raw_request(proxy, "GET", "/v2/", extra)
        assert status == 400
        assert headers["content-type"].startswith("application/json")
        assert headers["docker-distribution-api-version"] == "registry/2.0"
        assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
        assert b"SECRET-TOKEN" not in body
    assert not [line for line in proxy.log_lines() if "SECRET-TOKEN" in line]
    await still_serves(proxy, registry)


async def test_unreachable_upstream_is_a_prompt_502(
    make_proxy: MakeProxy,
    registry: Registry,
    make_registry: Callable[..., Registry],
    tmp_path: Path,
) -> None:
    dead = make_registry()
    dead.stop()
    config = scenario(registry, tmp_path / "cache", upstream={"connect_timeout": "2s"})
    config["redirects"].append({"src": "quay.io/", "to": f"{dead.host}/quay/"})
    config["registries"][dead.host] = {"insecure": True}
    proxy = await make_proxy(config)
    started = time.monotonic()
    async with proxy.session.get(f"{proxy.url}/v2/quay.io/a/b/manifests/v1") as response:
        assert response.status == 502
        body = await response.json()
    assert time.monotonic() - started < 5
    assert body["errors"][0]["detail"]["attempts"] == [
        {"upstream": dead.host, "cause": "refused", "error": "connection refused"}
    ]
    await still_serves(proxy, registry)


async def test_hung_upstream_is_a_prompt_504(
    make_proxy: MakeProxy,
    registry: Registry,
    make_registry: Callable[..., Registry],
    tmp_path: Path,
) -> None:
    hung = make_registry()
    hung.freeze()  # accepts connections (the kernel does), never answers
    # A blob's fetch tries again (upstream.retry_for), its client told within client_wait.
    upstream = {"read_timeout": "1s", "client_wait": "2s"}
    config = scenario(registry, tmp_path / "cache", upstream=upstream)
    config["redirects"].append({"src": "quay.io/", "to": f"{hung.host}/quay/"})
    config["registries"][hung.host] = {"insecure": True}
    proxy = await make_proxy(config)
    started = time.monotonic()
    statuses = await asyncio.gather(
        *(
            _status(proxy, f"/v2/quay.io/a/b/{kind}")
            for kind in ("manifests/v1", f"blobs/sha256:{HEX}", "tags/list")
        )
    )
    assert statuses == [504, 504, 504]
    assert time.monotonic() - started < 5
    hung.thaw()
    await still_serves(proxy, registry)


async def _status(proxy: Proxy, path: str) -> int:
    async with proxy.session.get(f"{proxy.url}{path}") as response:
        body = await response.json()
        assert body["errors"][0]["code"] == "UNAVAILABLE"
        return response.status


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture
async def deep_upstream(aiohttp_server: Any) -> str:
    """A registry whose every JSON body is nested far deeper than a JSON parser recurses:
    ``deep/...`` answers anonymously; ``auth/...`` asks for a token whose response is deep."""

    async def root(_: web.Request) -> web.Response:
        return web.json_response({})

    async def deep(_: web.Request) -> web.Response:
        return web.Response(body=DEEP, content_type="application/json")

    async def needs_token(request: web.Request) -> web.Response:
        realm = f"http://{request.host}/token"
        challenge = f'Bearer realm="{realm}",service="deep",scope="repository:auth/x:pull"'
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "token"}]},
            status=401,
            headers={"WWW-Authenticate": challenge},
        )

    app = web.Application()
    app.router.add_get("/v2/", root)
    app.router.add_route("*", "/v2/deep/{tail:.*}", deep)
    app.router.add_route("*", "/v2/auth/{tail:.*}", needs_token)
    app.router.add_get("/token", deep)
    server = await aiohttp_server(app, host="127.0.0.1")
    return f"127.0.0.1:{server.port}"


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/v2/quay.io/deep/x/tags/list", id="tag list"),
        pytest.param("/v2/quay.io/deep/x/manifests/v1", id="manifest"),
        pytest.param("/v2/quay.io/auth/x/manifests/v1", id="token response"),
    ],
)
async def test_json_nested_too_deeply_upstream_is_a_502(
    make_proxy: MakeProxy, registry: Registry, deep_upstream: str, tmp_path: Path, path: str
) -> None:
    config = scenario(registry, tmp_path / "cache")
    config["redirects"].append({"src": "quay.io/", "to": f"{deep_upstream}/"})
    config["registries"][deep_upstream] = {"insecure": True}
    proxy = await make_proxy(config)
    async with proxy.session.get(f"{proxy.url}{path}", headers={"Accept": ACCEPT_ALL}) as answer:
        assert answer.status == 502
        body = await answer.json()
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert not [p for p in proxy.cache_dir.rglob("*") if p.is_file()]
    await still_serves(proxy, registry)
