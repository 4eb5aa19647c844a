"""No pod can turn Detour against the cluster: where Detour connects is the operator's choice.

The hostile registry is a small aiohttp app over https, with a certificate from a CA the test
trusts (``ca_file``), admitted the way a public registry would be. The "internal" service on
127.0.0.5 stands in for a cloud's metadata service, the kubelet or a ClusterIP: every request it
gets is recorded, and its answer carries a secret that must never reach a client or the cache.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.errors import RegistryDenied
from proxy.upstream.egress import EgressPolicy
from tests.images import push_image, unique_repo
from tests.proxy import Proxy, scenario
from tests.registry import Registry, make_certificates

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
SECRET = b"INTERNAL-METADATA-SECRET"
DIGEST = "sha256:" + "ab" * 32


# ------------------------------------------------------------------------- the policy itself


@pytest.mark.parametrize(
    ("host", "port", "address", "admitted"),
    [
        ("registry.example", 443, "93.184.216.34", True),  # public
        ("registry.example", 443, "2606:2800:220:1::1", True),
        ("metadata.example", 80, "169.254.169.254", False),  # link-local: cloud metadata
        ("kubelet.example", 10255, "10.0.0.7", False),  # private
        ("svc.example", 443, "172.20.0.10", False),
        ("home.example", 443, "192.168.1.1", False),
        ("cgnat.example", 443, "100.64.0.1", False),  # shared address space
        ("loop.example", 5000, "127.0.0.1", False),
        ("loop6.example", 5000, "::1", False),
        ("mapped.example", 443, "::ffff:127.0.0.1", False),
        ("ula.example", 443, "fd00::1", False),
        ("zero.example", 443, "0.0.0.0", False),
        ("mirror.internal", 443, "10.1.2.3", True),  # named, no port: 443 and 80
        ("mirror.internal", 80, "10.1.2.3", True),
        ("mirror.internal", 22, "10.1.2.3", False),  # ...but not any port on it
        ("harbor.internal", 5000, "10.1.2.4", True),  # named with its port
        ("harbor.internal", 5001, "10.1.2.4", False),
        ("registry-1.docker.io", 443, "10.9.9.9", True),  # docker.io named: its API host too
        ("self.internal", 7439, "127.0.0.1", False),  # Detour itself, even when named
    ],
)
def test_which_addresses_detour_connects_to(
    host: str, port: int, address: str, admitted: bool
) -> None:
    policy = EgressPolicy(
        ["mirror.internal", "harbor.internal:5000", "docker.io", "self.internal:7439"],
        listen=("0.0.0.0", 7439),
    )
    assert policy.admits(host, port, address) is admitted


def test_allowed_registries_refuse_the_rest_and_say_which_setting_admits() -> None:
    policy = EgressPolicy(["harbor.internal:5000"], ["*.example.com", "ghcr.io"])
    for admitted in ("a.example.com", "ghcr.io", "harbor.internal:5000"):
        policy.check_registry(admitted)
    for refused in ("quay.io", "example.com", "ghcr.io.evil.net"):
        with pytest.raises(RegistryDenied) as caught:
            policy.check_registry(refused)
        assert caught.value.status == 403
        assert "allowed_registries" in caught.value.message
    EgressPolicy([]).check_registry("anything.example")  # no list: every public name


# ------------------------------------------------------------------ a hostile registry, end to end


@dataclass
class Internal:
    host: str
    seen: list[str] = field(default_factory=list)


@pytest.fixture
async def internal(aiohttp_server: Any) -> Internal:
    """The metadata service: plain http on another loopback address."""
    service = Internal("")

    async def anything(request: web.Request) -> web.Response:
        service.seen.append(request.path_qs)
        return web.Response(body=SECRET * 100, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = await aiohttp_server(app, host="127.0.0.5")
    service.host = f"127.0.0.5:{server.port}"
    return service


@dataclass
class Hostile:
    host: str
    ca_file: Path
    location: str = ""  # where every request is sent


@pytest.fixture
async def hostile(aiohttp_server: Any, tmp_path: Path) -> Hostile:
    certs = make_certificates(("127.0.0.1",))
    (tmp_path / "hostile.crt").write_bytes(certs.cert_pem)
    (tmp_path / "hostile.key").write_bytes(certs.key_pem)
    (tmp_path / "hostile-ca.pem").write_bytes(certs.ca_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "hostile.crt", tmp_path / "hostile.key")
    registry = Hostile("", tmp_path / "hostile-ca.pem")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(registry.location + request.path)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    server = await aiohttp_server(app, host="127.0.0.1", ssl=context)
    registry.host = f"127.0.0.1:{server.port}"
    return registry


@pytest.fixture
async def plain_hostile(aiohttp_server: Any, tmp_path: Path) -> Hostile:
    """The same over plain http, so a redirect to an http address isn't a downgrade."""
    registry = Hostile("", tmp_path / "unused")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(registry.location + request.path)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    server = await aiohttp_server(app, host="127.0.0.1")
    registry.host = f"127.0.0.1:{server.port}"
    return registry


