"""The proxy as the DaemonSet on hostPort 127.0.0.1:7439, as the node's kubelet and containerd
use it (``tests.kube.detour`` deploys it as deploy/kubernetes says).

* Path mode: a Deployment of 3 replicas of an image from the mirror is rewritten by the
  webhook to ``localhost:7439/...`` and runs; the mirror saw only Detour's requests.
* Offline: with the mirror stopped and the image removed from the node (CRI ``RemoveImage``,
  as ``crictl rmi``), a new pod of the same image starts, by tag, from Detour's cache.
* The node's proxy away (its DaemonSet pod deleted and kept off the node): a pull through it
  fails and backs off; when the pod is back, the pull is retried and the pod runs.
* Mirror mode: ``detour containerd-hosts`` (what components/containerd-hosts runs on each
  node) adds Detour to the node's ``hosts.toml``; a Deployment of 3 replicas, names unchanged
  (its namespace skipped by the webhook), is pulled through Detour.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.cri import ImageService
from tests.images import unique_repo
from tests.kube.cluster import Cluster, wait_for
from tests.kube.detour import NAMESPACE, PREFIX, Deployed
from tests.kube.oci import push_app
from tests.kube.pods import created, deployment, pod, wait_available, wait_running
from tests.registry import Registry
from tests.support import ROOT

PROXY = "app.kubernetes.io/component=proxy"


@pytest.fixture
def namespace(cluster: Cluster, detour: Deployed) -> Iterator[str]:
    name = f"node-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


def _path_form(cluster: Cluster, repo: str, tag: str) -> str:
    return f"{PREFIX}/{cluster.mirror_host.replace(':', '_')}/{repo}:{tag}"


async def _cri_images(cluster: Cluster) -> list[str]:
    service = ImageService(str(cluster.containerd_socket))
    try:
        return [tag for image in await service.images() for tag in image.repo_tags]
    finally:
        await service.close()


async def _cri_remove(cluster: Cluster, image: str) -> None:
    service = ImageService(str(cluster.containerd_socket))
    try:
        await service.remove(image)
    finally:
        await service.close()


def _proxy_log(cluster: Cluster) -> str:
    return cluster.kubectl("-n", NAMESPACE, "logs", "daemonset/detour-proxy", "-c", "proxy").stdout


def test_path_mode_runs_a_deployment_through_the_proxy_and_starts_a_pod_offline(
    cluster: Cluster, mirror: Registry, namespace: str
) -> None:
    repo = unique_repo("path")
    push_app(mirror, repo, "v1")
    mark = mirror.mark()
    image = f"{cluster.mirror_host}/{repo}:v1"
    made = created(cluster, namespace, deployment("app", image, 3))
    assert made["spec"]["template"]["spec"]["containers"][0]["image"] == image  # pods, not this
    wait_available(cluster, namespace, "app")
    pods = cluster.get("pods", "-n", namespace, "-l", "app=app")["items"]
    assert len(pods) == 3
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {_path_form(cluster, repo, "v1")}
    # The node pulled localhost:7439; Detour fetched from the mirror, by its own path.
    fetched = [e for e in mirror.entries_since(mark) if e.path.startswith(f"/v2/{repo}/")]
    assert fetched, "the mirror saw no request for the image"
    assert f"{cluster.mirror_host.replace(':', '_')}/{repo}" in _proxy_log(cluster)

    # Offline: the mirror down, the image gone from the node, a new pod of it by tag.
    rewritten = _path_form(cluster, repo, "v1")
    mirror.stop()
    try:
        asyncio.run(_cri_remove(cluster, rewritten))
        assert rewritten not in asyncio.run(_cri_images(cluster))
        created(cluster, namespace, pod("offline", image))
        wait_running(cluster, namespace, "offline", limit=120)
        assert rewritten in asyncio.run(_cri_images(cluster))
    finally:
        mirror.start()


def _proxy_away(cluster: Cluster, away: bool) -> None:
    """Keep the DaemonSet's pod off the node (deleted, not recreated), or let it back."""
    if away:
        patch = '{"spec":{"template":{"spec":{"nodeSelector":{"detour.test/proxy":"away"}}}}}'
        cluster.kubectl("-n", NAMESPACE, "patch", "daemonset/detour-proxy", "-p", patch)
        cluster.kubectl(
            "-n", NAMESPACE, "wait", "--for=delete", "pod", "-l", PROXY, "--timeout=120s"
        )
    else:
        patch = '[{"op":"remove","path":"/spec/template/spec/nodeSelector/detour.test~1proxy"}]'
        cluster.kubectl(
            "-n", NAMESPACE, "patch", "daemonset/detour-proxy", "--type=json", "-p", patch
        )
        cluster.kubectl(
            "-n", NAMESPACE, "rollout", "status", "daemonset/detour-proxy", "--timeout=180s"
        )


def _pull_failed(cluster: Cluster, namespace: str, name: str) -> bool:
    status = cluster.get("pod", "-n", namespace, name)["status"]
    waiting = [
        s["state"].get("waiting", {}).get("reason") for s in status.get("containerStatuses", [])
    ]
    return bool({"ErrImagePull", "ImagePullBackOff"} & set(waiting))


def test_without_the_node_proxy_pulls_back_off_and_recover_when_it_returns(
    cluster: Cluster, mirror: Registry, namespace: str
) -> None:
    repo = unique_repo("away")
    push_app(mirror, repo, "v1")
    _proxy_away(cluster, True)
    try:
        created(cluster, namespace, pod("waits", f"{cluster.mirror_host}/{repo}:v1"))
        wait_for("the pull failing", lambda: _pull_failed(cluster, namespace, "waits"), 120, 1)
    finally:
        _proxy_away(cluster, False)
    wait_running(cluster, namespace, "waits", limit=240)


def test_mirror_mode_runs_a_deployment_through_the_proxy_by_hosts_toml(
    cluster: Cluster, mirror: Registry, namespace: str, detour: Deployed
) -> None:
    hosts = [
        sys.executable, "-m", "proxy", "containerd-hosts",
        "--config", str(detour.overlay / "detour.yaml"),
        "--endpoint", "http://127.0.0.1:7439", "--out", str(cluster.hosts_dir),
    ]  # fmt: skip
    cluster.kubectl("label", "namespace", namespace, "detour.io/skip=true")
    repo = unique_repo("mirror")
    push_app(mirror, repo, "v1")
    image = f"{cluster.mirror_host}/{repo}:v1"
    subprocess.run([*hosts, "--append"], check=True, capture_output=True, cwd=ROOT)
    try:
        written = (cluster.hosts_dir / cluster.mirror_host / "hosts.toml").read_text()
        assert '[host."http://127.0.0.1:7439"]' in written, written
        created(cluster, namespace, deployment("app", image, 3))
        wait_available(cluster, namespace, "app")
        pods = cluster.get("pods", "-n", namespace, "-l", "app=app")["items"]
        assert {p["spec"]["containers"][0]["image"] for p in pods} == {image}
        # containerd asked Detour first, by the image's own path (path mode's would begin
        # with the registry, /v2/10.x.0.1_<port>/...).
        assert f'"/v2/{repo}/manifests/v1' in _proxy_log(cluster)
    finally:
        subprocess.run([*hosts, "--remove"], check=True, capture_output=True, cwd=ROOT)
