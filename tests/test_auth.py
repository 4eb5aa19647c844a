"""WWW-Authenticate parsing and docker config.json credentials."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from proxy.settings import ConfigError, RegistrySettings
from proxy.upstream.auth import Challenge, CredentialStore, load_docker_config, parse_challenges

HUB = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:library/nats:pull"'
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            HUB,
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/nats:pull",
                    },
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        # Scopes hold commas; quoted strings keep them, and escapes are undone.
        (
            'Bearer realm="a\\"b", scope="repository:x:pull,push"',
            [Challenge("bearer", {"realm": 'a"b', "scope": "repository:x:pull,push"})],
        ),
        # Two challenges in one header; parameter names are case-insensitive.
        (
            'Bearer Realm="https://t/x",error="invalid_token", Basic realm="y"',
            [
                Challenge("bearer", {"realm": "https://t/x", "error": "invalid_token"}),
                Challenge("basic", {"realm": "y"}),
            ],
        ),
        (
            "Bearer realm=unquoted,service=svc",
            [Challenge("bearer", {"realm": "unquoted", "service": "svc"})],
        ),
        ("Negotiate abc==", [Challenge("negotiate", {"token68": "abc=="})]),
        ("Bearer", [Challenge("bearer", {})]),
        # Garbage never raises: the header comes from a remote server.
        ("", []),
        (",,,", []),
        ('Bearer realm="unterminated', [Challenge("bearer", {"realm": "unterminated"})]),
        ("Bearer @@@ realm=x", [Challenge("bearer", {})]),
    ],
)
def test_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


def _write_config(tmp_path: Path, auths: dict[str, object]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


def test_docker_config_credentials(tmp_path: Path) -> None:
    encoded = base64.b64encode(b"hubuser:hub:pass").decode()
    path = _write_config(
        tmp_path,
        {
            "https://index.docker.io/v1/": {"auth": encoded},
            "https://Ghcr.io": {"username": "gh", "password": "tok"},
            "registry.local:5000": {"auth": base64.b64encode(b"r:p").decode()},
        },
    )
    found = load_docker_config(path)
    assert {k: (c.username, c.password) for k, c in found.items()} == {
        "docker.io": ("hubuser", "hub:pass"),
        "ghcr.io": ("gh", "tok"),
        "registry.local:5000": ("r", "p"),
    }
    # A password never shows in a repr (and so in a log line).
    assert "hub:pass" not in repr(found["docker.io"])


def test_settings_credentials_win_over_docker_config(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"ghcr.io": {"username": "old", "password": "old"}})
    store = CredentialStore(
        {"ghcr.io": RegistrySettings(username="new", password="secret")},  # type: ignore[arg-type]
        path,
    )
    creds = store.lookup("ghcr.io")
    assert creds is not None
    assert (creds.username, creds.password) == ("new", "secret")
    assert store.lookup("quay.io") is None


def test_bad_docker_config_is_refused(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"ghcr.io": {"auth": "%%%not-base64"}})
    with pytest.raises(ValueError, match="not base64"):
        load_docker_config(path)


def test_a_pull_secret_may_appear_later_and_rotate(tmp_path: Path) -> None:
    path = tmp_path / "config.json"  # an optional Secret, not there yet
    store = CredentialStore({}, path)
    assert store.lookup("ghcr.io") is None
    _write_config(tmp_path, {"ghcr.io": {"username": "a", "password": "1"}})
    store._checked = 0.0  # don't wait out the reload interval
    creds = store.lookup("ghcr.io")
    assert creds is not None
    assert (creds.username, creds.password) == ("a", "1")
    _write_config(tmp_path, {"ghcr.io": {"username": "b", "password": "22"}})
    store._checked = 0.0
    creds = store.lookup("ghcr.io")
    assert creds is not None
    assert (creds.username, creds.password) == ("b", "22")


def test_an_unreadable_pull_secret_is_a_config_error_at_start(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="docker_config"):
        CredentialStore({}, path)
