"""The webhook's pure parts, table by table: the image rewrite, the plan for a pod (what is
skipped and why), the JSONPatch, the settings as a policy, and the bound on what parsing a
review's JSON takes. No server runs here.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from proxy.settings import ConfigError, WebhookSettings, load_settings
from proxy.webhook import rewrite_image
from proxy.webhook.review import parse_cost
from proxy.webhook.rewrite import (
    ORIGINAL_IMAGES_ANNOTATION,
    ImageRewrite,
    Policy,
    build_patch,
    plan_pod,
)
from proxy.webhook.server import MAX_EXPANSION
from tests.webhook_harness import (
    DIGEST,
    HEX,
    PREFIX,
    MiB,
    apply_patch,
    kube_review,
    nested_lists,
    pod,
)

# --- The test's own JSONPatch applier ---------------------------------------------------------


def test_apply_patch_refuses_adding_under_a_missing_object() -> None:
    with pytest.raises(KeyError):
        apply_patch(
            {"metadata": {}}, [{"op": "add", "path": "/metadata/annotations/a", "value": 1}]
        )


# --- Normalization and rewrite ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("nats:2.10.26-alpine", f"{PREFIX}/docker.io/library/nats:2.10.26-alpine"),
        ("library/postgres:16", f"{PREFIX}/docker.io/library/postgres:16"),
        ("busybox", f"{PREFIX}/docker.io/library/busybox:latest"),
        ("docker.io/nats", f"{PREFIX}/docker.io/library/nats:latest"),
        ("index.docker.io/bitnami/redis:7", f"{PREFIX}/docker.io/bitnami/redis:7"),
        ("ghcr.io/nats-io/nack:0.17.0", f"{PREFIX}/ghcr.io/nats-io/nack:0.17.0"),
        ("registry.local:5000/team/app:v1", f"{PREFIX}/registry.local_5000/team/app:v1"),
        ("localhost:5000/app", f"{PREFIX}/localhost_5000/app:latest"),
        ("registry:5000/app", f"{PREFIX}/registry_5000/app:latest"),
        ("registry.team-2/app:v1", f"{PREFIX}/registry.team-2/app:v1"),
        ("mirror.corp-01/x:1", f"{PREFIX}/mirror.corp-01/x:1"),
        ("svc.ns-2/app:v1", f"{PREFIX}/svc.ns-2/app:v1"),
        ("Quay.IO/x/y:1", f"{PREFIX}/quay.io/x/y:1"),
        (
            f"quay.io/prometheus/node-exporter@{DIGEST}",
            f"{PREFIX}/quay.io/prometheus/node-exporter@{DIGEST}",
        ),
        (f"nats:2.10@{DIGEST}", f"{PREFIX}/docker.io/library/nats:2.10@{DIGEST}"),
        (f"{PREFIX}/docker.io/library/redis:7", f"{PREFIX}/docker.io/library/redis:7"),
        (f"{PREFIX}/anything/at/all", f"{PREFIX}/anything/at/all"),
    ],
)
def test_rewrite_image(image: str, expected: str) -> None:
    assert rewrite_image(image, PREFIX) == expected
    assert rewrite_image(expected, PREFIX) == expected  # a second pass changes nothing


@pytest.mark.parametrize(
    "image",
    [
        "",
        "Nats:1",  # upper case repository
        "nats:bad tag",
        "nats@sha256:abc",  # short digest
        "nats@md5:0123456789abcdef0123456789abcdef",  # unsupported algorithm
        "[::1]:5000/app:v1",  # an IPv6 registry cannot be spelled in path mode
        "nats:",
    ],
)
def test_rewrite_image_refuses_what_does_not_parse(image: str) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        rewrite_image(image, PREFIX)


def test_rewrite_keeps_digest_bytes() -> None:
    out = rewrite_image(f"quay.io/x/y:v1@{DIGEST}", "cache.example:443")
    assert out == f"cache.example:443/quay.io/x/y:v1@{DIGEST}"
    assert out.endswith(HEX)


# --- Planning: what is skipped and why --------------------------------------------------------


POLICY = Policy(
    prefix=PREFIX,
    ignore_namespaces=frozenset({"kube-system", "detour"}),
    ignore_images=(),
    accept_images=(),
)


def _plan_summary(plan_: Any) -> tuple[Any, list[str], list[str]]:
    return (
        plan_.skip,
        [r.image for r in plan_.rewrites],
        [f"{s.image}:{s.reason}" for s in plan_.skipped_images],
    )


@pytest.mark.parametrize(
    ("case", "namespace", "policy", "expected"),
    [
        ("kube-system", "kube-system", POLICY, ("namespace", [], [])),
        ("own namespace", "detour", POLICY, ("namespace", [], [])),
        (
            "plain",
            "default",
            POLICY,
            (None, [f"{PREFIX}/docker.io/library/nats:1"], ["BAD:invalid_image"]),
        ),
        (
            "ignored",
            "default",
            Policy(prefix=PREFIX, ignore_images=(re.compile(r"^docker\.io/"),)),
            (None, [], ["nats:1:ignored_image", "BAD:invalid_image"]),
        ),
        (
            "ignored as written",
            "default",
            Policy(prefix=PREFIX, ignore_images=(re.compile(r"^nats:"),)),
            (None, [], ["nats:1:ignored_image", "BAD:invalid_image"]),
        ),
        (
            "accepted",
            "default",
            Policy(prefix=PREFIX, accept_images=(re.compile(r"ghcr\.io"),)),
            (None, [], ["nats:1:not_accepted", "BAD:invalid_image"]),
        ),
        (
            "accepted normalized",
            "default",
            Policy(prefix=PREFIX, accept_images=(re.compile(r"/library/nats:"),)),
            (None, [f"{PREFIX}/docker.io/library/nats:1"], ["BAD:invalid_image"]),
        ),
    ],
)
def test_plan_pod(case: str, namespace: str, policy: Policy, expected: Any) -> None:
    assert _plan_summary(plan_pod(pod("nats:1", "BAD"), namespace, policy)) == expected, case


@pytest.mark.parametrize(
    ("subject", "reason"),
    [
        (pod("nats:1", labels={"detour.io/skip": "true"}), "opt_out_label"),
        (pod("nats:1", annotations={"detour.io/skip": "True"}), "opt_out_annotation"),
        (pod("nats:1", labels={"detour.io/skip": "false"}), None),
        (pod("nats:1", annotations={"kubernetes.io/config.mirror": "0f3c"}), "mirror_pod"),
    ],
)
def test_plan_pod_opt_out(subject: dict[str, Any], reason: str | None) -> None:
    assert plan_pod(subject, "default", POLICY).skip == reason


def test_plan_pod_on_update_leaves_images_the_update_did_not_change() -> None:
    old = pod("nats:1", "redis:7")
    new = pod("nats:1", "redis:7")
    new["spec"]["ephemeralContainers"] = [{"name": "debug", "image": "busybox"}]
    plan_ = plan_pod(new, "default", POLICY, old_pod=old)
    assert [(r.key, r.image) for r in plan_.rewrites] == [
        ("ephemeralContainers/debug", f"{PREFIX}/docker.io/library/busybox:latest")
    ]


def test_plan_pod_refuses_a_pod_that_is_not_one() -> None:
    with pytest.raises(TypeError, match="spec"):
        plan_pod({"spec": []}, "default", POLICY)


# --- Patch building ---------------------------------------------------------------------------

NATS = ImageRewrite("containers", 0, "nats", "nats:1", f"{PREFIX}/docker.io/library/nats:1")
INIT = ImageRewrite(
    "initContainers", 0, "init", "busybox", f"{PREFIX}/docker.io/library/busybox:latest"
)
KEY = "detour.io~1original-images"


@pytest.mark.parametrize(
    ("metadata", "rewrites", "expected_tail", "recorded"),
    [
        pytest.param(
            {"name": "p"},
            [NATS],
            [
                {
                    "op": "add",
                    "path": "/metadata/annotations",
                    "value": {ORIGINAL_IMAGES_ANNOTATION: '{"containers/nats":"nats:1"}'},
                }
            ],
            {"containers/nats": "nats:1"},
            id="no annotations: add the whole object",
        ),
        pytest.param(
            None,
            [NATS],
            [
                {
                    "op": "add",
                    "path": "/metadata",
                    "value": {
                        "annotations": {ORIGINAL_IMAGES_ANNOTATION: '{"containers/nats":"nats:1"}'}
                    },
                }
            ],
            {"containers/nats": "nats:1"},
            id="no metadata at all",
        ),
        pytest.param(
            {"annotations": {"team": "a"}},
            [NATS, INIT],
            [
                {
                    "op": "add",
                    "path": f"/metadata/annotations/{KEY}",
                    "value": '{"containers/nats":"nats:1","initContainers/init":"busybox"}',
                }
            ],
            {"containers/nats": "nats:1", "initContainers/init": "busybox"},
            id="annotations present: add one member, key escaped",
        ),
        pytest.param(
            {"annotations": {ORIGINAL_IMAGES_ANNOTATION: '{"containers/old":"nats:0"}'}},
            [NATS],
            [
                {
                    "op": "add",
                    "path": f"/metadata/annotations/{KEY}",
                    "value": '{"containers/nats":"nats:1","containers/old":"nats:0"}',
                }
            ],
            {"containers/nats": "nats:1", "containers/old": "nats:0"},
            id="earlier record kept and merged",
        ),
        pytest.param(
            {"annotations": {ORIGINAL_IMAGES_ANNOTATION: "not json"}},
            [NATS],
            [
                {
                    "op": "add",
                    "path": f"/metadata/annotations/{KEY}",
                    "value": '{"containers/nats":"nats:1"}',
                }
            ],
            {"containers/nats": "nats:1"},
            id="unreadable record replaced",
        ),
        pytest.param(
            {"annotations": {ORIGINAL_IMAGES_ANNOTATION: "[" * 100_000 + "]" * 100_000}},
            [NATS],
            [
                {
                    "op": "add",
                    "path": f"/metadata/annotations/{KEY}",
                    "value": '{"containers/nats":"nats:1"}',
                }
            ],
            {"containers/nats": "nats:1"},
            id="record nested too deeply to read replaced",
        ),
    ],
)
def test_build_patch(
    metadata: dict[str, Any] | None,
    rewrites: list[ImageRewrite],
    expected_tail: list[dict[str, Any]],
    recorded: dict[str, str],
) -> None:
    subject: dict[str, Any] = {
        "spec": {
            "initContainers": [{"name": "init", "image": "busybox"}],
            "containers": [{"name": "nats", "image": "nats:1"}],
        }
    }
    if metadata is not None:
        subject["metadata"] = metadata
    patch = build_patch(subject, rewrites)
    replaces = [
        {"op": "replace", "path": f"/spec/{r.field}/{r.index}/image", "value": r.image}
        for r in rewrites
    ]
    assert patch == [*replaces, *expected_tail]
    result = apply_patch(subject, [dict(op) for op in patch])
    assert result["spec"]["containers"][0]["image"] == NATS.image
    assert json.loads(result["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION]) == recorded
    for name, value in (metadata or {}).get("annotations", {}).items():
        if name != ORIGINAL_IMAGES_ANNOTATION:
            assert result["metadata"]["annotations"][name] == value


def test_build_patch_without_rewrites_is_empty() -> None:
    assert build_patch(pod("nats:1"), []) == []


# --- Settings ---------------------------------------------------------------------------------


def test_settings_defaults_and_own_namespace() -> None:
    hook = WebhookSettings()
    assert (hook.listen, hook.prefix, hook.ignore_namespaces) == (
        "0.0.0.0:8443",
        "localhost:7439",
        ["kube-system"],
    )
    policy = Policy.from_settings(hook, {"POD_NAMESPACE": "detour-system"})
    assert policy.ignore_namespaces == {"kube-system", "detour-system"}
    policy = Policy.from_settings(WebhookSettings(namespace="mine"), {"POD_NAMESPACE": "x"})
    assert policy.ignore_namespaces == {"kube-system", "mine"}
    assert Policy.from_settings(hook, {}).ignore_namespaces == {"kube-system"}
    assert (hook.max_body, hook.max_concurrent) == (4 * MiB, 8)


def test_settings_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "detour.yaml"
    config.write_text(
        "webhook:\n"
        "  listen: 127.0.0.1:9443\n"
        "  prefix: Detour.Local:7439/\n"
        "  tls_reload_interval: 2s\n"
        "  ignore_namespaces: [kube-system, monitoring]\n"
        "  ignore_images: ['^registry\\.internal/']\n"
        "  accept_images: ['docker\\.io/', 'ghcr\\.io/']\n"
        "  max_body: 2.5MiB\n"
        "  max_concurrent: 3\n"
    )
    hook = load_settings(config).webhook
    assert (hook.max_body, hook.max_concurrent) == (int(2.5 * MiB), 3)
    assert hook.prefix == "detour.local:7439"
    assert hook.tls_reload_interval == 2.0
    assert hook.ignore_namespaces == ["kube-system", "monitoring"]
    assert hook.ignore_images[0].search("registry.internal/x:1")
    assert [p.pattern for p in hook.accept_images] == ["docker\\.io/", "ghcr\\.io/"]


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("webhook:\n  ignore_images: ['([']\n", "webhook.ignore_images.0"),
        ("webhook:\n  prefix: https://detour:7439\n", "without scheme or path"),
        ("webhook:\n  prefix: detour\n", "needs a '.'"),
        ("webhook:\n  prefix: localhost:7439/sub\n", "webhook.prefix"),
        ("webhook:\n  tls_reload_interval: soon\n", "webhook.tls_reload_interval"),
        ("webhook:\n  ignore_namespace: [x]\n", "webhook.ignore_namespace"),
        ("webhook:\n  max_body: 0\n", "webhook.max_body"),
        ("webhook:\n  max_body: lots\n", "webhook.max_body"),
        ("webhook:\n  max_concurrent: 0\n", "webhook.max_concurrent"),
    ],
)
def test_settings_refuse_bad_values(tmp_path: Path, yaml: str, message: str) -> None:
    config = tmp_path / "detour.yaml"
    config.write_text(yaml)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(config)


# --- Parse cost: what parsing a review's JSON can take ----------------------------------------


def test_kube_review_is_as_large_as_asked() -> None:
    body = kube_review(256 * 1024)
    assert 250 * 1024 < len(body) <= 256 * 1024


SHAPES = {
    "lists in lists": nested_lists(256 * 1024),
    "dicts in dicts": "[" + ",".join(['{"":' * 300 + "{}" + "}" * 300] * 100) + "]",
    "empty dicts": "[" + ",".join(["{}"] * 80_000) + "]",
    "one-key dicts": "[" + ",".join(['{"":0}'] * 40_000) + "]",
    "short strings": "[" + ",".join(['"ab"'] * 50_000) + "]",
    "unique keys": "{" + ",".join(f'"{i:x}":0' for i in range(30_000)) + "}",
    "ints": "[" + ",".join(["-6"] * 80_000) + "]",
    "floats": "[" + ",".join(["1e0"] * 60_000) + "]",
    # One character outside the BMP makes its whole string 4 bytes a character.
    "UCS-4 strings": json.dumps(["\U0001f600" + "a" * 1000] * 250, ensure_ascii=False),
    "UCS-4 by escapes": json.dumps(["\U0001f600" + "a" * 1000] * 250),
    "a pod": kube_review(256 * 1024).decode(),
}


@pytest.mark.parametrize("text", SHAPES.values(), ids=SHAPES.keys())
def test_parse_cost_bounds_what_parsing_takes(text: str) -> None:
    body = text.encode()
    tracemalloc.start()
    try:
        parsed = json.loads(body.decode())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del parsed
    assert peak <= parse_cost(body)


def test_parse_cost_admits_every_review_the_api_server_sends() -> None:
    body = kube_review(256 * 1024)
    # An ASCII pod is parsed up to max_body; the API server sends at most about 3 MiB, and a
    # pod with any other character (parse_cost assumes 4 bytes each then) is parsed up to that.
    assert parse_cost(body) / len(body) <= MAX_EXPANSION
    wide = body.replace(b'"value-1"', '"välue-1"'.encode())
    assert parse_cost(wide) / len(wide) <= MAX_EXPANSION * 4 / 3
