"""Settings: YAML plus DETOUR_* overrides; a bad file is refused naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.settings import ConfigError, load_settings, unknown_environment

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
    monkeypatch.setenv("DETOUR_CACHE__READ_BACK_UP_TO", "0")  # 0 turns it off
    monkeypatch.setenv("DETOUR_LISTEN", "127.0.0.1:9000")
    settings = load_settings(write(tmp_path, SCENARIO))
    assert settings.cache.dir == Path("/data/detour")
    assert settings.cache.tag_ttl == 120
    assert settings.cache.read_back_up_to == 0
    assert settings.listen == "127.0.0.1:9000"
    assert len(settings.redirects) == 2  # the rest still comes from the file


@pytest.mark.parametrize(
    ("text", "line", "named"),
    [
        ("redirects:\n  - src: docker.io/\n", 2, "redirects.0.to"),
        ("redirects:\n  - src: nats\n    to: m.local/x\n", 2, "redirects.0.src"),
        ("redirects:\n  - src: docker.io\n    to: m.local/UPPER\n", 3, "redirects.0.to"),
        ("cache:\n  tag_ttl: forever\n", 2, "cache.tag_ttl"),
        ("cache:\n  read_back_up_to: -1\n", 2, "cache.read_back_up_to"),
        ("cache:\n  dirr: /x\n", 2, "cache.dirr"),
        ("listen: 0.0.0.0:99999\n", 1, "listen"),
        ("registries:\n  ghcr.io: {username: u}\n", 2, "registries.ghcr.io"),
        ("log_level: loud\n", 1, "log_level"),
    ],
)
def test_bad_config_names_the_file_line_and_key(
    tmp_path: Path, text: str, line: int, named: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/detour.yaml:{line}: {named}: "):
        load_settings(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "cache:\n\tdir: /x\n",
            "detour.yaml:2: found character '\\t' that cannot start any "
            "token (YAML is indented with spaces, not tabs)",
        ),
        (
            "- a\n- b\n",
            "detour.yaml:1: expected settings (key: value) at the top level, not a list",
        ),
        ("cache:\n  dir: [x\n", "detour.yaml:3: expected ',' or ']', but got '<stream end>'"),
        ("cache:\n  dri: /x\n", "detour.yaml:2: cache.dri: unknown setting; did you mean 'dir'?"),
        (
            "upstrem:\n  read_timeout: 5s\n",
            "detour.yaml:1: upstrem: unknown setting; did you mean 'upstream'?",
        ),
    ],
)
def test_unreadable_config_is_one_line_with_its_line(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert str(caught.value) == f"{tmp_path}/{message}"


def test_a_bad_environment_variable_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETOUR_REDIRECTS", "[{")
    with pytest.raises(ConfigError, match=r"^environment DETOUR_REDIRECTS: not valid JSON: "):
        load_settings(write(tmp_path, SCENARIO))
    monkeypatch.delenv("DETOUR_REDIRECTS")
    monkeypatch.setenv("DETOUR_CACHE__TAG_TTL", "forever")
    with pytest.raises(ConfigError, match=r"^environment DETOUR_CACHE__TAG_TTL: cache.tag_ttl: "):
        load_settings(write(tmp_path, SCENARIO))


def test_environment_variables_that_set_nothing_are_named_with_the_nearest() -> None:
    environ = {
        "DETOUR_CACHE_DIR": "/data",  # one underscore: ignored by pydantic, so said here
        "DETOUR_LISTN": "0.0.0.0:7439",
        "DETOUR_CACHE__DIR": "/data",
        "DETOUR_REGISTRIES__GHCR.IO__INSECURE": "true",
        "DETOUR_PEERS_SERVICE_HOST": "10.96.0.10",  # Kubernetes' service links: not ours
        "DETOUR_PORT_7439_TCP_ADDR": "10.96.0.11",
        "HOME": "/root",
    }
    assert unknown_environment(environ) == [
        "environment DETOUR_CACHE_DIR sets no setting; did you mean DETOUR_CACHE__DIR?",
        "environment DETOUR_LISTN sets no setting; did you mean DETOUR_LISTEN?",
    ]


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "listen: 7440\n",
            "1: listen: a port alone; write 0.0.0.0:7440 (every address) or 127.0.0.1:7440 "
            "(this machine only)",
        ),
        (
            "listen: http://127.0.0.1:7440\n",
            "1: listen: an address to listen on, not a URL; write 127.0.0.1:7440",
        ),
        (
            "webhook:\n  listen: https://0.0.0.0:8443/\n",
            "2: webhook.listen: an address to listen on, not a URL; write 0.0.0.0:8443",
        ),
        (
            "redirects:\n  - src: docker.io/\n    to: http://10.0.0.5:5000/hub/\n",
            "3: redirects.0.to: a rule names host/path without a scheme; write 10.0.0.5:5000/hub/, "
            "and for plain HTTP set registries.10.0.0.5:5000.insecure: true",
        ),
        (
            "redirects:\n  - src: https://docker.io/\n    to: mirror.gcr.io/\n",
            "2: redirects.0.src: a rule names host/path without a scheme; write docker.io/",
        ),
    ],
    ids=["port-alone", "listen-url", "webhook-listen-url", "to-http", "src-https"],
)
def test_a_setting_written_the_wrong_way_is_refused_with_what_to_write(
    tmp_path: Path, text: str, message: str
) -> None:
    """At config check, before anything starts: each message says what to write instead."""
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert str(caught.value) == f"{tmp_path}/detour.yaml:{message}"


def test_a_port_alone_in_the_environment_is_refused_with_what_to_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DETOUR_LISTEN", "7440")
    with pytest.raises(ConfigError, match=r"^environment DETOUR_LISTEN: listen: a port alone; "):
        load_settings(None)
