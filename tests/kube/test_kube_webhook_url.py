"""``detour webhook`` beside the API server, registered by URL (``clientConfig.url:
https://127.0.0.1:<port>/mutate``) with the caBundle ``detour webhook-certs`` printed.

The API server checks the webhook's certificate for the address it dials: an IP address
matches only an IP SAN. Without ``--ip`` the certificate has none, TLS fails, and
(``failurePolicy: Ignore``) every pod is admitted unrewritten, silently; with ``--ip
127.0.0.1`` pods are rewritten. The shipped MutatingWebhookConfiguration is used as it is but
for its ``clientConfig`` and a namespaceSelector of the test's own namespace alone.

Ephemeral containers (``kubectl debug``) are rewritten too; the original image of one is not
recorded in ``detour.io/original-images``, since the API server keeps only
``spec.ephemeralContainers`` from a ``pods/ephemeralcontainers`` update.
"""

from __future__ import annotations

import copy
import http.client
import json
import ssl
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.cluster import Cluster
from tests.kustomize import KUBERNETES
from tests.support import ROOT, Daemon, free_port

PREFIX = "localhost:7439"


class HostWebhook:
    """``detour webhook`` on 127.0.0.1 with certificates from ``detour webhook-certs``."""

    def __init__(self, workdir: Path, ips: list[str]) -> None:
        self.port = free_port()
        certs = workdir / "certs"
        flags = [f"--ip={ip}" for ip in ips]
        made = subprocess.run(
            [sys.executable, "-m", "proxy", "webhook-certs", f"--out={certs}", *flags],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        self.ca_bundle = made.stdout.strip()
        self.ca = certs / "ca.crt"
        config = workdir / "detour.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "webhook": {
                        "listen": f"127.0.0.1:{self.port}",
                        "tls_cert": str(certs / "tls.crt"),
                        "tls_key": str(certs / "tls.key"),
                        "prefix": PREFIX,
                    }
                }
            )
        )
        self.daemon = Daemon(
            "detour-webhook",
            [sys.executable, "-m", "proxy", "webhook", "--config", str(config)],
            workdir / "webhook.log",
            grace=5,
        )

    def _healthy(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.check_hostname = False  # it may have no IP SAN: that is what is tried here
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=2, context=context)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def start(self) -> None:
        self.daemon.start(self._healthy, 30)


def registration(name: str, url: str, ca_bundle: str, namespace: str) -> dict[str, Any]:
    """The shipped MutatingWebhookConfiguration, called by ``url``, for ``namespace`` only."""
    shipped = yaml.safe_load((KUBERNETES / "base" / "webhook-configuration.yaml").read_text())
    config = copy.deepcopy(shipped)
    config["metadata"]["name"] = name
    (hook,) = config["webhooks"]
    hook["clientConfig"] = {"url": url, "caBundle": ca_bundle}
    # Only the test's namespace, which is labelled detour.io/skip for the Detour deployed in
    # the cluster (tests.kube.detour), whose webhook would otherwise rewrite these pods first.
    hook["namespaceSelector"] = {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [namespace]}
        ]
    }
    return dict(config)


def pod(name: str, image: str, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **metadata},
        "spec": {
            "initContainers": [{"name": "init", "image": "busybox:1.36"}],
            "containers": [{"name": "main", "image": image}],
            "automountServiceAccountToken": False,
        },
    }


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"url-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "detour.io/skip=true")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def host_webhook(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> Iterator[Callable[[list[str]], HostWebhook]]:
    """Start ``detour webhook`` with certificates for these IPs, registered for ``namespace``."""
    started: list[HostWebhook] = []
    name = f"detour-{namespace}"

    def start(ips: list[str]) -> HostWebhook:
        hook = HostWebhook(tmp_path, ips)
        hook.start()
        started.append(hook)
        url = f"https://127.0.0.1:{hook.port}/mutate"
        config = registration(name, url, hook.ca_bundle, namespace)
        cluster.kubectl("apply", "-f", "-", input=json.dumps(config))
        return hook

    yield start
    cluster.kubectl("delete", "mutatingwebhookconfiguration", name, check=False)
    for hook in started:
        hook.daemon.stop()


def created(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    out = cluster.kubectl(
        "create", "-n", namespace, "-f", "-", "-o", "json", input=json.dumps(manifest)
    )
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def test_a_webhook_called_by_ip_without_an_ip_san_leaves_pods_unrewritten(
    cluster: Cluster, namespace: str, host_webhook: Callable[[list[str]], HostWebhook]
) -> None:
    host_webhook([])
    made = created(cluster, namespace, pod("app", "nats:2.10.26-alpine"))
    assert [c["image"] for c in made["spec"]["containers"]] == ["nats:2.10.26-alpine"]
    # TLS failed, failurePolicy: Ignore admitted it as written; only the API server's log says.
    assert "doesn't contain any IP SANs" in cluster.log("kube-apiserver")


def test_webhook_certs_ip_makes_a_webhook_called_by_ip_rewrite_pods(
    cluster: Cluster, namespace: str, host_webhook: Callable[[list[str]], HostWebhook]
) -> None:
    host_webhook(["127.0.0.1"])
    made = created(cluster, namespace, pod("app", "nats:2.10.26-alpine"))
    assert [c["image"] for c in made["spec"]["containers"]] == [
        f"{PREFIX}/docker.io/library/nats:2.10.26-alpine"
    ]
    assert made["spec"]["initContainers"][0]["image"] == f"{PREFIX}/docker.io/library/busybox:1.36"

    # kubectl debug: a pods/ephemeralcontainers update, rewritten as well.
    cluster.kubectl(
        "debug", "-n", namespace, "app", "--image=alpine:3.20", "--container=debugger",
        "--attach=false", "--profile=general",
    )  # fmt: skip
    after = cluster.get("pod", "-n", namespace, "app")
    (debugger,) = after["spec"]["ephemeralContainers"]
    assert debugger["image"] == f"{PREFIX}/docker.io/library/alpine:3.20"
    recorded = json.loads(after["metadata"]["annotations"]["detour.io/original-images"])
    assert recorded == {
        "containers/main": "nats:2.10.26-alpine",
        "initContainers/init": "busybox:1.36",
    }
