"""One namespace setting moves every object of deploy/kubernetes, the references between them
included (the webhook's Service, its certificate's names, the peers' DNS name); and the README's
"An overlay of your own" renders as written there.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.webhook.certs import service_names
from tests.kustomize import (
    COMPONENTS,
    HUB_LABELS,
    KUBERNETES,
    PROXY_LABELS,
    WORKLOADS,
    admits,
    cluster_env,
    namespace_labels,
    one,
    peer_service,
    render,
    selects,
    write_overlay,
)

# Label values that say what an object is part of, not where it is.
_PART_OF_LABELS = {"app.kubernetes.io/name", "app.kubernetes.io/part-of"}


def strings(
    value: Any, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every string in a rendered object, with its path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from strings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from strings(item, (*path, index))
    elif isinstance(value, str):
        yield path, value


def namespace_leftovers(objects: list[dict[str, Any]], old: str) -> list[str]:
    """Where the rendered objects still name the namespace ``old``: as a value of its own (a
    namespace field, a selector's value, a list item), inside a DNS name (``<service>.<old>``,
    ``.<old>.svc``) or as a ``<old>/<name>`` reference."""
    found = []
    for o in objects:
        for path, value in strings(o):
            if value == old:
                if path[-1] in _PART_OF_LABELS:
                    continue
                if path == ("metadata", "name") and o["kind"] != "Namespace":
                    continue  # an object called detour (the webhook configuration)
            elif not re.search(rf"\.{old}(\.svc\b|$)|^{old}/", value, re.MULTILINE):
                continue
            found.append(f"{o['kind']} {o['metadata']['name']} {'.'.join(map(str, path))}: {value}")
    return found


def check_namespace(objects: list[dict[str, Any]], namespace: str) -> None:
    """Everything in ``namespace``, and every reference to Detour's namespace points there."""
    assert namespace != "detour"
    assert namespace_leftovers(objects, "detour") == []
    assert one(objects, "Namespace")["metadata"]["name"] == namespace
    for o in objects:
        if o["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
            assert o["metadata"]["namespace"] == namespace, (o["kind"], o["metadata"]["name"])
    # The API server calls the webhook's Service there and checks the certificate's names.
    mwc = one(objects, "MutatingWebhookConfiguration")
    (hook,) = mwc["webhooks"]
    reference = hook["clientConfig"]["service"]
    service = one(objects, "Service", reference["name"])
    assert reference["namespace"] == service["metadata"]["namespace"] == namespace
    certificate = one(objects, "Certificate", "detour-webhook")
    assert certificate["spec"]["dnsNames"] == service_names(reference["name"], namespace)
    annotation = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert annotation == f"{namespace}/{certificate['metadata']['name']}"
    # The webhook skips its own namespace, and only because of what it is, not its old name.
    own = one(objects, "Namespace")
    assert not selects(hook["namespaceSelector"], namespace_labels(own))
    assert selects(hook["namespaceSelector"], namespace_labels("detour"))
    # The ServiceMonitors watch their own namespace; the webhook's serverName is a name its
    # certificate has.
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        assert "namespaceSelector" not in monitor["spec"]
        for endpoint in monitor["spec"]["endpoints"]:
            if "tlsConfig" in endpoint:
                assert endpoint["tlsConfig"]["serverName"] in certificate["spec"]["dnsNames"]
    # The NetworkPolicies admit the proxies of this namespace, not of the old one, and
    # Prometheus from its own.
    proxy_policy = one(objects, "NetworkPolicy", "detour-proxy")
    assert admits(proxy_policy, namespace, PROXY_LABELS, 7439)
    assert not admits(proxy_policy, "detour", PROXY_LABELS, 7439)
    hub_policy = one(objects, "NetworkPolicy", "detour-hub")
    assert admits(hub_policy, namespace, PROXY_LABELS, 7439)
    assert not admits(hub_policy, "detour", HUB_LABELS, 7439)
    # The proxies and the hub find their peers there.
    statefulset = one(objects, "StatefulSet")
    assert peer_service(objects, statefulset, member=True) == "detour-hub"
    assert (
        cluster_env(statefulset)["DETOUR_CLUSTER__PEERS"] == f"dns:detour-hub.{namespace}.svc:7439"
    )


@pytest.mark.parametrize("where", ["an overlay", "the base"])
def test_one_namespace_setting_moves_everything(tmp_path: Path, where: str) -> None:
    """The namespace is set in one place, base/kustomization.yaml, and an overlay's namespace:
    overrides it; either way no object or reference keeps the old one (every component
    included, cert-manager's certificate names too)."""
    if where == "an overlay":
        objects = render(write_overlay(tmp_path / "edge", COMPONENTS, namespace="edge"))
    else:
        copy = tmp_path / "kubernetes"
        shutil.copytree(KUBERNETES, copy)
        base = copy / "base" / "kustomization.yaml"
        text = base.read_text()
        assert text.count("\nnamespace: detour\n") == 1
        base.write_text(text.replace("\nnamespace: detour\n", "\nnamespace: edge\n"))
        overlay = tmp_path / "overlay"
        overlay.mkdir()
        (overlay / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": ["../kubernetes/base"],
                    "components": [f"../kubernetes/components/{c}" for c in COMPONENTS],
                }
            )
        )
        objects = render(overlay)
    check_namespace(objects, "edge")


def readme_overlay() -> str:
    """The README's "An overlay of your own" kustomization, as written there."""
    text = (KUBERNETES / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(# my-cluster/kustomization\.yaml\n.*?)```", text, re.DOTALL)
    return str(block)


def test_the_readme_overlay_of_your_own(tmp_path: Path) -> None:
    """Rendered as the README has it, with its paths pointed at this checkout: the image, the
    namespace (everything follows), the ServiceMonitors' label for kube-prometheus-stack, and
    Prometheus' namespace in the proxies' NetworkPolicy."""
    overlay = tmp_path / "my-cluster"
    overlay.mkdir()
    vendored = os.path.relpath(KUBERNETES, overlay) + "/"
    (overlay / "kustomization.yaml").write_text(
        readme_overlay().replace("../detour/deploy/kubernetes/", vendored)
    )
    shutil.copy(KUBERNETES / "base" / "detour.yaml", overlay / "detour.yaml")
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    objects = render(overlay)

    namespace = kustomization["namespace"]
    assert namespace_leftovers(objects, "detour") == []
    assert {o["metadata"].get("namespace", namespace) for o in objects} == {namespace}
    mwc = one(objects, "MutatingWebhookConfiguration")
    assert mwc["webhooks"][0]["clientConfig"]["service"]["namespace"] == namespace
    certificate = one(objects, "Certificate", "detour-webhook")
    assert certificate["spec"]["dnsNames"] == service_names("detour-webhook", namespace)

    images = {c["image"] for o in objects if o["kind"] in WORKLOADS for c in pod_containers(o)}
    assert images == {"registry.example.com/platform/detour:0.1.0"}

    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    for monitor in monitors:
        labels = monitor["metadata"]["labels"]
        assert labels["release"] == "prometheus"
        assert labels["app.kubernetes.io/name"] == "detour"  # added to, not replaced

    policy = one(objects, "NetworkPolicy", "detour-proxy")
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert admits(policy, "observability", prometheus, 7439)
    assert not admits(policy, "monitoring", prometheus, 7439)
    assert admits(policy, namespace, PROXY_LABELS, 7439)


def pod_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]
