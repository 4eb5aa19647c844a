"""The container image: the Dockerfile's stages and contract, the default config it ships
(loaded, and served for real by ``detour serve``), and the workflow that builds it for both
platforms on a tag. No container engine is needed: the Dockerfile is read, not built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from proxy.reference import ImageName
from proxy.setting_types import split_host_port
from proxy.settings import Settings, load_settings
from proxy.upstream.rules import Rules
from tests.proxy import Proxy
from tests.support import ROOT

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]

DEFAULT_CONFIG = ROOT / "deploy" / "detour.default.yaml"
IMAGE_WORKFLOW = ROOT / ".github" / "workflows" / "image.yml"


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, ``(KEYWORD, arguments)``, grouped by ``FROM``."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    instructions: list[str] = []
    current = ""
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            instructions.append(current.strip())
            current = ""
    stages: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        keyword, _, args = instruction.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), args))
    return stages


def test_dockerfile_final_stage_contract() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a build stage, then the runtime stage"
    final = dict(stages[-1])
    assert final["FROM"] == "python:3.11-slim"
    assert "apt-get" not in str(stages[-1]), "no build tools in the runtime image"
    user = final["USER"].split(":")
    assert int(user[0]) == 10001
    assert int(user[1]) == 10001
    assert json.loads(final["ENTRYPOINT"]) == ["detour"]
    cmd = json.loads(final["CMD"])
    assert cmd == ["serve", "--config", "/etc/detour/detour.yaml"]
    assert set(final["EXPOSE"].split()) == {"7439", "8443"}
    # The health check asks the proxy's default port for /healthz.
    _, port = split_host_port(Settings().listen, 0)
    assert f"http://127.0.0.1:{port}/healthz" in final["HEALTHCHECK"]
    assert "install -d -o 10001 -g 10001" in final["RUN"]
    assert "/var/cache/detour" in final["RUN"]


def test_the_image_serves_with_no_arguments() -> None:
    """``docker run IMAGE``: the CMD's config file is in the image, from the build context."""
    final = dict(dockerfile_stages()[-1])
    cmd = json.loads(final["CMD"])
    config_path = cmd[cmd.index("--config") + 1]
    *flags, source, target = final["COPY"].split()
    assert (source, target) == (str(DEFAULT_CONFIG.relative_to(ROOT)), config_path)
    assert flags == []
    assert f"chmod 0644 {config_path}" in final["RUN"]  # root's, readable by the image's user
    # .dockerignore sends it to the builder (everything not named there stays out).
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    assert f"!{source}" in patterns


def test_the_dockerfile_builds_for_every_platform() -> None:
    """linux/amd64 and linux/arm64 from the same Dockerfile: multi-arch bases, no stage pinned
    to one platform, nothing fetched per architecture."""
    text = (ROOT / "Dockerfile").read_text()
    # The classic builder (Docker 20.10, Debian 12's) builds it too: no frontend image to fetch
    # (a syntax directive), none of BuildKit's own flags.
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE)
    assert not re.search(r"--(mount|chmod|link)\b", text)
    for stage in dockerfile_stages():
        keyword, args = stage[0]
        assert keyword == "FROM"
        assert args.split()[0] == "python:3.11-slim", args  # a multi-arch official image
        assert "--platform" not in args
        text = " ".join(f"{keyword} {args}" for keyword, args in stage)
        assert not re.search(r"amd64|x86_64|arm64|aarch64|armv", text), text
        assert not re.search(r"\b(curl|wget|ADD)\b", text), text


def test_the_image_default_config() -> None:
    """deploy/detour.default.yaml: every address on the proxy's port (EXPOSEd, health-checked),
    the cache in the directory the image gives its user, and no rules: each name from its own
    registry."""
    settings = load_settings(DEFAULT_CONFIG)
    assert settings.listen == "0.0.0.0:7439"
    final = dict(dockerfile_stages()[-1])
    assert "7439" in final["EXPOSE"].split()
    assert f"install -d -o 10001 -g 10001 -m 0750 {settings.cache.dir} " in final["RUN"] + " "
    assert settings.redirects == []
    rules = Rules.from_settings(settings)
    for name, registry in [("nats", "docker.io"), ("ghcr.io/nats-io/nack", "ghcr.io")]:
        (upstream,) = rules.route(ImageName.parse(name)).upstreams
        assert (upstream.registry, upstream.insecure) == (registry, False)
    assert settings.docker_config is None


async def test_the_image_default_config_serves(detour_process: StartProxy, tmp_path: Path) -> None:
    """As ``docker run`` starts it, with the port and the cache directory moved."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["listen"] = "127.0.0.1:0"
    config["cache"]["dir"] = str(tmp_path / "cache")
    proxy = await detour_process(config)
    for path in ("/healthz", "/readyz", "/v2/"):
        async with proxy.session.get(f"{proxy.url}{path}") as response:
            assert response.status == 200, path


def test_the_image_workflow_builds_both_platforms_on_a_tag() -> None:
    workflow = yaml.safe_load(IMAGE_WORKFLOW.read_text())
    assert workflow[True] == {"push": {"tags": ["v*"]}}  # YAML 1.1 reads the key on as True
    assert workflow["permissions"] == {"contents": "read", "packages": "write"}
    jobs = workflow["jobs"]
    assert list(jobs) == ["image", "chart"]  # the chart is published for the image just pushed
    assert jobs["chart"]["needs"] == "image"
    steps = {step["uses"].split("@")[0]: step for step in jobs["image"]["steps"]}
    assert list(steps) == [
        "actions/checkout",
        "docker/setup-qemu-action",
        "docker/setup-buildx-action",
        "docker/login-action",
        "docker/metadata-action",
        "docker/build-push-action",
    ]
    login = steps["docker/login-action"]["with"]
    assert login["registry"] == "ghcr.io"
    assert login["password"] == "${{ secrets.GITHUB_TOKEN }}"
    build = steps["docker/build-push-action"]["with"]
    assert set(build["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["push"] is True
    meta = steps["docker/metadata-action"]
    assert build["tags"] == f"${{{{ steps.{meta['id']}.outputs.tags }}}}"
    assert meta["with"]["images"].startswith("ghcr.io/")
