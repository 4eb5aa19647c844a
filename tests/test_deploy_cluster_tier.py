"""The cluster tier as deploy/kubernetes wires it: in every layout the proxies (or the hub pods)
are each other's peers through a headless Service their NetworkPolicy admits, a renamed install
in another namespace still finds them, the hub runs what the proxies run, and the settings
load as the pods get them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.settings import load_settings
from tests.kustomize import (
    COMBINATIONS,
    COMPONENTS,
    KUBERNETES,
    OVERLAYS,
    POD_IP,
    PROXY_LABELS,
    cluster_env,
    container,
    embedded_config,
    main_port,
    one,
    peer_service,
    pod_env,
    pod_spec,
    render,
    selects,
    spec_labels,
    write_overlay,
)


def variant_components(variant: str) -> list[str]:
    """The components a rendered variant was built with."""
    if variant == "all-components":
        return COMPONENTS
    if variant.startswith("base+"):
        return variant.split("+")[1:]
    if variant == "default":
        return []
    kustomization = yaml.safe_load(
        (KUBERNETES / "overlays" / variant / "kustomization.yaml").read_text()
    )
    return [Path(c).name for c in kustomization.get("components", [])]


@pytest.mark.parametrize("variant", ["default", *OVERLAYS, "all-components", *COMBINATIONS])
def test_the_cluster_tier_is_wired(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    """The proxies are each other's peers; with components/hub the hub pods are, and the proxies
    their clients; with components/host-network alone (the proxies unreachable from each
    other) there are no peers."""
    objects = renders[variant]
    chosen = variant_components(variant)
    daemonset = one(objects, "DaemonSet")
    if "hub" in chosen:
        statefulset = one(objects, "StatefulSet")
        assert peer_service(objects, statefulset, member=True) == "detour-hub"
        assert peer_service(objects, daemonset, member=False) == "detour-hub"
    elif "host-network" in chosen:
        assert cluster_env(daemonset) == {}
    else:
        assert peer_service(objects, daemonset, member=True) == "detour-peers"
    # The proxies' Service is in every variant, over the proxies alone.
    service = one(objects, "Service", "detour-peers")
    assert service["spec"]["selector"] == daemonset["spec"]["selector"]["matchLabels"]


def test_the_proxies_peer_service_and_advertise(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    objects = renders["default"]
    daemonset = one(objects, "DaemonSet")
    service = one(objects, "Service", "detour-peers")
    spec = service["spec"]
    # Headless, ready pods only, and exactly the DaemonSet's pods: not the webhook's.
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is False
    assert selects({"matchLabels": spec["selector"]}, spec_labels(daemonset))
    assert not selects({"matchLabels": spec["selector"]}, spec_labels(one(objects, "Deployment")))
    # Not scraped twice by the monitoring component's ServiceMonitor, which selects by label.
    assert not PROXY_LABELS.items() <= service["metadata"]["labels"].items()
    # advertise: the pod's own IP, from the downward API, and the container port.
    env = container(pod_spec(objects, "DaemonSet"), "proxy")["env"]
    names = [e["name"] for e in env]
    pod_ip = env[names.index("POD_IP")]
    assert pod_ip["valueFrom"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}
    advertise = env[names.index("DETOUR_CLUSTER__ADVERTISE")]
    assert advertise["value"] == "$(POD_IP):7439"
    assert names.index("POD_IP") < names.index("DETOUR_CLUSTER__ADVERTISE")
    # peers: the Service's name (kustomize keeps it in step), in the pod's own namespace.
    assert env[names.index("PEERS_SERVICE")]["value"] == service["metadata"]["name"]
    assert cluster_env(daemonset)["DETOUR_CLUSTER__PEERS"] == "dns:detour-peers.detour.svc:7439"


@pytest.mark.parametrize("components", [[], ["hub"]])
def test_a_renamed_install_in_another_namespace_still_finds_its_peers(
    tmp_path: Path, components: list[str]
) -> None:
    """An overlay's namePrefix renames the Service and its namespace moves it; a name written
    out in detour.yaml would then resolve to nothing (or to another install's proxies)."""
    objects = render(
        write_overlay(tmp_path / "renamed", components, namePrefix="site-", namespace="edge")
    )
    daemonset = one(objects, "DaemonSet")
    assert daemonset["metadata"]["namespace"] == "edge"
    if components:
        statefulset = one(objects, "StatefulSet")
        assert peer_service(objects, statefulset, member=True) == "site-detour-hub"
        assert peer_service(objects, daemonset, member=False) == "site-detour-hub"
        assert statefulset["spec"]["serviceName"] == "site-detour-hub"
    else:
        assert peer_service(objects, daemonset, member=True) == "site-detour-peers"


def test_the_hub(renders: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    objects = renders["hub"]
    statefulset = one(objects, "StatefulSet", "detour-hub")
    daemonset = one(objects, "DaemonSet")
    service = one(objects, "Service", "detour-hub")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert statefulset["spec"]["replicas"] >= 2  # an owner can go away
    spec = pod_spec(objects, "StatefulSet")
    hub = container(spec, "hub")
    proxy = container(pod_spec(objects, "DaemonSet"), "proxy")
    # What the proxies run: the image and the config, whatever the base's generator named it.
    assert hub["image"] == proxy["image"]
    assert hub["args"] == proxy["args"]
    configs = {
        name: next(v for v in s["volumes"] if v["name"] == "config")
        for name, s in (("hub", spec), ("proxy", pod_spec(objects, "DaemonSet")))
    }
    assert configs["hub"] == configs["proxy"]
    # The cache: a PersistentVolumeClaim per pod, mounted where the config puts the cache, and
    # larger than cache.max_size.
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    settings = load_settings(embedded_config(objects, tmp_path))
    (mount,) = [m for m in hub["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == str(settings.cache.dir)
    assert claim["metadata"]["name"] not in {v["name"] for v in spec["volumes"]}
    max_size = pod_env(statefulset)["DETOUR_CACHE__MAX_SIZE"]
    assert size_bytes(max_size) < size_bytes(claim["spec"]["resources"]["requests"]["storage"])
    # No hostPort, no hostPath, no root: only the proxy needs those.
    assert "hostPort" not in main_port(statefulset)
    assert all("hostPath" not in v for v in spec["volumes"])
    assert "initContainers" not in spec
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
    assert hub["securityContext"]["readOnlyRootFilesystem"] is True
    assert hub["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # Drains take one hub pod at a time.
    pdb = one(objects, "PodDisruptionBudget", "detour-hub")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == statefulset["spec"]["selector"]
    # The node proxies: the hub's clients, still caching on their node.
    assert peer_service(objects, daemonset, member=False) == "detour-hub"
    assert one(objects, "Service", "detour-peers")  # unused here, and harmless
    cache = next(v for v in pod_spec(objects, "DaemonSet")["volumes"] if v["name"] == "cache")
    assert cache["hostPath"]["path"] == "/var/cache/detour"


def size_bytes(text: str) -> float:
    """``80GiB`` or ``100Gi``, in bytes."""
    match = re.fullmatch(r"([0-9]+)([KMGT])i(?:B)?", text)
    assert match, text
    return int(match[1]) * 1024.0 ** ("KMGT".index(match[2]) + 1)


@pytest.mark.parametrize(
    ("variant", "kind", "peers"),
    [
        ("default", "DaemonSet", "dns:detour-peers.detour.svc:7439"),
        ("hub", "DaemonSet", "dns:detour-hub.detour.svc:7439"),
        ("hub", "StatefulSet", "dns:detour-hub.detour.svc:7439"),
    ],
)
def test_the_cluster_settings_load_as_the_pods_get_them(
    renders: dict[str, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
    kind: str,
    peers: str,
) -> None:
    """The ConfigMap's config with the pod's DETOUR_* variables, as `detour serve` reads them."""
    objects = renders[variant]
    for name, value in pod_env(one(objects, kind)).items():
        if name.startswith("DETOUR_"):
            monkeypatch.setenv(name, value)
    settings = load_settings(embedded_config(objects, tmp_path))
    assert settings.cluster.peers == peers
    assert settings.cluster.advertise == f"{POD_IP}:7439"
    assert settings.cluster.refresh == 10.0
