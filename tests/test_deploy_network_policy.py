"""The NetworkPolicies of deploy/kubernetes, evaluated as the API defines them: who may reach
the proxy pods (Prometheus and the other proxies, nothing else), the webhook (the API server,
from wherever it connects) and the hub (its clients, its peers, Prometheus).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.kustomize import (
    HUB_LABELS,
    OVERLAYS,
    PROMETHEUS_LABELS,
    PROXY_LABELS,
    WEBHOOK_LABELS,
    admits,
    container,
    named,
    one,
    pod_spec,
    selects,
    spec_labels,
)

# Who connects to the proxy pod's port 7439 (not through the hostPort), and whether the proxy's
# NetworkPolicy lets them. The node itself is admitted by the API, not by a rule.
PROXY_CLIENTS = [
    ("Prometheus", "monitoring", PROMETHEUS_LABELS, 7439, True),
    ("another proxy", "detour", PROXY_LABELS, 7439, True),
    ("Prometheus, another port", "monitoring", PROMETHEUS_LABELS, 8080, False),
    ("a pod labelled prometheus elsewhere", "default", PROMETHEUS_LABELS, 7439, False),
    ("another pod in monitoring", "monitoring", {"app.kubernetes.io/name": "grafana"}, 7439, False),
    ("a pod with the proxy's labels elsewhere", "default", PROXY_LABELS, 7439, False),
    ("the webhook", "detour", WEBHOOK_LABELS, 7439, False),
    (
        "a hub pod (the proxies are its clients, never the other way)",
        "detour",
        HUB_LABELS,
        7439,
        False,
    ),
    ("an unlabelled pod in detour", "detour", {}, 7439, False),
    ("a workload", "default", {"app": "web"}, 7439, False),
    ("kube-system", "kube-system", {"k8s-app": "kube-dns"}, 7439, False),
]


@pytest.mark.parametrize("variant", ["default", *OVERLAYS, "all-components"])
def test_the_proxy_network_policy_admits_only_prometheus_and_peers(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    objects = renders[variant]
    policy = one(objects, "NetworkPolicy", "detour-proxy")
    daemonset = one(objects, "DaemonSet")
    spec = policy["spec"]
    # It selects the proxy pods (and only them: not the webhook's).
    assert policy["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    assert spec["podSelector"] == daemonset["spec"]["selector"]
    assert selects(spec["podSelector"], spec_labels(daemonset))
    assert not selects(spec["podSelector"], WEBHOOK_LABELS)
    # Ingress only: egress stays open for DNS, registries, mirrors and their redirects.
    assert spec["policyTypes"] == ["Ingress"]
    # No address ranges: the node is admitted as the pod's own node, nothing by address.
    assert "ipBlock" not in json.dumps(policy)

    (port,) = container(pod_spec(objects, "DaemonSet"), "proxy")["ports"]
    assert port["containerPort"] == 7439
    assert PROXY_LABELS.items() <= spec_labels(daemonset).items()
    for who, namespace, labels, to_port, expected in PROXY_CLIENTS:
        assert admits(policy, namespace, labels, to_port) is expected, who

    # Where ServiceMonitors are installed, the port Prometheus scrapes is the one it may reach.
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor" and named(o, "detour-proxy")]
    for monitor in monitors:
        (endpoint,) = monitor["spec"]["endpoints"]
        service = one(objects, "Service", "detour-proxy-metrics")
        (service_port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        assert service_port["targetPort"] == port["name"]
        assert admits(policy, "monitoring", PROMETHEUS_LABELS, port["containerPort"])


@pytest.mark.parametrize("variant", ["default", "cert-manager", "monitoring", "all-components"])
def test_the_webhook_network_policy_admits_the_api_server_from_anywhere(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    """The API server's source address differs by cluster, and a wrong guess would fail open
    silently, so the webhook's port is open to every source; no other port is."""
    objects = renders[variant]
    policy = one(objects, "NetworkPolicy", "detour-webhook")
    deployment = one(objects, "Deployment")
    spec = policy["spec"]
    assert spec["podSelector"] == deployment["spec"]["selector"]
    assert not selects(spec["podSelector"], PROXY_LABELS)
    assert spec["policyTypes"] == ["Ingress"]
    (port,) = container(pod_spec(objects, "Deployment"), "webhook")["ports"]
    service = one(objects, "Service", "detour-webhook")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    for namespace, labels in [("kube-system", {}), ("default", {"app": "web"}), ("x", {})]:
        assert admits(policy, namespace, labels, port["containerPort"])
        assert not admits(policy, namespace, labels, 7439)


HUB_CLIENTS = [
    ("a node proxy", "detour", PROXY_LABELS, 7439, True),
    ("another hub pod", "detour", HUB_LABELS, 7439, True),
    ("Prometheus", "monitoring", PROMETHEUS_LABELS, 7439, True),
    ("a node proxy, another port", "detour", PROXY_LABELS, 8080, False),
    ("the webhook", "detour", WEBHOOK_LABELS, 7439, False),
    ("a pod with the proxy's labels elsewhere", "default", PROXY_LABELS, 7439, False),
    ("a workload", "default", {"app": "web"}, 7439, False),
]


@pytest.mark.parametrize("variant", ["hub", "all-components"])
def test_the_hub_network_policy_admits_its_clients_and_peers(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    objects = renders[variant]
    policy = one(objects, "NetworkPolicy", "detour-hub")
    statefulset = one(objects, "StatefulSet")
    assert policy["metadata"]["namespace"] == statefulset["metadata"]["namespace"]
    assert policy["spec"]["podSelector"] == statefulset["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert "ipBlock" not in json.dumps(policy)
    for who, namespace, labels, port, expected in HUB_CLIENTS:
        assert admits(policy, namespace, labels, port) is expected, who
    # The proxies' own policy does not select the hub pods: each has its own.
    proxy_policy = one(objects, "NetworkPolicy", "detour-proxy")
    assert not selects(proxy_policy["spec"]["podSelector"], spec_labels(statefulset))
