"""Detour deployed on the test cluster as deploy/kubernetes says, with its image from the mirror.

The default layout (``deploy/kubernetes``: the proxy DaemonSet, the peers' Service, the webhook
Deployment and its MutatingWebhookConfiguration), applied with one overlay of the test's own
that changes only what a user changes: the image (``kustomize edit set image``),
``detour.yaml`` (the mirror, a plain-http registry at an address, in ``registries``), and the
cache's hostPath (in the cluster's folder rather than the machine's /var/cache/detour). The
webhook's certificate is made and installed exactly as deploy/kubernetes/README.md says without
cert-manager: ``detour webhook-certs``, the Secret, and the caBundle ``kubectl patch``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.kube.cluster import Cluster
from tests.kube.oci import push_detour
from tests.kustomize import KUBERNETES
from tests.registry import Registry
from tests.support import ROOT

NAMESPACE = "detour"
IMAGE_REPO = "detour"
IMAGE_TAG = "test"
PREFIX = "localhost:7439"


@dataclass(frozen=True, slots=True)
class Deployed:
    overlay: Path
    image: str  # as the node pulls it: <mirror host>/detour:test


def container_ids(cluster: Cluster, selector: str) -> list[str]:
    """containerd ids of the running containers of the pods ``selector`` picks in detour."""
    pods = cluster.get("pods", "-n", NAMESPACE, "-l", selector)["items"]
    return [
        status["containerID"].removeprefix("containerd://")
        for pod in pods
        for status in pod["status"].get("containerStatuses", [])
        if status.get("containerID")
    ]


def _config(cluster: Cluster) -> str:
    config: dict[str, Any] = yaml.safe_load((KUBERNETES / "base" / "detour.yaml").read_text())
    config["registries"] = {cluster.mirror_host: {"insecure": True}}
    config["cache"]["max_size"] = "2GiB"
    return yaml.safe_dump(config)


def deploy(cluster: Cluster, mirror: Registry, workdir: Path) -> Deployed:
    push_detour(mirror, IMAGE_REPO, IMAGE_TAG)
    image = f"{cluster.mirror_host}/{IMAGE_REPO}"
    cache = {"name": "cache", "hostPath": {"path": str(cluster.dir / "node-cache")}}
    overlay = workdir / "overlay"
    overlay.mkdir(parents=True)
    (overlay / "detour.yaml").write_text(_config(cluster))
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(KUBERNETES, overlay)],
                "images": [{"name": "detour", "newName": image, "newTag": IMAGE_TAG}],
                "configMapGenerator": [
                    {"name": "detour-config", "behavior": "replace", "files": ["detour.yaml"]}
                ],
                # The node's cache folder inside the cluster's own, not the machine's
                # /var/cache/detour: another test cluster on the machine has a node too.
                "patches": [
                    {
                        "patch": json.dumps(
                            {
                                "apiVersion": "apps/v1",
                                "kind": "DaemonSet",
                                "metadata": {"name": "detour-proxy"},
                                "spec": {"template": {"spec": {"volumes": [cache]}}},
                            }
                        )
                    }
                ],
            }
        )
    )
    cluster.kubectl("apply", "-k", str(overlay))
    install_webhook_certificate(cluster, workdir / "webhook-certs")
    for workload in ("deployment/detour-webhook", "daemonset/detour-proxy"):
        cluster.kubectl("-n", NAMESPACE, "rollout", "status", workload, "--timeout=300s")
    return Deployed(overlay, f"{image}:{IMAGE_TAG}")


def install_webhook_certificate(cluster: Cluster, out: Path) -> None:
    """deploy/kubernetes/README.md, "Without cert-manager", command for command."""
    made = subprocess.run(
        [sys.executable, "-m", "proxy", "webhook-certs", "--namespace", NAMESPACE,
         "--service", "detour-webhook", "--out", str(out)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    secret = cluster.kubectl(
        "-n", NAMESPACE, "create", "secret", "generic", "detour-webhook-tls",
        "--type=kubernetes.io/tls", f"--from-file=ca.crt={out / 'ca.crt'}",
        f"--from-file=tls.crt={out / 'tls.crt'}", f"--from-file=tls.key={out / 'tls.key'}",
        "--dry-run=client", "-o", "yaml",
    )  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=secret.stdout)
    patch = [
        {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": made.stdout.strip()}
    ]
    cluster.kubectl(
        "patch", "mutatingwebhookconfiguration", "detour", "--type=json", "-p", json.dumps(patch)
    )
