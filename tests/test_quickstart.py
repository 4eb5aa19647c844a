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
import re
import shlex
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.reference import ImageName
from proxy.settings import load_settings
from proxy.upstream.rules import Rules
from tests.images import push_image
from tests.proxy import Proxy
from tests.registry import Registry
from tests.support import ROOT, run_command

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


def readme_blocks(section: str) -> list[list[str]]:
    """The ``sh`` code blocks of README.md's section ``## <section>``, as lists of commands."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else None]
    blocks = []
    for chunk in body.split("```sh\n")[1:]:
        lines = chunk.split("```")[0].splitlines()
        blocks.append([line for line in lines if line.strip() and not line.startswith("#")])
    return blocks


def test_the_readme_opens_with_the_two_commands() -> None:
    """One sets up and serves the example config on 127.0.0.1:7439; the other runs the tests."""
    text = (ROOT / "README.md").read_text()
    first = text.split("```sh\n")[1].split("```")[0]
    commands = [line for line in first.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -q -e . && DETOUR_LISTEN=127.0.0.1:7439 "
        "DETOUR_CACHE__DIR=./cache .venv/bin/detour serve --config deploy/detour.example.yaml",
        "bash .ci/run",
    ]
    assert "python3-venv" in first  # what a stock Debian lacks for the first one


async def test_the_readme_quickstart_pulls_and_shows_the_hit(
    registry: Registry, detour_process: StartProxy, tmp_path: Path
) -> None:
    """The Quickstart's first block, as written, against the example config with the local
    registry standing in for mirror.gcr.io (no internet here): the first skopeo copy is a miss,
    the second a hit, and the README's curl | grep finds the hit counted."""
    commands = readme_blocks("Quickstart")[0]
    copies = [shlex.split(c.split("#")[0]) for c in commands if c.startswith("skopeo copy ")]
    assert len(copies) == 2
    assert copies[0][-2] == copies[1][-2]  # the same image, twice
    source = copies[0][-2]
    name, tag = source.removeprefix("docker://localhost:7439/").rsplit(":", 1)
    assert name.startswith("docker.io/")  # through the mirror.gcr.io rule
    mirror = f"quickstart-{uuid.uuid4().hex[:8]}"
    image = push_image(registry, f"{mirror}/{name.removeprefix('docker.io/')}", tag)

    example = EXAMPLE.read_text()
    assert "to: mirror.gcr.io/" in example
    config = yaml.safe_load(example.replace("mirror.gcr.io/", f"{registry.host}/{mirror}/"))
    config["listen"] = "127.0.0.1:0"
    config["cache"]["dir"] = str(tmp_path / "cache")
    config["registries"] = {registry.host: {"insecure": True}}
    proxy = await detour_process(config)

    for index, argv in enumerate(copies):
        argv = [a.replace("localhost:7439", proxy.host) for a in argv]
        argv[-1] = f"oci:{tmp_path / f'pulled-{index}'}:x"
        result = (await run_command(*argv, limit=120)).check()
        assert "Writing manifest" in result.stdout + result.stderr
    [curl] = [c for c in commands if c.startswith("curl ")]
    url, pattern = curl_and_grep(curl)
    async with proxy.session.get(f"{proxy.url}{url}") as response:
        metrics = await response.text()
    hits = [line for line in metrics.splitlines() if re.search(pattern, line)]
    assert hits, f"nothing matches {pattern!r}"
    assert sum(float(line.split()[-1]) for line in hits) >= 1 + len(image.blobs)


def curl_and_grep(command: str) -> tuple[str, str]:
    """``curl -s URL | grep 'PATTERN'``: the URL's path and the pattern."""
    curl, grep = (shlex.split(part) for part in command.split("|"))
    assert curl[:2] == ["curl", "-s"]
    assert grep[0] == "grep"
    return curl[2].removeprefix("localhost:7439"), grep[-1]
