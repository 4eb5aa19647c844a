"""The README's quickstart: ``detour serve --config deploy/detour.example.yaml`` as shipped.

On a machine with internet access it pulls real images: Docker Hub names through
``mirror.gcr.io`` (Google's public mirror of Docker Hub) and then Docker Hub itself, every other
name from its own registry over https. The tests' machines reach no registry on the internet,
so what is checked here is everything short of that: the file loads, each kind of name routes
where the README says, ``detour resolve`` prints it so, and ``detour serve`` starts with the file
and the README's variables and answers the registry API.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.core.rules import Rules
from proxy.reference import ImageName
from proxy.settings import load_settings
from tests.proxy import Proxy
from tests.support import ROOT

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]

EXAMPLE = ROOT / "deploy" / "detour.example.yaml"


@pytest.mark.parametrize(
    ("name", "upstreams"),
    [
        (
            "nats",
            [("mirror.gcr.io", "library/nats", False), ("docker.io", "library/nats", True)],
        ),
        (
            "docker.io/library/busybox",
            [("mirror.gcr.io", "library/busybox", False), ("docker.io", "library/busybox", True)],
        ),
        ("ghcr.io/nats-io/nack", [("ghcr.io", "nats-io/nack", True)]),
        ("quay.io/prometheus/node-exporter", [("quay.io", "prometheus/node-exporter", True)]),
    ],
)
def test_the_example_config_routes_each_registry_as_the_readme_says(
    name: str, upstreams: list[tuple[str, str, bool]]
) -> None:
    """(registry, repository, is the origin), in the order tried; all over https."""
    settings = load_settings(EXAMPLE)
    route = Rules.from_settings(settings).route(ImageName.parse(name))
    assert [(u.registry, u.repository, u.origin) for u in route.upstreams] == upstreams
    assert not any(u.insecure for u in route.upstreams)
    assert settings.registries == {}  # nothing to fill in: no credentials, no private host


async def test_detour_resolve_prints_the_route_with_the_example_config() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "resolve",
        "nats:2.10.26-alpine",
        "--config",
        str(EXAMPLE),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    lines = [line.strip() for line in out.decode().splitlines()]
    assert "1. https://mirror.gcr.io/v2/library/nats/manifests/2.10.26-alpine" in lines
    assert (
        "2. https://registry-1.docker.io/v2/library/nats/manifests/2.10.26-alpine  (origin)"
        in lines
    )
    assert "path:   localhost:7439/docker.io/library/nats:2.10.26-alpine" in lines


async def test_the_example_config_serves(detour_process: StartProxy, tmp_path: Path) -> None:
    """As the README's first command starts it (listen and cache.dir moved, as its variables
    do): the registry API, the probes and /metrics answer."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config["listen"] = "127.0.0.1:0"
    config["cache"]["dir"] = str(tmp_path / "cache")
    proxy = await detour_process(config)
    for path in ("/healthz", "/readyz", "/v2/", "/metrics"):
        async with proxy.session.get(f"{proxy.url}{path}") as response:
            assert response.status == 200, path
