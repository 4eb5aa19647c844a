"""Settings: YAML plus DETOUR_* overrides; a bad file is refused naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.settings import ConfigError, load_settings

SCENARIO = """
listen: 0.0.0.0:7439
cache:
  dir: /var/cache/detour
imageRedirMapping:
  - src: docker.io/
    to: project-a.azurecr.io/docker-mirror/
  - src: ghcr.io/
    to: project-a.azurecr.io/ghcr-mirror/
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "detour.yaml"
    path.write_text(text)
    return path


def test_scenario_config_with_kuiks_key(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SCENARIO))
    assert [(r.src, r.to) for r in settings.redirects] == [
        ("docker.io", ["project-a.azurecr.io/docker-mirror"]),
        ("ghcr.io", ["project-a.azurecr.io/ghcr-mirror"]),
    ]
    assert settings.cache.dir == Path("/var/cache/detour")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETOUR_CACHE__DIR", "/data/detour")
    monkeypatch.setenv("DETOUR_CACHE__TAG_TTL", "2m")
    monkeypatch.setenv("DETOUR_LISTEN", "127.0.0.1:9000")
    settings = load_settings(write(tmp_path, SCENARIO))
    assert settings.cache.dir == Path("/data/detour")
    assert settings.cache.tag_ttl == 120
    assert settings.listen == "127.0.0.1:9000"
    assert len(settings.redirects) == 2  # the rest still comes from the file


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("redirects:\n  - src: docker.io/\n", "redirects.0.to"),
        ("redirects:\n  - src: nats\n    to: m.local/x\n", "redirects.0.src"),
        ("redirects:\n  - src: docker.io\n    to: m.local/UPPER\n", "redirects.0.to"),
        ("cache:\n  tag_ttl: forever\n", "cache.tag_ttl"),
        ("cache:\n  dirr: /x\n", "cache.dirr"),
        ("listen: 0.0.0.0:99999\n", "listen"),
        ("registries:\n  ghcr.io: {username: u}\n", "registries.ghcr.io"),
        ("log_level: loud\n", "log_level"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?m)^  {named}: "):
        load_settings(write(tmp_path, text))


def test_detour_serve_refuses_a_bad_config_at_start(tmp_path: Path) -> None:
    path = write(tmp_path, "cache:\n  tag_ttl: forever\n")
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "cache.tag_ttl" in done.stderr
    assert "Traceback" not in done.stderr
