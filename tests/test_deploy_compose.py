"""The docker-compose demo: the compose file as Compose v1 and v2 read it, its services and
their order; ``docker compose up`` done by hand (the seeding script run against the test
registry, ``detour serve`` with the compose config, skopeo pulling through it); and the demo
for real: Debian's docker-compose (1.29) and dockerd (20.10, the classic builder) build the
Dockerfile and run the compose file as the README shows it, ``up -d --build``, two pulls, a hit,
``down -v``.

The real demo runs offline. Its base images are stand-ins built here, never fetched:
``python:3.11-slim`` and ``registry:2`` are ``docker import``s of one Debian bookworm root
(tests/rootfs.py: debootstrap, cached on the machine) with python3 (3.11, as the real image) and
Debian's ``docker-registry`` (distribution, which registry:2 is). The engine runs in a network
namespace of its own, so the compose file's fixed ``127.0.0.1:7439`` is its own and nothing
leaves the machine; the python stand-in's pip therefore installs from wheels laid into the
image (``PIP_NO_INDEX``, ``PIP_FIND_LINKS``), downloaded on the host by the host's pip, where
the real image reaches PyPI. The Dockerfile and the compose file keep the real image names.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from proxy.reference import ImageName
from proxy.setting_types import split_host_port
from proxy.settings import load_settings
from proxy.upstream.rules import Rules
from tests.dockerd import Dockerd
from tests.proxy import Proxy
from tests.registry import Registry
from tests.rootfs import debian_root, root_tarball
from tests.support import ROOT, run_command

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
    assert binary is not None, "docker-compose (Compose v1): apt-get install docker-compose"
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


# One root for both stand-ins: python3 for python:3.11-slim, docker-registry for registry:2.
STANDIN_PACKAGES = ("python3", "python3-venv", "python-is-python3", "docker-registry")
STANDIN_WHEELS = "/opt/standin-wheels"
STANDIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# registry:2's own configuration: the API on :5000, the blobs under /var/lib/registry.
REGISTRY_CONFIG = b"""version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: /var/lib/registry
  delete:
    enabled: true
http:
  addr: :5000
"""


async def download_wheels(dest: Path) -> dict[str, bytes]:
    """Every wheel the Dockerfile's ``pip install /src`` needs (the project's dependencies and
    its build backend), by the host's pip: path in the stand-in -> content."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
    (await run_command(*pip, "--dest", str(dest), *wanted, limit=600)).check()
    return {f"{STANDIN_WHEELS}/{wheel.name}": wheel.read_bytes() for wheel in read_dir(dest)}


def readme_compose_demo() -> list[tuple[str, list[str], str]]:
    """The README Quickstart's compose block: (``docker compose``, ``docker`` or ``curl``, its
    arguments, its comment), in order. For ``curl -s URL | grep PATTERN``: the URL's path and
    the pattern."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Quickstart\n") :]
    section = section[: section.index("\n## ", 1)]
    block = next(b for b in section.split("```sh\n")[1:] if "docker compose up" in b)
    steps = []
    for line in block.split("```")[0].splitlines():
        command, _, note = line.partition("#")
        words = shlex.split(command.split("|")[0])
        if not words:
            continue
        if words[:2] == ["docker", "compose"]:
            steps.append(("docker compose", words[2:], note.strip()))
        elif words[0] == "docker":
            steps.append(("docker", words[1:], note.strip()))
        else:
            assert words[:2] == ["curl", "-s"], line
            pattern = shlex.split(command.split("|")[1])[-1]
            steps.append(("curl", [words[2].removeprefix("localhost:7439"), pattern], ""))
    return steps


def read_dir(path: Path) -> list[Path]:
    return sorted(path.iterdir())


async def import_standins(dockerd: Dockerd, work: Path) -> None:
    """``python:3.11-slim`` and ``registry:2`` in the engine's store, built offline."""
    root = await asyncio.to_thread(debian_root, STANDIN_PACKAGES)
    wheels = await download_wheels(work / "wheels")
    python_tar = await asyncio.to_thread(root_tarball, root, work / "python.tar", wheels)
    (
        await dockerd.docker(
            "import",
            "--change", f"ENV PATH={STANDIN_PATH}",
            "--change", "ENV LANG=C.UTF-8",
            "--change", "ENV PIP_NO_INDEX=1",
            "--change", f"ENV PIP_FIND_LINKS={STANDIN_WHEELS}",
            "--change", 'CMD ["python3"]',
            str(python_tar),
            "python:3.11-slim",
        )
    ).check()  # fmt: skip
    python_tar.unlink()
    overlay = {"/etc/docker/registry/config.yml": REGISTRY_CONFIG}
    registry_tar = await asyncio.to_thread(root_tarball, root, work / "registry.tar", overlay)
    (
        await dockerd.docker(
            "import",
            "--change", f"ENV PATH={STANDIN_PATH}",
            "--change", "EXPOSE 5000",
            "--change", 'VOLUME ["/var/lib/registry"]',
            "--change", 'CMD ["docker-registry", "serve", "/etc/docker/registry/config.yml"]',
            str(registry_tar),
            "registry:2",
        )
    ).check()  # fmt: skip
    registry_tar.unlink()


