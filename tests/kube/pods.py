"""Pods and Deployments for the cluster tests: made, and waited for as a user would with kubectl."""

from __future__ import annotations

import json
from typing import Any

from tests.kube.cluster import Cluster, wait_for

SLEEP = ["/bin/busybox", "sleep", "3600"]


def pod(
    name: str,
    image: str,
    *,
    init_image: str | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A pod whose container sleeps, with an init container that exits at once if asked."""
    spec: dict[str, Any] = {
        "containers": [{"name": "main", "image": image}],
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 0,
    }
    if init_image is not None:
        spec["initContainers"] = [
            {"name": "init", "image": init_image, "command": ["/bin/busybox", "true"]}
        ]
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def deployment(name: str, image: str, replicas: int) -> dict[str, Any]:
    template = {"metadata": {"labels": {"app": name}}, "spec": pod(name, image)["spec"]}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": template,
        },
    }


def created(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """``kubectl create``: the object as the API server stored it (after the webhooks)."""
    out = cluster.kubectl(
        "create", "-n", namespace, "-f", "-", "-o", "json", input=json.dumps(manifest)
    )
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def _describe(cluster: Cluster, namespace: str) -> str:
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
    events = cluster.kubectl("get", "events", "-n", namespace, check=False).stdout
    return f"{pods}\n{events[-3000:]}"


def wait_running(
    cluster: Cluster, namespace: str, name: str, *, ephemeral: str | None = None, limit: float = 180
) -> None:
    """Until the pod's containers (or its ephemeral container ``ephemeral``) run."""

    def running() -> bool:
        status = cluster.get("pod", "-n", namespace, name)["status"]
        if ephemeral is not None:
            states = [
                s for s in status.get("ephemeralContainerStatuses", []) if s["name"] == ephemeral
            ]
            return bool(states) and "running" in states[0]["state"]
        ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
        return bool(ready) and ready[0]["status"] == "True"

    try:
        wait_for(f"pod {namespace}/{name} running", running, limit, interval=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_describe(cluster, namespace)}") from None


def wait_available(cluster: Cluster, namespace: str, name: str, limit: float = 240) -> None:
    result = cluster.kubectl(
        "-n", namespace, "rollout", "status", f"deployment/{name}", f"--timeout={int(limit)}s",
        check=False, timeout=limit + 30,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}\n{_describe(cluster, namespace)}"


def ready_endpoints(cluster: Cluster, namespace: str, service: str) -> list[str]:
    """The addresses of the Service's ready endpoints, from its EndpointSlices."""
    slices = cluster.get(
        "endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={service}"
    )["items"]
    return sorted(
        address
        for piece in slices
        for endpoint in piece.get("endpoints") or []
        if endpoint.get("conditions", {}).get("ready")
        for address in endpoint["addresses"]
    )
