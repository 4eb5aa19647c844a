"""The webhook as deploy/kubernetes deploys it (``tests.kube.detour``), registered by the shipped
MutatingWebhookConfiguration with the caBundle of ``detour webhook-certs``.

* containers, init containers and an ephemeral container (``kubectl debug``) are rewritten to
  ``localhost:7439/<registry>/<name>``, and the pod runs from there (the node pulls through the
  proxy DaemonSet's hostPort);
* the skip label and annotation, a namespace labelled ``detour.io/skip``, ``kube-system`` and
  Detour's own namespace are left alone;
* with the webhook hung (its containers frozen) or down (scaled to zero), a pod is admitted
  unchanged within the configuration's ``timeoutSeconds``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import yaml

from tests.kube.cluster import Cluster, run, wait_for
from tests.kube.detour import NAMESPACE, PREFIX, Deployed, container_ids
from tests.kube.oci import PAUSE_REPO, PAUSE_TAG
from tests.kube.pods import created, pod, ready_endpoints, wait_running
from tests.kustomize import KUBERNETES

WEBHOOK = "app.kubernetes.io/component=webhook"


@pytest.fixture
def namespace(cluster: Cluster, detour: Deployed) -> Iterator[str]:
    name = f"hook-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


def _pause(cluster: Cluster) -> str:
    return f"{cluster.mirror_host}/{PAUSE_REPO}:{PAUSE_TAG}"


def _path_form(cluster: Cluster) -> str:
    return f"{PREFIX}/{cluster.mirror_host.replace(':', '_')}/{PAUSE_REPO}:{PAUSE_TAG}"


def test_containers_init_and_ephemeral_containers_are_rewritten_and_run(
    cluster: Cluster, namespace: str
) -> None:
    image = _pause(cluster)
    made = created(cluster, namespace, pod("app", image, init_image=image))
    assert made["spec"]["containers"][0]["image"] == _path_form(cluster)
    assert made["spec"]["initContainers"][0]["image"] == _path_form(cluster)
    wait_running(cluster, namespace, "app")

    cluster.kubectl(
        "debug", "-n", namespace, "app", f"--image={image}", "--container=debugger",
        "--attach=false", "--profile=general",
    )  # fmt: skip
    after = cluster.get("pod", "-n", namespace, "app")
    (debugger,) = after["spec"]["ephemeralContainers"]
    assert debugger["image"] == _path_form(cluster)
    assert json.loads(after["metadata"]["annotations"]["detour.io/original-images"]) == {
        "containers/main": image,
        "initContainers/init": image,
    }
    wait_running(cluster, namespace, "app", ephemeral="debugger")


def test_the_skip_label_annotation_and_namespaces_are_honoured(
    cluster: Cluster, namespace: str
) -> None:
    image = _pause(cluster)
    skipped_ns = f"{namespace}-skip"
    cluster.kubectl("create", "namespace", skipped_ns)
    cluster.kubectl("label", "namespace", skipped_ns, "detour.io/skip=true")
    try:
        cases = {
            "label": created(
                cluster, namespace, pod("by-label", image, labels={"detour.io/skip": "true"})
            ),
            "annotation": created(
                cluster,
                namespace,
                pod("by-annotation", image, annotations={"detour.io/skip": "true"}),
            ),
            "namespace": created(cluster, skipped_ns, pod("in-skipped", image)),
            "kube-system": created(cluster, "kube-system", pod(f"{namespace}-sys", image)),
            "control": created(cluster, namespace, pod("rewritten", image)),
        }
    finally:
        cluster.kubectl("delete", "namespace", skipped_ns, "--wait=false")
        cluster.kubectl("delete", "pod", "-n", "kube-system", f"{namespace}-sys", "--wait=false")
    images = {case: made["spec"]["containers"][0]["image"] for case, made in cases.items()}
    assert images == {
        "label": image,
        "annotation": image,
        "namespace": image,
        "kube-system": image,
        "control": _path_form(cluster),
    }
    # Detour's own pods run from the image as written, never through the proxy.
    webhook_pods = cluster.get("pods", "-n", NAMESPACE, "-l", WEBHOOK)["items"]
    assert {p["spec"]["containers"][0]["image"] for p in webhook_pods} == {
        f"{cluster.mirror_host}/detour:test"
    }


def _timeout_seconds() -> int:
    shipped = yaml.safe_load((KUBERNETES / "base" / "webhook-configuration.yaml").read_text())
    seconds: int = shipped["webhooks"][0]["timeoutSeconds"]
    return seconds


def _admitted_unchanged(cluster: Cluster, namespace: str, name: str) -> float:
    """Create a pod; assert its image is as written; how long the create took."""
    image = _pause(cluster)
    started = time.monotonic()
    made = created(cluster, namespace, pod(name, image))
    elapsed = time.monotonic() - started
    assert made["spec"]["containers"][0]["image"] == image
    return elapsed


def test_a_hung_or_absent_webhook_admits_pods_unchanged_within_the_timeout(
    cluster: Cluster, namespace: str
) -> None:
    limit = _timeout_seconds()
    ctr = ["ctr", "--address", str(cluster.containerd_socket), "-n", "k8s.io", "tasks"]
    frozen = container_ids(cluster, WEBHOOK)
    assert len(frozen) == 2
    for container in frozen:  # accepts connections (the kernel does), never answers
        run([*ctr, "pause", container])
    try:
        elapsed = _admitted_unchanged(cluster, namespace, "while-hung")
    finally:
        for container in frozen:
            run([*ctr, "resume", container])
    # The API server waits timeoutSeconds for the webhook, then fails open; kubectl's own
    # round trips come on top (generous for a loaded machine).
    assert limit - 1 <= elapsed < limit + 10, elapsed

    cluster.kubectl("-n", NAMESPACE, "scale", "deployment/detour-webhook", "--replicas=0")
    try:
        cluster.kubectl(
            "-n", NAMESPACE, "wait", "--for=delete", "pod", "-l", WEBHOOK, "--timeout=120s"
        )
        elapsed = _admitted_unchanged(cluster, namespace, "while-down")
        assert elapsed < limit + 10, elapsed
    finally:
        cluster.kubectl("-n", NAMESPACE, "scale", "deployment/detour-webhook", "--replicas=2")
        cluster.kubectl(
            "-n", NAMESPACE, "rollout", "status", "deployment/detour-webhook", "--timeout=180s"
        )
    wait_for(
        "the webhook's endpoints back",
        lambda: len(ready_endpoints(cluster, NAMESPACE, "detour-webhook")) == 2,
        60,
    )
    # And back: rewritten again.
    made = created(cluster, namespace, pod("after", _pause(cluster)))
    assert made["spec"]["containers"][0]["image"] == _path_form(cluster)