async def test_compose_demo_runs_with_debian_docker(tmp_path: Path) -> None:
    """The README's compose demo, its commands as written, with Debian's docker.io and
    docker-compose: ``up -d --build`` builds the Dockerfile with the classic builder, seeds the
    mirror and starts detour; dockerd pulls the demo image through it (a miss), again after
    removing it (a hit), and the README's ``curl | grep`` finds the hit; ``down -v`` leaves no
    container, network or volume."""
    compose_bin = shutil.which("docker-compose")
    assert compose_bin is not None, "docker-compose (Compose v1): apt-get install docker-compose"
    dockerd = Dockerd(bridge=True, netns=True)
    project = f"detour{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DOCKER_HOST": dockerd.host,
        "DOCKER_BUILDKIT": "0",  # the classic builder, which Docker 20.10 uses by default
        "COMPOSE_DOCKER_CLI_BUILD": "0",
    }
    compose_cmd = [compose_bin, "--project-name", project, "--file", str(COMPOSE_FILE)]

    async def compose_run(*args: str, limit: float = 300.0) -> str:
        result = await run_command(*compose_cmd, *args, limit=limit, env=env)
        return result.check().stdout + result.stderr

    async def metrics() -> str:
        return await compose_run(
            "exec", "-T", "detour", "python", "-c",
            "import urllib.request; "
            "print(urllib.request.urlopen('http://127.0.0.1:7439/metrics').read().decode())",
        )  # fmt: skip

    async def blobs(result: str) -> float:
        wanted = f'detour_cache_requests_total{{kind="blob",result="{result}"}}'
        lines = [line for line in (await metrics()).splitlines() if line.startswith(wanted)]
        return float(lines[0].split()[-1]) if lines else 0.0

    steps = readme_compose_demo()
    assert [step[0] for step in steps] == [
        "docker compose", "docker", "docker", "docker", "curl", "docker compose"
    ]  # fmt: skip
    try:
        await asyncio.to_thread(dockerd.start)
        await import_standins(dockerd, tmp_path)
        for kind, args, note in steps:
            if kind == "docker compose":
                await compose_run(*args, limit=1500)
                if args[0] == "up":
                    seed_log = await compose_run("logs", "--no-color", "seed")
                    assert "seeded mirror:5000/docker-mirror/library/hello-detour:1.0" in seed_log
                if args[0] == "down":
                    assert args == ["down", "-v"]
            elif kind == "docker":
                hits = await blobs("hit")
                (await dockerd.docker(*args, limit=300)).check()
                if note == "a miss":
                    assert await blobs("miss") >= 2  # this platform's config and the layer
                elif note == "a hit":
                    assert await blobs("hit") >= hits + 2  # the same blobs, from the cache
            else:  # curl -s localhost:7439/metrics | grep PATTERN
                path, pattern = args
                assert path == "/metrics"
                found = [
                    line for line in (await metrics()).splitlines() if re.search(pattern, line)
                ]
                assert any('result="hit"' in line for line in found), found

        label = f"label=com.docker.compose.project={project}"
        leftovers = {
            what: (await dockerd.docker(*command, "--quiet", "--filter", label)).check().stdout
            for what, command in {
                "containers": ("ps", "--all"),
                "volumes": ("volume", "ls"),
                "networks": ("network", "ls"),
            }.items()
        }
        assert leftovers == {"containers": "", "volumes": "", "networks": ""}
    finally:
        await asyncio.to_thread(dockerd.close)
