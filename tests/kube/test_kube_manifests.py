"""deploy/kubernetes on a real API server: the default layout and every overlay apply with the
server's own field validation (``--validate=strict``), first client-side, then server-side
(``--server-side``, which fails on a field whose owner would change), and applying again
changes nothing (no object's resourceVersion moves).

Each layout goes into a namespace of its own with a name suffix (one wrapping kustomization),
so they stand side by side and clash neither with each other nor with the later tests' Detour.
cert-manager's Issuer and Certificate and prometheus-operator's ServiceMonitor are registered
as CustomResourceDefinitions of this test's own, with their real group, version, kind and
scope but an open schema (the real CRDs are not packaged anywhere these machines reach), so
for those objects the server checks only what it checks of every object.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.kube.cluster import Cluster
from tests.kustomize import KUBERNETES, OVERLAYS

LAYOUTS = {"default": KUBERNETES} | {name: KUBERNETES / "overlays" / name for name in OVERLAYS}

# (group, kind, plural): what the overlays use beyond Kubernetes itself.
FOREIGN_KINDS = [
    ("cert-manager.io", "Issuer", "issuers"),
    ("cert-manager.io", "Certificate", "certificates"),
    ("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
]


def _crd(group: str, kind: str, plural: str) -> dict[str, object]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def foreign_kinds(cluster: Cluster) -> None:
    crds = [_crd(*kind) for kind in FOREIGN_KINDS]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(crds))
    names = [f"crd/{plural}.{group}" for group, _, plural in FOREIGN_KINDS]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)


def _wrap(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(LAYOUTS[name], folder)],
                "namespace": f"apply-{name}",
                "nameSuffix": f"-{name}",
            }
        )
    )
    return folder


def _versions(cluster: Cluster, folder: Path) -> dict[str, str]:
    """kind/namespace/name -> resourceVersion of every object of the layout."""
    listed = json.loads(cluster.kubectl("get", "-k", str(folder), "-o", "json").stdout)
    versions = {}
    for item in listed["items"]:
        meta = item["metadata"]
        versions[f"{item['kind']}/{meta.get('namespace', '')}/{meta['name']}"] = meta[
            "resourceVersion"
        ]
    return versions


def _apply_twice(cluster: Cluster, folder: Path, *mode: str) -> list[str]:
    """Apply, then again: what the second apply changed (an empty list when nothing)."""
    cluster.kubectl("apply", "-k", str(folder), "--validate=strict", *mode)
    before = _versions(cluster, folder)
    cluster.kubectl("apply", "-k", str(folder), "--validate=strict", *mode)
    after = _versions(cluster, folder)
    assert after.keys() == before.keys()
    return [key for key in before if before[key] != after[key]]


def _check_layout(cluster: Cluster, folder: Path) -> None:
    assert _apply_twice(cluster, folder) == [], "a client-side re-apply changed these"
    # A field the server defaults and the manifest leaves out is owned by kubectl's
    # client-side apply; --server-side then finds it in conflict.
    result = cluster.kubectl(
        "apply", "-k", str(folder), "--validate=strict", "--server-side", check=False
    )
    assert result.returncode == 0, f"server-side apply after client-side:\n{result.stderr}"
    assert _apply_twice(cluster, folder, "--server-side") == [], "a server-side re-apply changed"
    diff = cluster.kubectl("diff", "-k", str(folder), "--server-side", check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr


@pytest.mark.usefixtures("foreign_kinds")
def test_every_layout_applies_client_then_server_side_and_again_changes_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    folders = [_wrap(tmp_path, name) for name in LAYOUTS]
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(lambda folder: _check_layout(cluster, folder), folders))
    finally:
        for folder in folders:  # their pods would wait for an image from docker.io for ever
            cluster.kubectl("delete", "-k", str(folder), "--wait=false", check=False)
