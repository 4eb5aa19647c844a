"""Redirect rules: longest src wins, whole components, mirrors in order, origin fallback."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.reference import ImageName
from proxy.settings import Settings
from proxy.upstream.rules import Rules, describe_resolution

SCENARIO: list[dict[str, Any]] = [
    {"src": "docker.io/", "to": "project-a.azurecr.io/docker-mirror/"},
    {"src": "ghcr.io/", "to": "project-a.azurecr.io/ghcr-mirror/"},
    {"src": "docker.io/library/", "to": "mirror/docker-mirror/"},  # the kuik proposal
    {
        "src": "quay.io/",
        "to": ["mirror-a.local:5000/quay/", "mirror-b.local/quay"],
        "fallback_to_origin": True,
    },
    {"src": "registry.local:5000/team/app", "to": "mirror.local/app"},
]


def upstreams(name: str, rules: list[dict[str, Any]] = SCENARIO) -> list[str]:
    settings = Settings.model_validate(
        {"redirects": rules, "registries": {"mirror-a.local:5000": {"insecure": True}}}
    )
    route = Rules.from_settings(settings).route(ImageName.parse(name))
    return [f"{u.base_url}{' (origin)' if u.origin else ''}" for u in route.upstreams]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # The longest src wins: docker.io/library/ beats docker.io/.
        ("nats", ["https://mirror/v2/docker-mirror/nats"]),
        (
            "bitnami/redis",
            ["https://project-a.azurecr.io/v2/docker-mirror/bitnami/redis"],
        ),
        (
            "ghcr.io/nats-io/nack",
            ["https://project-a.azurecr.io/v2/ghcr-mirror/nats-io/nack"],
        ),
        (
            "quay.io/prometheus/node-exporter",
            [
                "http://mirror-a.local:5000/v2/quay/prometheus/node-exporter",
                "https://mirror-b.local/v2/quay/prometheus/node-exporter",
                "https://quay.io/v2/prometheus/node-exporter (origin)",
            ],
        ),
        # No rule: the origin. Docker Hub's API host is registry-1.docker.io.
        ("gcr.io/distroless/static", ["https://gcr.io/v2/distroless/static (origin)"]),
        # Whole components only: team/app does not match team/application.
        ("registry.local:5000/team/app", ["https://mirror.local/v2/app"]),
        (
            "registry.local:5000/team/application",
            ["https://registry.local:5000/v2/team/application (origin)"],
        ),
        ("registry.local:5000/team/app/sub", ["https://mirror.local/v2/app/sub"]),
    ],
)
def test_routes(name: str, expected: list[str]) -> None:
    assert upstreams(name) == expected


def test_no_rules_means_the_origin_and_docker_hubs_api_host() -> None:
    assert upstreams("nats", []) == ["https://registry-1.docker.io/v2/library/nats (origin)"]


def test_resolve_explains_the_route() -> None:
    settings = Settings.model_validate({"redirects": SCENARIO})
    text = describe_resolution(settings, "quay.io/prometheus/node-exporter:v1")
    assert "name:   quay.io/prometheus/node-exporter" in text
    lines = [line.strip() for line in text.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
    assert lines == [
        "1. https://mirror-a.local:5000/v2/quay/prometheus/node-exporter/manifests/v1",
        "2. https://mirror-b.local/v2/quay/prometheus/node-exporter/manifests/v1",
        "3. https://quay.io/v2/prometheus/node-exporter/manifests/v1  (origin)",
    ]