def hostile_config(tmp_path: Path, hostile: Hostile, **extra: Any) -> dict[str, Any]:
    """The hostile registry admitted as a public one would be (on loopback here, so named;
    its redirects are still checked host by host)."""
    config: dict[str, Any] = {
        "cache": {"dir": str(tmp_path / "cache")},
        "registries": {hostile.host: {"ca_file": str(hostile.ca_file)}},
    }
    config.update(extra)
    return config


def cached_files(cache: Path) -> list[Path]:
    return [
        p
        for kind in ("manifests", "tags", "blobs")
        for p in (cache / kind).rglob("*")
        if p.is_file()
    ]


async def fetch(proxy: Proxy, path: str) -> tuple[int, bytes]:
    async with proxy.session.get(f"{proxy.url}{path}") as response:
        return response.status, await response.read()


@pytest.mark.parametrize("kind", ["manifests/latest", f"blobs/{DIGEST}"])
async def test_a_redirect_to_an_internal_address_is_refused(
    make_proxy: MakeProxy, plain_hostile: Hostile, internal: Internal, tmp_path: Path, kind: str
) -> None:
    plain_hostile.location = f"http://{internal.host}"
    config = {
        "cache": {"dir": str(tmp_path / "cache")},
        "registries": {plain_hostile.host: {"insecure": True}},
    }
    proxy = await make_proxy(config)
    name = plain_hostile.host.replace(":", "_")
    status, body = await fetch(proxy, f"/v2/{name}/x/{kind}")
    assert status == 502
    assert SECRET not in body
    assert internal.seen == []  # not one byte asked of it
    assert cached_files(tmp_path / "cache") == []


async def test_a_redirect_from_https_to_http_is_refused_even_to_a_named_host(
    make_proxy: MakeProxy, hostile: Hostile, internal: Internal, tmp_path: Path
) -> None:
    hostile.location = f"http://{internal.host}"
    config = hostile_config(tmp_path, hostile)
    config["registries"][internal.host] = {"insecure": True}
    proxy = await make_proxy(config)
    status, body = await fetch(proxy, f"/v2/{hostile.host.replace(':', '_')}/x/manifests/v1")
    assert status == 502
    assert b"never from https to http" in body
    assert SECRET not in body
    assert internal.seen == []


