"""The Helm chart in containerd mirror mode on the real node of tests/kube: no webhook
(``webhook.enabled: false``), ``containerdHosts.enabled`` with its ``certsDir`` the node
containerd's ``config_path``.

The proxy's init container adds Detour in front of the node's own ``hosts.toml`` for the
registry a redirect rule names; a pod whose image names that registry, which does not exist,
runs, pulled through Detour, which follows the rule to the test registry. Afterwards ``detour
containerd-hosts --remove`` (the uninstall step) leaves the node's file as it was.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.kube.cluster import Cluster
from tests.kube.oci import PAUSE_REPO, PAUSE_TAG
from tests.kube.pods import created, pod
from tests.kube.test_kube_helm import (
    Installed,
    cache_listing,
    release,
    wait_pulled,
)
from tests.support import ROOT

NAME = "helm-mirror-detour"
ABSENT = "mirror-mode.test"  # no such registry: only Detour can answer for it
DETOUR = "http://127.0.0.1:7439"


@pytest.fixture(scope="module")
def mirror_mode(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    hosts = cluster.hosts_dir
    # The node has a hosts.toml of its own for the registry: Detour is added in front of it.
    cluster.write_hosts(ABSENT, f"https://{ABSENT}", [])
    own = (hosts / ABSENT / "hosts.toml").read_text()
    mirror = (hosts / cluster.mirror_host / "hosts.toml").read_text()
    values = {
        "webhook": {"enabled": False},
        "containerdHosts": {"enabled": True, "certsDir": str(hosts)},
        "config": {"redirects": [{"src": f"{ABSENT}/", "to": f"{cluster.mirror_host}/"}]},
    }
    cache = tmp_path_factory.mktemp("helm-mirror-cache") / "detour"
    try:
        with release(cluster, cache, values, name=NAME) as made:
            yield made
    finally:
        subprocess.run(
            [sys.executable, "-m", "proxy", "containerd-hosts", "--remove", "--out", str(hosts)],
            capture_output=True,
            check=True,
            cwd=ROOT,
        )
        after = (hosts / ABSENT / "hosts.toml").read_text()
        shutil.rmtree(hosts / ABSENT)
    assert after == own
    # The test registry is the rule's target, not a registry to mirror: never touched.
    assert (hosts / cluster.mirror_host / "hosts.toml").read_text() == mirror


def test_the_init_container_puts_detour_first(cluster: Cluster, mirror_mode: Installed) -> None:
    written = (cluster.hosts_dir / ABSENT / "hosts.toml").read_text()
    assert f'server = "https://{ABSENT}"' in written  # kept
    assert written.index(f'[host."{DETOUR}"]') < written.index(f'[host."https://{ABSENT}"]')
    # No webhook in this mode.
    found = cluster.kubectl("get", "mutatingwebhookconfiguration", NAME, check=False)
    assert found.returncode != 0
    assert "NotFound" in found.stderr


def test_a_pod_of_a_redirected_registry_pulls_through_detour(
    cluster: Cluster, mirror_mode: Installed
) -> None:
    namespace = f"helm-mirror-pods-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    try:
        image = f"{ABSENT}/{PAUSE_REPO}:{PAUSE_TAG}"
        made = created(cluster, namespace, pod("app", image))
        assert [c["image"] for c in made["spec"]["containers"]] == [image]  # as written
        wait_pulled(cluster, namespace, "app")
        listing = cache_listing(mirror_mode.cache)
        assert f"{PAUSE_REPO}:{PAUSE_TAG}" in listing, listing
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
