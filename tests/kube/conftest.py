"""The session's one-node cluster (``cluster``) and its mirror registry (``mirror``).

Skipped, with the reason, only where no Kubernetes binaries are found (``tests.kube.cluster``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.kube.cluster import Cluster, assets
from tests.kube.oci import push_pause
from tests.registry import Registry

PAUSE_REPO = "k8s/pause"
PAUSE_TAG = "3.10"


@pytest.fixture(scope="session")
def mirror() -> Iterator[Registry]:
    assets()  # skip before starting anything
    with Registry() as registry:
        push_pause(registry, PAUSE_REPO, PAUSE_TAG)
        yield registry


@pytest.fixture(scope="session")
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