async def test_a_name_on_a_loopback_or_private_address_is_refused_unless_named(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    """Path mode lets a client name any registry; one on an internal address is the
    operator's to allow. By IP address and by a name that resolves to one (localhost)."""
    repo = unique_repo("internal")
    image = push_image(registry, repo, "v1", layers=1, layer_size=256)
    port = registry.host.split(":")[1]
    mark = registry.mark()
    proxy = await make_proxy({"cache": {"dir": str(tmp_path / "a")}})
    for host in (f"127.0.0.1_{port}", f"localhost_{port}"):
        async with proxy.session.get(f"{proxy.url}/v2/{host}/{repo}/manifests/v1") as response:
            assert response.status == 403, host
            error = (await response.json())["errors"][0]
        assert error["code"] == "DENIED"
        assert "redirects or registries" in error["message"]
    assert not [entry for entry in registry.entries_since(mark) if repo in entry.path]

    # The usual air-gapped case: the operator names the private mirror, and it works.
    proxy = await make_proxy(scenario(registry, tmp_path / "b"))
    url = f"{proxy.url}/v2/{registry.host.replace(':', '_')}/{repo}/manifests/{image.digest}"
    async with proxy.session.get(url) as response:
        assert response.status == 200
        assert await response.read() == image.manifest


async def test_allowed_registries_refuse_every_other_name(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    name = unique_repo("hub").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=256)
    config = scenario(registry, tmp_path / "cache", allowed_registries=["*.corp.example"])
    proxy = await make_proxy(config)
    async with proxy.session.get(f"{proxy.url}/v2/quay.io/x/y/manifests/v1") as response:
        assert response.status == 403
        assert "allowed_registries" in (await response.json())["errors"][0]["message"]
    # docker.io is named by a redirect rule: still served through its mirror.
    async with proxy.session.get(f"{proxy.url}/v2/{name}/manifests/{image.digest}") as response:
        assert response.status == 200


async def test_detour_never_fetches_from_itself(
    detour_process: StartProxy,
    aiohttp_server: Any,
    free_port: Callable[[], int],
    tmp_path: Path,
) -> None:
    """A redirect to Detour's own port is refused even when the operator named that address."""
    port = free_port()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{port}{request.path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    front = f"127.0.0.1:{(await aiohttp_server(app, host='127.0.0.1')).port}"
    config = {
        "listen": f"127.0.0.1:{port}",
        "cache": {"dir": str(tmp_path / "cache")},
        "registries": {front: {"insecure": True}, f"127.0.0.1:{port}": {"insecure": True}},
    }
    proxy = await detour_process(config)
    status, body = await fetch(proxy, f"/v2/{front.replace(':', '_')}/x/manifests/v1")
    assert status == 502
    assert b"Detour itself" in body
    # The access log line follows the response: wait for it, then a little more for any other.
    for _ in range(100):
        if any('"request"' in line for line in proxy.log_lines()):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    requests = [line for line in proxy.log_lines() if '"request"' in line]
    assert len(requests) == 1  # the redirect never came back in


async def test_a_loop_between_detours_ends_at_once(
    make_proxy: MakeProxy, free_port: Callable[[], int], tmp_path: Path, aiohttp_server: Any
) -> None:
    """Two proxies, each the other's mirror (a misconfiguration): the request carries each
    one's Via, and the first to see itself again refuses, instead of looping."""
    from proxy.api.app import create_app
    from proxy.settings import Settings

    ports = [free_port(), free_port()]
    hosts = [f"127.0.0.1:{p}" for p in ports]
    servers = []
    for index, port in enumerate(ports):
        other = hosts[1 - index]
        settings = Settings.model_validate(
            {
                "cache": {"dir": str(tmp_path / f"cache-{index}")},
                "redirects": [{"src": "docker.io/", "to": f"{other}/hub/"}],
                "registries": {other: {"insecure": True}},
            }
        )
        servers.append(await aiohttp_server(create_app(settings), host="127.0.0.1", port=port))
    proxy = await make_proxy({"cache": {"dir": str(tmp_path / "client")}})
    async with (
        asyncio.timeout(10),
        proxy.session.get(f"http://{hosts[0]}/v2/nats/manifests/latest") as response,
    ):
        assert response.status == 403  # the first proxy saw itself in the Via, the second said so
    assert len(servers) == 2


async def test_names_a_client_invents_share_one_metric_series(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await make_proxy(scenario(registry, tmp_path / "cache"))
    for invented in ("a1.invalid", "b2.invalid", "c3.invalid"):
        async with proxy.session.get(f"{proxy.url}/v2/{invented}/x/manifests/v1") as response:
            assert response.status == 502
    async with proxy.session.get(f"{proxy.url}/metrics") as response:
        text = await response.text()
    assert 'detour_upstream_requests_total{registry="other",status="error"} 3.0' in text
    assert ".invalid" not in text
