"""Failures say what failed: a mirror that can't be reached is a 502/504 whose detail names the
cause for each upstream tried (dns, refused, tls, timeout, http), with one warning line per
failed attempt; per-registry TLS (``ca_file``, ``tls_verify``) against a real registry served
over https with a private CA."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from http.client import HTTPSConnection
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.settings import ConfigError, RegistrySettings, load_settings
from proxy.upstream.connections import registry_tls
from tests.conftest import ReadLogs
from tests.images import ACCEPT_ALL, Client, PushedImage, Response, build_image, unique_repo
from tests.images import upload_image as _upload_image
from tests.proxy import Proxy, pull_image
from tests.registry import Registry

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
UNTRUSTED = "certificate verify failed: unable to get local issuer certificate"


class TLSClient(Client):
    """:class:`tests.images.Client` over https, trusting the registry's private CA."""

    def _send(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        context = self.registry.client_ssl(check_hostname=False)
        conn = HTTPSConnection("127.0.0.1", self.registry.port, timeout=30, context=context)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            raw = conn.getresponse()
            data = raw.read()
            return Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, data)
        finally:
            conn.close()


def push_tls(registry: Registry, repo: str) -> PushedImage:
    image = build_image(repo, "v1", layers=1, layer_size=2048)
    _upload_image(registry, image, client=TLSClient(registry))
    return image


def mirror_config(
    tmp_path: Path, *mirrors: str, registries: dict[str, Any] | None = None, **upstream: Any
) -> dict[str, Any]:
    """quay.io/ served by ``mirrors`` (host[:port]), in order, under ``<mirror>/quay/``."""
    return {
        "cache": {"dir": str(tmp_path / "cache")},
        "redirects": [{"src": "quay.io/", "to": [f"{m}/quay/" for m in mirrors]}],
        "registries": registries or {},
        "upstream": upstream,
    }


