"""The docker-compose demo, without containers: the compose file as Compose v1 and v2 read it,
its services and their order, and ``docker compose up`` done by hand: the seeding script run
against the test registry, ``detour serve`` with the compose config, skopeo pulling through it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.core.rules import Rules
from proxy.reference import ImageName
from proxy.settings import load_settings, split_host_port
from tests.proxy import Proxy
from tests.registry import Registry
from tests.support import ROOT

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]

COMPOSE_FILE = ROOT / "docker-compose.yml"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def compose_config_path() -> Path:
    """The host file mounted as the detour service's config."""
    detour = compose()["services"]["detour"]
    config_arg = detour["command"][detour["command"].index("--config") + 1]
    for volume in detour["volumes"]:
        source, target, *_ = str(volume).split(":")
        if target == config_arg:
            return (ROOT / source).resolve()
    raise AssertionError(f"nothing mounted at {config_arg}")


def seed_args() -> dict[str, str]:
    command = compose()["services"]["seed"]["command"]
    return {command[i].removeprefix("--"): str(command[i + 1]) for i in range(0, len(command), 2)}


def test_compose_file_is_read_by_compose_v1_and_v2() -> None:
    """No top-level name: (Compose v1 rejects it) nor version: (v2 calls it obsolete); Debian's
    docker-compose (v1) checks the rest against the Compose Specification, where installed."""
    assert set(compose()) == {"services", "volumes"}
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (Compose v1) is not installed: apt-get install docker-compose")
    result = subprocess.run(
        [binary, "--file", str(COMPOSE_FILE), "--project-name", "detour", "config"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert set(yaml.safe_load(result.stdout)["services"]) == set(compose()["services"])


def test_compose_services_ports_and_order() -> None:
    services = compose()["services"]
    assert set(services) == {"mirror", "seed", "detour"}
    assert services["mirror"]["image"] == "registry:2"
    detour = services["detour"]
    assert detour["ports"] == ["127.0.0.1:7439:7439"]
    assert detour["build"] == "."
    assert detour["depends_on"]["seed"] == {"condition": "service_completed_successfully"}
    # The seeding script is mounted from the repository into the detour image.
    seed = services["seed"]
    assert seed["image"] == detour["image"]
    source, target, _ = seed["volumes"][0].split(":")
    assert (ROOT / source).is_file()
    assert seed["entrypoint"] == ["python", target]


def test_compose_config_loads_and_redirects_to_the_seeded_repository() -> None:
    settings = load_settings(compose_config_path())
    _, port = split_host_port(settings.listen, 0)
    assert port == 7439
    args = seed_args()
    route = Rules.from_settings(settings).route(ImageName.parse("hello-detour"))
    assert [(u.registry, u.repository, u.insecure) for u in route.upstreams] == [
        (args["registry"], args["repository"], True)
    ]
    # The mirror is the compose service "mirror"; registry:2 listens on 5000.
    assert args["registry"] == "mirror:5000"
    assert args["repository"].endswith("/library/hello-detour")


async def run(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"{shlex.join(args)}:\n{out.decode()}\n{err.decode()}"
    return out.decode()


async def test_compose_demo_without_containers(
    registry: Registry, detour_process: StartProxy, tmp_path: Path
) -> None:
    """What ``docker compose up`` does, with the test registry as ``mirror:5000``: seed the
    mirror with the compose command, run detour with the compose config, pull the image the
    README names through it twice, and find the hits in /metrics."""
    args = seed_args()
    seed = compose()["services"]["seed"]
    script = str(ROOT / seed["volumes"][0].split(":")[0])
    command = [str(a).replace(args["registry"], registry.host) for a in seed["command"]]
    first = await run(sys.executable, script, *command)
    again = await run(sys.executable, script, *command)
    assert first == again  # same content, same digest: re-running changes nothing
    digest = first.split("(")[1].rstrip(")\n")

    config = yaml.safe_load(compose_config_path().read_text().replace("mirror:5000", registry.host))
    config["cache"]["dir"] = str(tmp_path / "cache")
    proxy = await detour_process(config)
    ref = f"docker://{proxy.host}/docker.io/library/hello-detour:{args['tag']}"
    for _ in range(2):
        raw = await run("skopeo", "inspect", "--tls-verify=false", "--raw", ref)
        # The seeded index, byte for byte.
        assert f"sha256:{hashlib.sha256(raw.encode()).hexdigest()}" == digest
    for attempt in range(2):
        dest = tmp_path / f"pulled-{attempt}"
        await run("skopeo", "copy", "--src-tls-verify=false", ref, f"oci:{dest}:x")
        index = json.loads((dest / "index.json").read_text())
        assert len(index["manifests"]) == 1  # this platform's image arrived
    hits = await proxy.metric("detour_cache_requests_total", kind="blob", result="hit")
    assert hits >= 2  # the second copy's config and layer
    manifest_hits = await proxy.metric("detour_cache_requests_total", kind="manifest", result="hit")
    assert manifest_hits >= 1
