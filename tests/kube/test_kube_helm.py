"""The Helm chart (deploy/helm/detour) installed on the real API server of tests/kube by Helm's
own install action (helm-python-sdk's ``Config.install``, as ``helm install --wait`` does it),
as docs/helm.md says: the namespace made and labelled first, the defaults (path mode, the
webhook's certificate made by Helm), the image the tests build.

The proxy DaemonSet and the webhook Deployment become ready; the API server trusts the webhook
with the Helm-made caBundle, so a new pod's image is rewritten to ``localhost:7439/...``; and
the node pulls that image through the proxy's hostPort, so the pod runs. Uninstalled at the end:
the webhook would otherwise rewrite the other tests' pods.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kube.cluster import Cluster, wait_for
from tests.kube.oci import PAUSE_REPO, PAUSE_TAG, push_detour
from tests.kube.pods import created, pod
from tests.support import ROOT
from tests.test_helm import CHART, helm, merged

RELEASE = "helm-detour"  # its objects: helm-detour-proxy, -webhook, ...; the webhook config too
IMAGE_REPO = "detour/detour"
IMAGE_TAG = "helm"


def rollout_state(cluster: Cluster, namespace: str) -> str:
    """What the workloads and their pods say, for a failure message."""
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False
    ).stdout
    return f"{pods}\n{events[-4000:]}"


def wait_pulled(cluster: Cluster, namespace: str, name: str) -> None:
    """Until the pod runs, its image pulled through Detour; fails with the rollout's state."""

    def running() -> bool:
        phase = cluster.get("pod", "-n", namespace, name)["status"].get("phase")
        return bool(phase == "Running")

    try:
        wait_for("the pod pulled through Detour", running, 180, interval=1)
    except TimeoutError:
        pytest.fail(rollout_state(cluster, namespace), pytrace=False)


def cache_listing(cache: Path) -> str:
    """``detour cache ls`` of a node's cache directory."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "cache", "ls", "--dir", str(cache)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout


@dataclass(frozen=True)
class Installed:
    namespace: str
    cache: Path  # the proxy's hostPath: the node shares the host's file system
    values: dict[str, Any]
    config: Any  # helm_python.Config, bound to the cluster


_pushed: dict[str, str] = {}


def detour_image(cluster: Cluster) -> str:
    """The Detour image the tests build, in the cluster's mirror (pushed once a session)."""
    if cluster.mirror_host not in _pushed:
        image = push_detour(cluster.mirror, IMAGE_REPO, IMAGE_TAG)
        _pushed[cluster.mirror_host] = f"{cluster.mirror_host}/{image.repo}"
    return _pushed[cluster.mirror_host]


@contextlib.contextmanager
def release(
    cluster: Cluster, cache: Path, values: dict[str, Any], name: str = RELEASE
) -> Iterator[Installed]:
    """The chart installed and ready as docs/helm.md says (the namespace made and labelled
    first), with the test's image, a cache under ``cache``, the test registry as plain HTTP,
    and ``values``; uninstalled, its namespace deleted, at the end."""
    # One node has one localhost:7439: another Detour there (the session's ``detour`` fixture,
    # deployed by the tests that sort after these) would keep this proxy from being scheduled.
    others = cluster.get("daemonsets", "-A", "-l", "app.kubernetes.io/component=proxy")
    held = [f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in others["items"]]
    assert not held, f"another Detour holds the node's port 7439: {held}"
    namespace = f"helm-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl(
        "label", "namespace", namespace,
        "detour.io/skip=true", "pod-security.kubernetes.io/enforce=privileged",
    )  # fmt: skip
    values = merged(
        {
            "image": {"repository": detour_image(cluster), "tag": IMAGE_TAG},
            "proxy": {"cache": {"hostPath": str(cache)}},
            "config": {"registries": {cluster.mirror_host: {"insecure": True}}},
        },
        values,
    )
    config = helm().Config(kubeconfig_path=str(cluster.admin), namespace=namespace)
    try:
        try:
            made = config.install(
                CHART, name, values, namespace=namespace, wait="watcher", timeout=600
            )
        except helm().HelmError as exc:
            pytest.fail(f"helm install: {exc}\n{rollout_state(cluster, namespace)}", False)
        assert made["status"] == "deployed", made
        yield Installed(namespace, cache, values, config)
    finally:
        config.uninstall(name, ignore_not_found=True, wait="watcher", timeout=120)
        config.close()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def installed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The release with the chart's defaults, installed and ready."""
    with release(cluster, tmp_path_factory.mktemp("helm-node-cache") / "detour", {}) as made:
        yield made