def failures(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``upstream_attempt_failed`` lines, without timestamp and logger fields."""
    return [
        {k: v for k, v in line.items() if k not in ("timestamp", "event", "level")}
        for line in lines
        if line["event"] == "upstream_attempt_failed" and line["level"] == "warning"
    ]


async def get_error(proxy: Proxy, repo: str, status: int = 502) -> dict[str, Any]:
    url = f"{proxy.url}/v2/quay.io/{repo}/manifests/v1"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        body = await response.json()
        assert response.status == status, body
    error: dict[str, Any] = body["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    return error


# ------------------------------------------------------------------------ per-registry TLS


async def test_a_mirror_with_a_private_ca_works_with_ca_file(
    make_proxy: MakeProxy, make_registry: Callable[..., Registry], tmp_path: Path
) -> None:
    mirror = make_registry(tls=True)
    name = unique_repo("app")
    image = push_tls(mirror, f"quay/{name}")
    registries = {mirror.host: {"ca_file": str(mirror.ca_path)}}
    proxy = await make_proxy(mirror_config(tmp_path, mirror.host, registries=registries))
    await pull_image(proxy, f"quay.io/{name}", image)


async def test_without_ca_file_the_cause_is_tls(
    make_proxy: MakeProxy, make_registry: Callable[..., Registry], tmp_path: Path, logs: ReadLogs
) -> None:
    mirror = make_registry(tls=True)
    name = unique_repo("app")
    push_tls(mirror, f"quay/{name}")
    proxy = await make_proxy(mirror_config(tmp_path, mirror.host))
    logs()
    error = await get_error(proxy, name)
    assert error["message"] == f"TLS handshake with {mirror.host} failed: {UNTRUSTED}"
    attempt = {"upstream": mirror.host, "cause": "tls", "error": UNTRUSTED}
    assert error["detail"] == {"name": f"quay.io/{name}", "attempts": [attempt]}
    assert failures(logs()) == [{**attempt, "name": f"quay.io/{name}"}]


async def test_a_plain_http_mirror_without_insecure_names_the_setting(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path, logs: ReadLogs
) -> None:
    """A mirror that speaks plain HTTP, named without ``insecure: true``: the 502 and the
    warning say which setting fixes it."""
    name = unique_repo("app")
    proxy = await make_proxy(mirror_config(tmp_path, registry.host))
    logs()
    error = await get_error(proxy, name)
    hint = f"(plain HTTP? then set registries.{registry.host}.insecure: true)"
    assert error["message"].startswith(f"TLS handshake with {registry.host} failed: ")
    assert error["message"].endswith(hint)
    [attempt] = error["detail"]["attempts"]
    assert attempt["cause"] == "tls"
    assert attempt["error"].endswith(hint)
    assert [line["error"] for line in failures(logs())] == [attempt["error"]]


async def test_a_rule_to_a_wrong_path_names_the_url_it_asked(
    detour_process: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    """A mirror without the image where the rule sends it: the 404 and the request's log line
    carry the URL asked, so a wrong ``to:`` path shows."""
    name = unique_repo("app")
    registries = {registry.host: {"insecure": True}}
    proxy = await detour_process(mirror_config(tmp_path, registry.host, registries=registries))
    path = f"/v2/quay.io/{name}/manifests/v1"
    async with proxy.session.get(f"{proxy.url}{path}", headers={"Accept": ACCEPT_ALL}) as answer:
        assert answer.status == 404
        [error] = (await answer.json())["errors"]
    asked = f"http://{registry.host}/v2/quay/{name}/manifests/v1"
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert error["message"] == f"manifest unknown to upstream: {asked}"
    assert error["detail"]["url"] == asked
    for _ in range(200):  # the access line is written once the answer is out
        lines = [json.loads(line) for line in proxy.log_lines() if line.strip()]
        requests = [line for line in lines if line["event"] == "request" and line["path"] == path]
        if requests:
            break
        await asyncio.sleep(0.05)
    assert [line.get("upstream_url") for line in requests] == [asked]


async def test_tls_verify_false_accepts_the_certificate_with_a_warning_at_start(
    make_proxy: MakeProxy, make_registry: Callable[..., Registry], tmp_path: Path, logs: ReadLogs
) -> None:
    mirror = make_registry(tls=True)
    name = unique_repo("app")
    image = push_tls(mirror, f"quay/{name}")
    registries = {mirror.host: {"tls_verify": False}}
    proxy = await make_proxy(mirror_config(tmp_path, mirror.host, registries=registries))
    started = logs()
    assert [(line["level"], line["registry"]) for line in started] == [("warning", mirror.host)]
    assert started[0]["event"] == "tls_verify_disabled"
    await pull_image(proxy, f"quay.io/{name}", image)


async def test_a_certificate_for_another_name_is_a_tls_failure(
    make_proxy: MakeProxy, make_registry: Callable[..., Registry], tmp_path: Path, logs: ReadLogs
) -> None:
    mirror = make_registry(tls=True, tls_names=["mirror.example"])
    name = unique_repo("app")
    push_tls(mirror, f"quay/{name}")
    registries = {mirror.host: {"ca_file": str(mirror.ca_path)}}  # trusted, wrong name
    proxy = await make_proxy(mirror_config(tmp_path, mirror.host, registries=registries))
    logs()
    error = await get_error(proxy, name)
    mismatch = "certificate verify failed: IP address mismatch, certificate is not valid for "
    [attempt] = error["detail"]["attempts"]
    assert attempt == {
        "upstream": mirror.host,
        "cause": "tls",
        "error": f"{mismatch}'127.0.0.1'.",
    }
    assert [line["cause"] for line in failures(logs())] == ["tls"]


async def test_a_redirect_to_another_host_is_verified_by_that_hosts_own_settings(
    make_proxy: MakeProxy,
    make_registry: Callable[..., Registry],
    aiohttp_server: Any,
    tmp_path: Path,
) -> None:
    """The mirror's TLS settings stay with the mirror's host: a redirect elsewhere (object
    storage) is verified as usual, unless that host has a ``registries`` entry of its own."""
    storage = make_registry(tls=True)
    name = unique_repo("app")
    image = push_tls(storage, f"quay/{name}")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"{storage.url}{request.path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    front = await aiohttp_server(app, host="127.0.0.1")
    front_host = f"127.0.0.1:{front.port}"
    # The storage host is named (it is on loopback, which Detour reaches only when named),
    # with no TLS settings of its own: verified as usual.
    registries: dict[str, Any] = {front_host: {"insecure": True}, storage.host: {}}

    proxy = await make_proxy(mirror_config(tmp_path / "a", front_host, registries=registries))
    error = await get_error(proxy, name)
    assert error["detail"]["attempts"] == [
        {"upstream": front_host, "cause": "tls", "error": UNTRUSTED, "host": storage.host}
    ]
    assert error["message"] == f"TLS handshake with {storage.host} failed: {UNTRUSTED}"

    registries[storage.host] = {"ca_file": str(storage.ca_path)}
    proxy = await make_proxy(mirror_config(tmp_path / "b", front_host, registries=registries))
    await pull_image(proxy, f"quay.io/{name}", image)


def test_an_unusable_ca_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    for path, words in ((missing, "No such file or directory"), (not_pem, "no certificate")):
        registries = {"mirror.example": RegistrySettings(ca_file=path)}
        with pytest.raises(ConfigError) as caught:
            registry_tls(registries)
        assert str(caught.value).startswith(f"registries.mirror.example.ca_file: cannot use {path}")
        assert words in str(caught.value)


@pytest.mark.parametrize(
    "conf",
    [
        {"insecure": True, "ca_file": "/ca.pem"},
        {"insecure": True, "tls_verify": False},
        {"ca_file": "/ca.pem", "tls_verify": False},
    ],
)
def test_tls_settings_that_contradict_each_other_are_refused(
    conf: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "detour.yaml"
    path.write_text(json.dumps({"registries": {"mirror.example": conf}}))
    with pytest.raises(ConfigError, match=rf"^{path}:1: registries\.mirror\.example: "):
        load_settings(path)


# ---------------------------------------------------------------------------- the causes


async def test_a_name_that_does_not_resolve_is_dns(
    make_proxy: MakeProxy, tmp_path: Path, logs: ReadLogs
) -> None:
    proxy = await make_proxy(mirror_config(tmp_path, "mirror.invalid"))
    logs()
    error = await get_error(proxy, "app/x")
    [attempt] = error["detail"]["attempts"]
    assert (attempt["upstream"], attempt["cause"]) == ("mirror.invalid", "dns")
    assert attempt["error"]  # the resolver's words, e.g. "Name or service not known"
    assert error["message"] == f"cannot resolve mirror.invalid: {attempt['error']}"
    assert [line["cause"] for line in failures(logs())] == ["dns"]


async def test_a_port_nothing_listens_on_is_refused(
    make_proxy: MakeProxy, free_port: Callable[[], int], tmp_path: Path, logs: ReadLogs
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    proxy = await make_proxy(mirror_config(tmp_path, dead))
    logs()
    error = await get_error(proxy, "app/x")
    attempt = {"upstream": dead, "cause": "refused", "error": "connection refused"}
    assert error["detail"]["attempts"] == [attempt]
    assert error["message"] == f"{dead} refused the connection"
    assert failures(logs()) == [{**attempt, "name": "quay.io/app/x"}]


async def test_a_silent_registry_is_a_timeout(
    make_proxy: MakeProxy, make_registry: Callable[..., Registry], tmp_path: Path, logs: ReadLogs
) -> None:
    hung = make_registry()
    hung.freeze()  # the kernel accepts the connection; nothing answers
    registries = {hung.host: {"insecure": True}}
    proxy = await make_proxy(
        mirror_config(tmp_path, hung.host, registries=registries, read_timeout="1s")
    )
    logs()
    error = await get_error(proxy, "app/x", status=504)
    attempt = {"upstream": hung.host, "cause": "timeout", "error": "timed out waiting for data"}
    assert error["detail"]["attempts"] == [attempt]
    assert error["message"] == f"{hung.host} timed out waiting for data"
    assert failures(logs()) == [{**attempt, "name": "quay.io/app/x"}]
    hung.thaw()


async def test_a_5xx_is_http_with_its_status_and_every_upstream_is_listed(
    make_proxy: MakeProxy,
    aiohttp_server: Any,
    free_port: Callable[[], int],
    tmp_path: Path,
    logs: ReadLogs,
) -> None:
    async def unavailable(_: web.Request) -> web.Response:
        return web.Response(status=503, text="down for maintenance")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", unavailable)
    server = await aiohttp_server(app, host="127.0.0.1")
    broken = f"127.0.0.1:{server.port}"
    dead = f"127.0.0.1:{free_port()}"
    registries = {
        broken: {"insecure": True, "username": "u", "password": "SECRET-PASSWORD"},
        dead: {"insecure": True},
    }
    proxy = await make_proxy(mirror_config(tmp_path, broken, dead, registries=registries))
    logs()
    error = await get_error(proxy, "app/x")
    http = {
        "upstream": broken,
        "cause": "http",
        "error": "answered 503 Service Unavailable",
        "status": 503,
    }
    refused = {"upstream": dead, "cause": "refused", "error": "connection refused"}
    assert error["message"] == "no upstream could serve the request"
    assert error["detail"]["attempts"] == [http, refused]
    lines = logs()
    assert failures(lines) == [
        {**http, "name": "quay.io/app/x"},
        {**refused, "name": "quay.io/app/x"},
    ]
    assert "SECRET-PASSWORD" not in json.dumps(error) + json.dumps(lines)
