"""``detour registries-conf``: the drop-in CRI-O and podman read (their pulls through it are in
tests/test_runtime_pulls.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from proxy.settings import Settings
from proxy.tools.cli import main
from proxy.tools.registries_conf import MARKER, registries_conf

SETTINGS = Settings.model_validate(
    {
        "redirects": [
            {"src": "docker.io/", "to": "project-a.azurecr.io/docker-mirror/"},
            {"src": "ghcr.io/", "to": "project-a.azurecr.io/ghcr-mirror/"},
        ],
        "registries": {
            "registry.local:5000": {"insecure": True},
            "project-a.azurecr.io": {"username": "u", "password": "p"},
        },
    }
)


def test_each_origin_gets_detour_as_its_mirror_in_path_mode() -> None:
    text = registries_conf(SETTINGS, "http://127.0.0.1:7439")
    assert text.startswith(MARKER)
    registries = tomllib.loads(text)["registry"]
    # The mirror a rule sends to is Detour's upstream, not a registry nodes pull from by name.
    assert [r["prefix"] for r in registries] == ["docker.io", "ghcr.io", "registry.local:5000"]
    by_prefix = {r["prefix"]: r for r in registries}
    assert by_prefix["docker.io"] == {
        "prefix": "docker.io",
        "location": "docker.io",
        "mirror": [{"location": "127.0.0.1:7439/docker.io", "insecure": True}],
    }
    local = by_prefix["registry.local:5000"]
    assert local["insecure"] is True  # the origin itself is plain HTTP, as the settings say
    assert local["mirror"] == [{"location": "127.0.0.1:7439/registry.local_5000", "insecure": True}]


def test_an_https_endpoint_is_verified() -> None:
    registries = tomllib.loads(registries_conf(SETTINGS, "https://detour.local:7439"))["registry"]
    assert registries[0]["mirror"] == [{"location": "detour.local:7439/docker.io"}]


def test_the_command_writes_the_file_or_prints_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "detour.yaml"
    config.write_text(yaml.safe_dump(SETTINGS.model_dump(mode="json", include={"redirects"})))
    out = tmp_path / "registries.conf.d" / "50-detour.conf"
    out.parent.mkdir()
    assert main(["registries-conf", "--config", str(config), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert main(["registries-conf", "--config", str(config)]) == 0
    assert capsys.readouterr().out == out.read_text()
    assert out.stat().st_mode & 0o777 == 0o644
    assert main(["registries-conf", "--config", str(config), "--endpoint", "127.0.0.1:7439"]) == 2
    assert "expected http://host:port" in capsys.readouterr().err
