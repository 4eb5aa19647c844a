"""The Kubernetes manifests (deploy/kubernetes): every layout renders (``kubectl kustomize``)
and matches the Kubernetes API schemas (``kubernetes-validate``); the proxy DaemonSet, the
webhook, the ConfigMap's config (which starts ``detour serve``), the mirror-mode init container,
and the cert-manager and monitoring overlays. No cluster is needed.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.setting_types import split_host_port
from proxy.settings import load_settings
from proxy.tools.cli import main
from proxy.webhook.certs import service_names
from tests.kustomize import (
    COMPONENTS,
    OVERLAYS,
    WORKLOADS,
    container,
    embedded_config,
    namespace_labels,
    one,
    pod_env,
    pod_spec,
    selects,
    spec_labels,
)
from tests.proxy import Proxy

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]

# Kinds from CRDs (cert-manager, Prometheus Operator): kubernetes-validate has only the
# built-in API's schemas. Anything else that has no schema fails the test.
CRD_KINDS = frozenset({"Certificate", "Issuer", "ServiceMonitor"})
# The oldest Kubernetes the manifests are meant for, and the newest with schemas shipped.
OLDEST_KUBERNETES = "1.30.0"


def test_the_layout_renders(renders: dict[str, list[dict[str, Any]]]) -> None:
    assert set(OVERLAYS) == {"cert-manager", "containerd-mirror", "hub", "monitoring"}
    assert len(renders) == 1 + len(OVERLAYS) + 2 ** len(COMPONENTS) - 1
    kinds = {name: sorted(o["kind"] for o in objects) for name, objects in renders.items()}
    assert kinds["default"] == [
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "MutatingWebhookConfiguration",
        "Namespace",
        "NetworkPolicy",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "Service",
    ]
    # Mirror mode needs no webhook (nor its NetworkPolicy); the proxies still find each other.
    assert kinds["containerd-mirror"] == [
        "ConfigMap",
        "DaemonSet",
        "Namespace",
        "NetworkPolicy",
        "Service",
    ]
    # The hub: a StatefulSet, its Service, NetworkPolicy and PodDisruptionBudget.
    added = list(kinds["hub"])
    for kind in kinds["default"]:
        added.remove(kind)
    assert sorted(added) == ["NetworkPolicy", "PodDisruptionBudget", "Service", "StatefulSet"]
    for objects in renders.values():
        for o in objects:
            if o["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
                assert o["metadata"]["namespace"] == "detour", o["metadata"]
        images = {
            c["image"]
            for o in objects
            if o["kind"] in WORKLOADS
            for field in ("initContainers", "containers")
            for c in o["spec"]["template"]["spec"].get(field, [])
        }
        assert images == {"detour:0.1.0"}  # one image, one tag, init containers included


def test_every_workload_runs_on_linux_nodes(renders: dict[str, list[dict[str, Any]]]) -> None:
    """The image is built for linux/amd64 and linux/arm64 (kubelet pulls the node's own); the
    proxy tolerates every taint, so only this keeps it off Windows nodes."""
    for name, objects in renders.items():
        for o in objects:
            if o["kind"] in WORKLOADS:
                spec = o["spec"]["template"]["spec"]
                assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}, (name, o["kind"])


def test_every_object_matches_the_kubernetes_schemas(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        pytest.fail("pip install kubernetes-validate (the test extra)", pytrace=False)
    versions = [OLDEST_KUBERNETES, f"{kubernetes_validate.latest_version()}.0"]
    skipped: set[str] = set()
    validated: set[str] = set()
    checked = 0
    seen: set[str] = set()
    for name, objects in renders.items():
        for o in objects:
            if o["kind"] in CRD_KINDS:
                skipped.add(o["kind"])
                continue
            validated.add(o["kind"])
            text = json.dumps(o, sort_keys=True)
            if text in seen:  # the same object in another combination
                continue
            seen.add(text)
            for version in versions:
                try:
                    kubernetes_validate.validate(o, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    where = f"{name}: {o['kind']} {o['metadata']['name']} (Kubernetes {version})"
                    pytest.fail(f"{where}: {exc.message} at {list(exc.path)}", pytrace=False)
            checked += 1
    assert checked >= 20
    assert {"NetworkPolicy", "StatefulSet"} <= validated
    assert skipped == CRD_KINDS  # every CRD kind that exists is used, and none other is skipped


@pytest.mark.parametrize("variant", ["default", "all-components"])
def test_the_proxy_daemonset(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    objects = renders[variant]
    spec = pod_spec(objects, "DaemonSet")
    proxy = container(spec, "proxy")
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]  # every node, whatever its taints
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    context = proxy["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert set(proxy["resources"]) == {"requests", "limits"}
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    (port,) = proxy["ports"]
    assert (port["containerPort"], port["hostPort"]) == (7439, 7439)
    if variant == "default":
        assert port["hostIP"] == "127.0.0.1"
        assert spec.get("hostNetwork") is not True
        cache = next(v for v in spec["volumes"] if v["name"] == "cache")
        assert cache["hostPath"] == {"path": "/var/cache/detour", "type": "DirectoryOrCreate"}
        # The init container that hands the hostPath to the proxy's user: no other powers.
        owner = container(spec, "cache-owner", "initContainers")
        assert owner["command"][-1] == "/var/cache/detour"
        assert "-o" in owner["command"]
        assert "10001" in owner["command"]
        assert owner["securityContext"]["capabilities"] == {
            "drop": ["ALL"],
            "add": ["CHOWN", "FOWNER"],
        }
        assert owner["securityContext"]["allowPrivilegeEscalation"] is False
    else:
        # host-network: the node's loopback only, probes to match; emptydir-cache: no root.
        assert spec["hostNetwork"] is True
        assert "hostIP" not in port
        assert {"name": "DETOUR_LISTEN", "value": "127.0.0.1:7439"} in proxy["env"]
        assert proxy["readinessProbe"]["httpGet"]["host"] == "127.0.0.1"
        assert proxy["livenessProbe"]["httpGet"]["host"] == "127.0.0.1"
        cache = next(v for v in spec["volumes"] if v["name"] == "cache")
        assert set(cache) == {"name", "emptyDir"}
        assert cache["emptyDir"]["sizeLimit"]
        assert [c["name"] for c in spec["initContainers"]] == ["containerd-hosts"]

    # The config the proxy is told to read is the ConfigMap's.
    config_arg = proxy["args"][proxy["args"].index("--config") + 1]
    mount = next(m for m in proxy["volumeMounts"] if m["mountPath"] == str(Path(config_arg).parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    configmap = one(objects, "ConfigMap", "detour-config")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert Path(config_arg).name in configmap["data"]
    # The credentials Secret is optional: the base applies and starts without it.
    credentials = next(v for v in spec["volumes"] if v["name"] == "registry-credentials")
    assert credentials["secret"]["optional"] is True


@pytest.mark.parametrize("variant", ["default", "cert-manager", "all-components"])
def test_the_webhook_fails_open_and_spares_system_namespaces(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    objects = renders[variant]
    (hook,) = one(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["timeoutSeconds"] <= 5
    assert hook["admissionReviewVersions"] == ["v1"]
    assert {"operations": ["CREATE"], "resources": ["pods"]}.items() <= hook["rules"][0].items()
    assert hook["rules"][1]["resources"] == ["pods/ephemeralcontainers"]
    # Not kube-system, not Detour's own namespace (by its label), not one labelled to be
    # skipped; every other.
    own = one(objects, "Namespace")
    assert not selects(hook["namespaceSelector"], namespace_labels(own))
    assert not selects(hook["namespaceSelector"], namespace_labels("kube-system"))
    assert not selects(hook["namespaceSelector"], namespace_labels("web", skip=True))
    assert selects(hook["namespaceSelector"], namespace_labels("default"))
    assert selects(hook["namespaceSelector"], namespace_labels("web"))
    assert hook["objectSelector"]["matchExpressions"] == [
        {"key": "detour.io/skip", "operator": "NotIn", "values": ["true"]}
    ]

    # The API server reaches the Service, which reaches the webhook's port.
    service_ref = hook["clientConfig"]["service"]
    service = one(objects, "Service", service_ref["name"])
    assert service_ref["namespace"] == service["metadata"]["namespace"] == "detour"
    (port,) = service["spec"]["ports"]
    assert port["port"] == service_ref["port"] == 443
    spec = pod_spec(objects, "Deployment")
    webhook = container(spec, "webhook")
    (container_port,) = webhook["ports"]
    assert port["targetPort"] == container_port["name"]
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pdb = one(objects, "PodDisruptionBudget", "detour-webhook")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= spec_labels(deployment).items()
    assert {
        "name": "POD_NAMESPACE",
        "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}},
    } in webhook["env"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert webhook["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_configmap_config_fits_the_manifests(
    renders: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    objects = renders["default"]
    settings = load_settings(embedded_config(objects, tmp_path))
    proxy = container(pod_spec(objects, "DaemonSet"), "proxy")
    webhook = container(pod_spec(objects, "Deployment"), "webhook")
    (proxy_port,) = proxy["ports"]
    (webhook_port,) = webhook["ports"]
    # Pods are sent to the node's hostPort; the webhook listens where the Service points.
    assert settings.webhook.prefix == f"localhost:{proxy_port['hostPort']}"
    assert split_host_port(settings.listen, 0)[1] == proxy_port["containerPort"]
    assert split_host_port(settings.webhook.listen, 0)[1] == webhook_port["containerPort"]
    mounts = {m["mountPath"] for m in proxy["volumeMounts"]}
    assert str(settings.cache.dir) in mounts
    tls = next(m for m in webhook["volumeMounts"] if m["name"] == "tls")
    assert (
        settings.webhook.tls_cert.parent
        == settings.webhook.tls_key.parent
        == Path(tls["mountPath"])
    )
    if settings.docker_config is not None:
        assert str(settings.docker_config.parent) in mounts


async def test_the_configmap_config_starts_the_proxy(
    renders: dict[str, list[dict[str, Any]]],
    detour_process: StartProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the DaemonSet runs it, with only the cache directory moved: it becomes ready (and
    would not, were it pointed at a credentials file the optional Secret did not provide), also
    with its peers' name not resolving, as for the first proxy of a rollout, which the Service
    does not list until it is ready."""
    objects = renders["default"]
    for name, value in pod_env(one(objects, "DaemonSet"), pod_ip="127.0.0.1").items():
        if name.startswith("DETOUR_"):
            monkeypatch.setenv(name, value)
    config = yaml.safe_load(embedded_config(objects, tmp_path).read_text())
    config["cache"]["dir"] = str(tmp_path / "cache")
    proxy = await detour_process(config)
    async with proxy.session.get(f"{proxy.url}/readyz") as response:
        assert response.status == 200


def test_mirror_mode_init_container_writes_hosts_toml(
    renders: dict[str, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The init container's own arguments, with its two paths moved into tmp_path."""
    objects = renders["containerd-mirror"]
    spec = pod_spec(objects, "DaemonSet")
    init = container(spec, "containerd-hosts", "initContainers")
    proxy = container(spec, "proxy")
    (port,) = proxy["ports"]
    assert init["image"] == proxy["image"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    certs_mount = next(m for m in init["volumeMounts"] if m["name"] == "containerd-certs")
    volume = next(v for v in spec["volumes"] if v["name"] == "containerd-certs")
    assert volume["hostPath"]["path"] == certs_mount["mountPath"] == "/etc/containerd/certs.d"
    args = list(init["args"])
    assert args[args.index("--endpoint") + 1] == f"http://{port['hostIP']}:{port['hostPort']}"

    config = embedded_config(objects, tmp_path)
    out = tmp_path / "certs.d"
    args[args.index("--config") + 1] = str(config)
    args[args.index("--out") + 1] = str(out)
    # The shipped config has no rules yet: nothing to mirror, said loudly, nothing written.
    assert main(args) == 1
    assert "no redirect rules and no registries" in capsys.readouterr().err
    assert not out.exists()
    data = yaml.safe_load(config.read_text())
    data["redirects"] = [
        {"src": "docker.io/", "to": "mirror.example/hub/"},
        {"src": "ghcr.io/", "to": "mirror.example/ghcr/"},
    ]
    config.write_text(yaml.safe_dump(data))
    # Another tool's hosts.toml for ghcr.io is kept, with Detour added as its first host.
    theirs = (
        'server = "https://ghcr.io"\n\n[host."https://other.example"]\n  capabilities = ["pull"]\n'
    )
    (out / "ghcr.io").mkdir(parents=True)
    (out / "ghcr.io" / "hosts.toml").write_text(theirs)
    assert main(args) == 0
    text = (out / "docker.io" / "hosts.toml").read_text()
    assert '[host."http://127.0.0.1:7439"]' in text
    appended = (out / "ghcr.io" / "hosts.toml").read_text()
    assert appended.index('[host."http://127.0.0.1:7439"]') < appended.index("other.example")
    assert 'server = "https://ghcr.io"' in appended


def test_cert_manager_overlay_wires_the_certificate(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    objects = renders["cert-manager"]
    mwc = one(objects, "MutatingWebhookConfiguration")
    namespace, name = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    certificate = one(objects, "Certificate", name)
    assert certificate["metadata"]["namespace"] == namespace == "detour"
    service = mwc["webhooks"][0]["clientConfig"]["service"]
    assert certificate["spec"]["dnsNames"] == service_names(service["name"], namespace)
    spec = pod_spec(objects, "Deployment")
    tls = next(v for v in spec["volumes"] if v["name"] == "tls")
    assert certificate["spec"]["secretName"] == tls["secret"]["secretName"]
    # Signed by a CA Issuer whose CA is itself from the self-signed Issuer.
    issuer = one(objects, "Issuer", certificate["spec"]["issuerRef"]["name"])
    ca_certificate = one(objects, "Certificate", "detour-webhook-ca")
    assert issuer["spec"]["ca"]["secretName"] == ca_certificate["spec"]["secretName"]
    assert ca_certificate["spec"]["isCA"] is True
    root = one(objects, "Issuer", ca_certificate["spec"]["issuerRef"]["name"])
    assert root["spec"] == {"selfSigned": {}}


def test_monitoring_overlay_selects_the_services(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    objects = renders["monitoring"]
    services = [o for o in objects if o["kind"] == "Service"]
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [
            s for s in services if selector.items() <= s["metadata"].get("labels", {}).items()
        ]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        # Every sample carries the node its pod runs on (the dashboard's per-node panels).
        assert {
            "sourceLabels": ["__meta_kubernetes_pod_node_name"],
            "targetLabel": "node",
        } in endpoint["relabelings"]
        # The Endpoints of the ServiceMonitor's own namespace (the operator's default), which
        # is the Service's, whatever the namespace is.
        assert "namespaceSelector" not in monitor["spec"]
        assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
        if "tlsConfig" in endpoint:  # the webhook: a name its certificate has, either path
            names = service_names(service["metadata"]["name"], service["metadata"]["namespace"])
            assert endpoint["tlsConfig"]["serverName"] in names
    headless = one(objects, "Service", "detour-proxy-metrics")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == spec_labels(one(objects, "DaemonSet"))
