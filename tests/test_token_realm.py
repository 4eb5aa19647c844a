"""A token realm never takes Detour from https down to http: the configured credentials (and
the token) never travel in clear where the registry itself did not."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.images import ACCEPT_ALL
from tests.proxy import Proxy
from tests.registry import Registry

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


async def test_an_http_realm_of_an_https_registry_is_refused(
    detour_process: StartProxy, make_registry: Callable[..., Registry], tmp_path: Path
) -> None:
    mirror = make_registry("token", tls=True)  # https; its token issuer on plain http
    issuer = mirror.issuer
    assert issuer is not None
    assert issuer.realm.startswith("http://")
    creds = {"username": issuer.reader_user, "password": issuer.reader_password}
    proxy = await detour_process(
        {
            "cache": {"dir": str(tmp_path / "cache")},
            "redirects": [{"src": "quay.io/", "to": f"{mirror.host}/readable/"}],
            "registries": {
                mirror.host: {"ca_file": str(mirror.ca_path), **creds},
                **mirror.named_hosts,
            },
        }
    )
    issuer.reset()
    url = f"{proxy.url}/v2/quay.io/team/app/manifests/v1"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 502
        error = (await response.json())["errors"][0]
    assert "plain http" in error["message"]
    assert f"registries.{mirror.host}.insecure" in error["message"]
    assert issuer.served(None) == []  # nothing, credentials least of all, went to the realm