def test_the_proxy_and_the_webhook_become_ready(cluster: Cluster, installed: Installed) -> None:
    namespace = installed.namespace
    daemonset = cluster.get("daemonset", "-n", namespace, f"{RELEASE}-proxy")
    assert daemonset["status"]["numberReady"] == daemonset["status"]["desiredNumberScheduled"] == 1
    deployment = cluster.get("deployment", "-n", namespace, f"{RELEASE}-webhook")
    assert deployment["status"]["readyReplicas"] == 2
    # The certificate Helm made, in the Secret the webhook mounts, and its CA as the caBundle.
    secret = cluster.get("secret", "-n", namespace, f"{RELEASE}-webhook-tls")
    webhook = cluster.get("mutatingwebhookconfiguration", RELEASE)
    (hook,) = webhook["webhooks"]
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]


def test_a_new_pod_is_rewritten_and_pulls_through_the_proxy(
    cluster: Cluster, installed: Installed
) -> None:
    namespace = f"helm-pods-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    try:
        image = f"{cluster.mirror_host}/{PAUSE_REPO}:{PAUSE_TAG}"
        made = created(cluster, namespace, pod("app", image))
        host, port = cluster.mirror_host.split(":")
        through = f"localhost:7439/{host}_{port}/{PAUSE_REPO}:{PAUSE_TAG}"
        assert [c["image"] for c in made["spec"]["containers"]] == [through]
        wait_pulled(cluster, namespace, "app")
        status = cluster.get("pod", "-n", namespace, "app")["status"]
        (state,) = status["containerStatuses"]
        assert state["image"].endswith(f"{PAUSE_REPO}:{PAUSE_TAG}"), state
        # The proxy fetched it: its cache on the node lists the image.
        listing = cache_listing(installed.cache)
        assert f"{cluster.mirror_host}/{PAUSE_REPO}:{PAUSE_TAG}" in listing, listing
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_an_upgrade_keeps_the_ca_and_the_peer_secret(
    cluster: Cluster, installed: Installed
) -> None:
    """``helm upgrade``: the CA Secret found by ``lookup`` signs a new serving certificate, so
    the caBundle stays; the peers' secret stays as it is."""
    namespace = installed.namespace
    before = cluster.get("secret", "-n", namespace, f"{RELEASE}-webhook-tls")["data"]
    peers_before = cluster.get("secret", "-n", namespace, f"{RELEASE}-peer-secret")["data"]
    release = installed.config.upgrade(
        CHART, RELEASE, installed.values, namespace=namespace, wait="watcher", timeout=300
    )
    assert release["status"] == "deployed", release
    assert release["revision"] == 2
    after = cluster.get("secret", "-n", namespace, f"{RELEASE}-webhook-tls")["data"]
    assert after["ca.crt"] == before["ca.crt"]
    assert after["tls.crt"] != before["tls.crt"]
    (hook,) = cluster.get("mutatingwebhookconfiguration", RELEASE)["webhooks"]
    assert hook["clientConfig"]["caBundle"] == before["ca.crt"]
    # The peers' secret Helm made is kept as it is.
    peers_after = cluster.get("secret", "-n", namespace, f"{RELEASE}-peer-secret")["data"]
    assert peers_after == peers_before
