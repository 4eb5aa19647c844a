"""The one-node cluster (``cluster``), its mirror registry (``mirror``) and Detour deployed on
it (``detour``), shared by the tests of this folder and taken down after the last of them, so
the rest of the suite runs without them.

Skipped, with the reason, only where no Kubernetes binaries are found (``tests.kube.cluster``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.kube.cluster import Cluster, assets
from tests.kube.detour import Deployed, deploy
from tests.kube.oci import PAUSE_REPO as PAUSE_REPO  # also importable from here
from tests.kube.oci import PAUSE_TAG as PAUSE_TAG
from tests.kube.oci import push_pause
from tests.registry import Registry


@pytest.fixture(scope="package")
def mirror() -> Iterator[Registry]:
    assets()  # skip before starting anything
    with Registry() as registry:
        push_pause(registry, PAUSE_REPO, PAUSE_TAG)
        yield registry


@pytest.fixture(scope="package")
def cluster(mirror: Registry) -> Iterator[Cluster]:
    started = time.monotonic()
    node = Cluster(mirror)
    try:
        node.start(lambda host: f"{host}/{PAUSE_REPO}:{PAUSE_TAG}")
    except BaseException:
        logs = node.logs()
        node.close()
        pytest.fail(f"the cluster did not start:\n{logs}", pytrace=False)
    print(f"\ncluster up in {time.monotonic() - started:.1f}s")
    yield node
    node.close()


@pytest.fixture(scope="package")
def detour(
    cluster: Cluster, mirror: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Deployed:
    """Detour deployed as deploy/kubernetes says (``tests.kube.detour``)."""
    started = time.monotonic()
    try:
        deployed = deploy(cluster, mirror, tmp_path_factory.mktemp("detour"))
    except Exception as exc:
        pods = cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
        events = cluster.kubectl("get", "events", "-A", check=False).stdout
        pytest.fail(f"Detour did not deploy: {exc}\n{pods}\n{events[-4000:]}", pytrace=False)
    print(f"\nDetour deployed in {time.monotonic() - started:.1f}s")
    return deployed
