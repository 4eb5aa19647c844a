"""The Helm chart (deploy/helm/detour), rendered by Helm's own engine: helm-python-sdk binds
Helm v4's library (``helm.sh/helm/v4``), so no ``helm`` binary is needed.

Every documented combination of values renders, passes ``helm lint --strict``, and matches the
Kubernetes API schemas; and for the same settings the chart and the kustomize layout
(deploy/kubernetes) render the same objects, so the two cannot drift apart: each kustomize
component is a value, and a component without one fails here. What only the chart has is named
here: what :func:`comparable` sets aside (its own labels, the config checksum that rolls the pods
where kustomize hashes the ConfigMap's name), and what ``BASE_VALUES`` turns off (the Helm-made
certificate and peers' secret; the Grafana dashboard is off by default).
"""

from __future__ import annotations

import base64
import copy
import difflib
import json
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from proxy.settings import load_settings
from proxy.webhook.certs import service_names
from tests.kustomize import (
    COMBINATIONS,
    COMPONENTS,
    HUB_LABELS,
    OVERLAYS,
    PROXY_LABELS,
    WORKLOADS,
    admits,
    container,
    embedded_config,
    namespace_labels,
    one,
    peer_service,
    pod_spec,
    render,
    selects,
    write_overlay,
)
from tests.support import ROOT, Daemon, free_port, listening
from tests.test_deploy_namespace import check_namespace
from tests.test_deploy_webhook_certs import https_get

CHART = ROOT / "deploy" / "helm" / "detour"
DASHBOARD = ROOT / "deploy" / "grafana" / "detour-dashboard.json"
# As in tests/test_deploy_kubernetes.py: kinds from CRDs have no schema in kubernetes-validate.
CRD_KINDS = frozenset({"Certificate", "Issuer", "ServiceMonitor"})
OLDEST_KUBERNETES = "1.30.0"

Objects = list[dict[str, Any]]

# Each kustomize component as the chart's values.
COMPONENT_VALUES: dict[str, dict[str, Any]] = {
    "cert-manager": {"webhook": {"certificate": "cert-manager"}},
    "containerd-hosts": {"containerdHosts": {"enabled": True}},
    "emptydir-cache": {"proxy": {"cache": {"volume": "emptyDir"}}},
    "host-network": {"proxy": {"hostNetwork": True}},
    "hub": {"hub": {"enabled": True}},
    "monitoring": {"monitoring": {"serviceMonitors": {"enabled": True}}},
}
# The kustomize base as the chart's values: it makes its Namespace, the webhook's certificate
# comes from outside (`detour webhook-certs`), and so does the peers' secret.
BASE_VALUES: dict[str, Any] = {
    "namespace": {"create": True},
    "webhook": {"certificate": "external"},
    "cluster": {"peerSecret": {"create": False}},
}
# Each overlay's components, and what else it changes.
OVERLAY_VALUES: dict[str, list[dict[str, Any]]] = {
    "cert-manager": [COMPONENT_VALUES["cert-manager"]],
    "containerd-mirror": [COMPONENT_VALUES["containerd-hosts"], {"webhook": {"enabled": False}}],
    "hub": [COMPONENT_VALUES["hub"]],
    "monitoring": [COMPONENT_VALUES["monitoring"]],
}
# Labels the chart puts on every object (Helm's conventions); kustomize puts part-of on the
# base's objects only.
CHART_LABELS = {"app.kubernetes.io/managed-by", "helm.sh/chart", "app.kubernetes.io/part-of"}


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Values layered as ``helm -f a.yaml -f b.yaml`` layers them: maps merge, the rest
    replaces."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def helm() -> Any:
    try:
        import helm_python
    except ImportError:
        pytest.fail("pip install helm-python-sdk (the test extra)", pytrace=False)
    helm_python.disable_logging()  # it logs the dashboard's symlink at INFO, on every load
    return helm_python


def helm_render(
    values: dict[str, Any], release: str = "detour", namespace: str = "detour"
) -> Objects:
    """The chart's objects for ``values``, as ``helm template`` or ``helm install`` makes
    them (offline: ``lookup`` finds nothing)."""
    with helm().Chart.load(CHART) as chart:
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    return [
        doc
        for name, text in sorted(manifests.items())
        if name.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def values_for(layout: str) -> dict[str, Any]:
    """The chart's values for a kustomize layout of ``tests.kustomize``'s naming: "default",
    an overlay's name, "all-components" or "base+<component>+..."."""
    if layout == "default":
        layers = []
    elif layout in OVERLAY_VALUES:
        layers = OVERLAY_VALUES[layout]
    elif layout == "all-components":
        layers = [COMPONENT_VALUES[c] for c in COMPONENTS]
    else:
        layers = [COMPONENT_VALUES[c] for c in layout.split("+")[1:]]
    return merged(BASE_VALUES, *layers)


# Every documented combination: the kustomize layouts' (every combination of components, the
# overlays) and what only the chart has: its defaults (the Helm-made certificate, no Namespace),
# the Grafana dashboard, a config of one's own.
CUSTOM_CONFIG: dict[str, Any] = {
    "config": {
        "log_level": "debug",
        "cache": {"max_size": "50GiB"},
        "redirects": [
            {"src": "docker.io/", "to": "project-a.azurecr.io/docker-mirror/"},
            {
                "src": "ghcr.io/",
                "to": "project-a.azurecr.io/ghcr-mirror/",
                "fallback_to_origin": True,
            },
        ],
        "registries": {"registry.internal:5000": {"insecure": True}},
    },
}
CHART_ONLY: dict[str, dict[str, Any]] = {
    "chart defaults": {},
    "helm certificate, hub, monitoring, dashboard": merged(
        COMPONENT_VALUES["hub"],
        COMPONENT_VALUES["monitoring"],
        {"monitoring": {"grafanaDashboard": {"enabled": True}}},
    ),
    "no NetworkPolicies, every knob set": {
        "networkPolicy": {"enabled": False},
        "image": {"repository": "registry.example.com/platform/detour", "pullPolicy": "Always"},
        "hub": {"enabled": True, "storageClassName": "fast-local", "replicas": 5},
        "webhook": {
            "replicas": 3,
            "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "proxy": {"priorityClassName": "", "cache": {"hostPath": "/mnt/disk1/detour"}},
        "monitoring": {
            "serviceMonitors": {"enabled": True, "labels": {"release": "prometheus"}},
            "grafanaDashboard": {"enabled": True, "namespace": "grafana"},
        },
    },
    "mirror mode, host network, own config": merged(
        OVERLAY_VALUES["containerd-mirror"][0],
        OVERLAY_VALUES["containerd-mirror"][1],
        COMPONENT_VALUES["host-network"],
        CUSTOM_CONFIG,
    ),
}


def every_combination() -> dict[str, dict[str, Any]]:
    layouts = ["default", *OVERLAYS, "all-components", *COMBINATIONS]
    return {name: values_for(name) for name in layouts} | CHART_ONLY


@pytest.fixture(scope="module")
def charts() -> dict[str, Objects]:
    return {name: helm_render(values) for name, values in every_combination().items()}


# -- The chart as Helm renders it ------------------------------------------------------------


def test_every_component_and_overlay_is_a_value() -> None:
    """A kustomize component or overlay the chart has no value for is drift."""
    assert sorted(COMPONENT_VALUES) == COMPONENTS
    assert sorted(OVERLAY_VALUES) == OVERLAYS


def test_the_chart_passes_helm_lint() -> None:
    for values in (BASE_VALUES, *CHART_ONLY.values()):
        report = helm().lint(CHART, values, strict=True, namespace="detour", kube_version="v1.30.0")
        assert report["errors"] == [], report
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], problems


def test_the_defaults(charts: dict[str, Objects]) -> None:
    """An edge site's defaults: path mode with a certificate made by Helm, so nothing else is
    needed; the proxies each other's peers; the cache on the node; NetworkPolicies on."""
    objects = charts["chart defaults"]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "MutatingWebhookConfiguration",
        "NetworkPolicy",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
        "Secret",
        "Secret",
        "Service",
        "Service",
    ]
    daemonset = one(objects, "DaemonSet", "detour-proxy")
    assert peer_service(objects, daemonset, member=True) == "detour-peers"
    # The peers' secret, made by Helm, where Detour's config looks for it.
    secret = base64.b64decode(one(objects, "Secret", "detour-peer-secret")["data"]["current"])
    assert re.fullmatch(rb"[A-Za-z0-9]{64}", secret)
    settings = yaml.safe_load(one(objects, "ConfigMap", "detour-config")["data"]["detour.yaml"])
    proxy = container(pod_spec(objects, "DaemonSet"), "proxy")
    (mount,) = [m for m in proxy["volumeMounts"] if m["name"] == "peer-secret"]
    assert mount["mountPath"] == settings["cluster"]["secret_dir"]
    (volume,) = [v for v in pod_spec(objects, "DaemonSet")["volumes"] if v["name"] == "peer-secret"]
    assert volume["secret"]["secretName"] == "detour-peer-secret"
    (port,) = container(pod_spec(objects, "DaemonSet"), "proxy")["ports"]
    assert (port["hostIP"], port["hostPort"]) == ("127.0.0.1", 7439)
    assert pod_spec(objects, "DaemonSet")["volumes"][1]["hostPath"]["path"] == "/var/cache/detour"
    # Helm cannot install into a namespace its release makes: the namespace is made beforehand,
    # without the label, so the webhook skips it by name (and kube-system).
    (hook,) = one(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert not selects(hook["namespaceSelector"], namespace_labels("detour"))
    assert not selects(hook["namespaceSelector"], namespace_labels("kube-system"))
    assert selects(hook["namespaceSelector"], namespace_labels("default"))
    assert not selects(hook["namespaceSelector"], namespace_labels("default", skip=True))
    for o in objects:
        assert set(o["metadata"]["labels"]) >= CHART_LABELS, (o["kind"], o["metadata"]["name"])
    images = {
        c["image"]
        for o in objects
        if o["kind"] in WORKLOADS
        for field in ("initContainers", "containers")
        for c in o["spec"]["template"]["spec"].get(field, [])
    }
    assert images == {"detour:0.1.0"}  # the chart's appVersion


def test_every_object_matches_the_kubernetes_schemas(charts: dict[str, Objects]) -> None:
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        pytest.fail("pip install kubernetes-validate (the test extra)", pytrace=False)
    versions = [OLDEST_KUBERNETES, f"{kubernetes_validate.latest_version()}.0"]
    seen: set[str] = set()
    validated: set[str] = set()
    skipped: set[str] = set()
    for name, objects in charts.items():
        for o in objects:
            if o["kind"] in CRD_KINDS:
                skipped.add(o["kind"])
                continue
            validated.add(o["kind"])
            text = json.dumps(o, sort_keys=True)
            if text in seen:
                continue
            seen.add(text)
            for version in versions:
                try:
                    kubernetes_validate.validate(o, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    where = f"{name}: {o['kind']} {o['metadata']['name']} (Kubernetes {version})"
                    pytest.fail(f"{where}: {exc.message} at {list(exc.path)}", pytrace=False)
    assert skipped == CRD_KINDS
    assert validated == {
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "MutatingWebhookConfiguration",
        "Namespace",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "StatefulSet",
    }


# -- One source of truth: the chart and kustomize render the same objects ---------------------


def _sorted_by_name(value: Any) -> Any:
    """Lists of named items (containers, env, volumes, ports) in name order: kustomize's patches
    reorder them. The order that matters, $(VAR) in env, is checked by peer_service."""
    if isinstance(value, dict):
        return {k: _sorted_by_name(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_sorted_by_name(v) for v in value]
        if items and all(isinstance(v, dict) and "name" in v for v in items):
            return sorted(items, key=lambda v: str(v["name"]))
        return items
    if isinstance(value, str):
        # kustomize's generated ConfigMap name, with its content hash.
        return re.sub(r"^(detour-config)-[a-z0-9]{10}$", r"\1", value)
    return value


def comparable(obj: dict[str, Any], chart: bool) -> tuple[tuple[str, str], dict[str, Any]]:
    """An object as both must agree on, keyed by kind and name. Set aside: the chart's own
    labels, its config checksum on pod templates, an empty list of init containers (as good as
    none), and the config as YAML text (compared as the settings it holds: kustomize keeps the
    file's comments)."""
    o = copy.deepcopy(obj)
    labels = o["metadata"].get("labels", {})
    for key in CHART_LABELS:
        labels.pop(key, None)
    if not labels:
        o["metadata"].pop("labels", None)
    if chart and o["kind"] in WORKLOADS:
        annotations = o["spec"]["template"]["metadata"].pop("annotations")
        assert set(annotations) == {"checksum/config"}
    if o["kind"] in WORKLOADS and o["spec"]["template"]["spec"].get("initContainers") == []:
        del o["spec"]["template"]["spec"]["initContainers"]  # kustomize leaves one deleted's []
    if o["kind"] == "ConfigMap":
        o["data"] = {k: yaml.safe_load(v) for k, v in o["data"].items()}
    o = _sorted_by_name(o)
    return (o["kind"], o["metadata"]["name"]), o


def differences(kustomized: Objects, charted: Objects) -> list[str]:
    ours = dict(comparable(o, chart=False) for o in kustomized)
    theirs = dict(comparable(o, chart=True) for o in charted)
    found = [f"only in kustomize: {key}" for key in sorted(ours.keys() - theirs.keys())]
    found += [f"only in the chart: {key}" for key in sorted(theirs.keys() - ours.keys())]
    for key in sorted(ours.keys() & theirs.keys()):
        if ours[key] != theirs[key]:
            a = yaml.safe_dump(ours[key], sort_keys=True).splitlines()
            b = yaml.safe_dump(theirs[key], sort_keys=True).splitlines()
            diff = "\n".join(difflib.unified_diff(a, b, "kustomize", "chart", lineterm="", n=2))
            found.append(f"{key}:\n{diff}")
    return found


def test_kustomize_and_the_chart_render_the_same_objects(
    renders: dict[str, Objects], charts: dict[str, Objects]
) -> None:
    """Every kustomize layout (the default, each overlay, every combination of components)
    against the chart with the same settings."""
    assert set(renders) <= set(charts)
    drift = {name: differences(renders[name], charts[name]) for name in renders}
    drift = {name: found for name, found in drift.items() if found}
    assert drift == {}, "\n\n".join(f"== {n}\n" + "\n".join(f) for n, f in drift.items())


def test_the_same_settings_of_ones_own(tmp_path: Path) -> None:
    """An overlay of one's own (another namespace, a detour.yaml with mirrors, registries and
    a cache size, every component) and the chart given the same: the same objects."""
    settings = merged(yaml.safe_load((ROOT / "deploy/kubernetes/base/detour.yaml").read_text()))
    settings = merged(settings, CUSTOM_CONFIG["config"])
    overlay = tmp_path / "mine"
    overlay.mkdir()
    (overlay / "detour.yaml").write_text(yaml.safe_dump(settings))
    kustomized = render(
        write_overlay(
            overlay,
            COMPONENTS,
            namespace="registry-cache",
            configMapGenerator=[
                {"name": "detour-config", "behavior": "replace", "files": ["detour.yaml"]}
            ],
        )
    )
    values = merged(values_for("all-components"), CUSTOM_CONFIG)
    charted = helm_render(values, namespace="registry-cache")
    assert differences(kustomized, charted) == []
    # What the settings are: Detour loads the chart's config as it is.
    config = load_settings(embedded_config(charted, tmp_path))
    assert [rule.src for rule in config.redirects] == ["docker.io", "ghcr.io"]
    assert config.cache.max_size == 50 * 2**30
    check_namespace(charted, "registry-cache")


def test_an_overlay_namespace_and_a_release_namespace_move_the_same(tmp_path: Path) -> None:
    """The chart's objects follow the release's namespace everywhere kustomize's follow an
    overlay's namespace: (tests/test_deploy_namespace.py's check, on the chart)."""
    charted = helm_render(merged(values_for("all-components")), namespace="edge-cache")
    check_namespace(charted, "edge-cache")
    kustomized = render(write_overlay(tmp_path / "ns", COMPONENTS, namespace="edge-cache"))
    assert differences(kustomized, charted) == []


# -- What only the chart has -------------------------------------------------------------------


@pytest.fixture
def webhook_daemon(tmp_path: Path) -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    for daemon in daemons:
        daemon.stop()


def test_the_helm_made_certificate_is_one_the_api_server_accepts(
    tmp_path: Path, webhook_daemon: list[Daemon]
) -> None:
    """webhook.certificate: helm (the default). A real ``detour webhook`` serving the Secret's
    pair, and a client trusting only the caBundle, as the API server does: accepted under every
    name of the Service in the release's namespace, refused under another namespace's."""
    objects = helm_render({}, release="edge", namespace="sites")
    secret = one(objects, "Secret", "edge-detour-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    files = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    (hook,) = one(objects, "MutatingWebhookConfiguration", "edge-detour")["webhooks"]
    assert hook["clientConfig"]["service"] == {
        "name": "edge-detour-webhook",
        "namespace": "sites",
        "path": "/mutate",
        "port": 443,
    }
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == files["ca.crt"]
    ca = x509.load_pem_x509_certificate(files["ca.crt"])
    cert = x509.load_pem_x509_certificate(files["tls.crt"])
    cert.verify_directly_issued_by(ca)
    assert 365 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 366
    # The CA's own Secret, which no pod mounts, keeps the caBundle on upgrades.
    ca_secret = one(objects, "Secret", "edge-detour-webhook-ca")
    assert base64.b64decode(ca_secret["data"]["tls.crt"]) == files["ca.crt"]
    for o in objects:
        if o["kind"] in WORKLOADS:
            mounted = {
                v["secret"]["secretName"]
                for v in o["spec"]["template"]["spec"]["volumes"]
                if "secret" in v
            }
            assert "edge-detour-webhook-ca" not in mounted

    certs = tmp_path / "certs"
    certs.mkdir()
    for name, data in files.items():
        (certs / name).write_bytes(data)
    port = free_port()
    config = tmp_path / "webhook.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "webhook": {
                    "listen": f"127.0.0.1:{port}",
                    "tls_cert": str(certs / "tls.crt"),
                    "tls_key": str(certs / "tls.key"),
                }
            }
        )
    )
    daemon = Daemon(
        "detour webhook",
        [sys.executable, "-m", "proxy", "webhook", "--config", str(config)],
        tmp_path / "webhook.log",
        grace=10,
        fresh_log=True,
        own_session=False,
        interval=0.05,
    )
    webhook_daemon.append(daemon)
    daemon.start(lambda: listening("127.0.0.1", port), 20)
    for name in service_names("edge-detour-webhook", "sites"):
        response = https_get(port, certs / "ca.crt", name, "/healthz")
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(port, certs / "ca.crt", "edge-detour-webhook.other.svc", "/healthz")


def test_the_grafana_dashboard(charts: dict[str, Objects], tmp_path: Path) -> None:
    """The dashboard is deploy/grafana's file itself (the chart links to it), labelled for
    Grafana's dashboard sidecar; the packaged chart (``helm package``) holds the file."""
    objects = charts["helm certificate, hub, monitoring, dashboard"]
    configmap = one(objects, "ConfigMap", "detour-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {"detour-dashboard.json": DASHBOARD.read_text()}
    assert (CHART / "dashboards" / "detour-dashboard.json").resolve() == DASHBOARD.resolve()
    archive = helm().package(CHART, destination=tmp_path)
    assert Path(archive).name == "detour-0.1.0.tgz"
    with helm().Chart.load(archive) as packaged:
        manifests = packaged.render(
            {"monitoring": {"grafanaDashboard": {"enabled": True}}}, name="detour"
        )
    (text,) = [t for t in manifests.values() if "grafana-dashboard" in t]
    (packaged_map,) = [doc for doc in yaml.safe_load_all(text) if doc]
    assert packaged_map["data"] == configmap["data"]
    assert "detour-grafana-dashboard" not in {
        o["metadata"]["name"] for o in charts["chart defaults"]
    }


def test_mirror_mode_on_the_host_network_with_ones_own_config(
    charts: dict[str, Objects], tmp_path: Path
) -> None:
    """No webhook at all; hosts.toml written from the config's registries; the proxy on the
    node's loopback, fetching for itself; the config loads as Detour reads it."""
    objects = charts["mirror mode, host network, own config"]
    assert not [o for o in objects if "webhook" in o["metadata"]["name"]]
    spec = pod_spec(objects, "DaemonSet")
    assert spec["hostNetwork"] is True
    proxy = container(spec, "proxy")
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env["DETOUR_LISTEN"] == "127.0.0.1:7439"
    assert not [name for name in env if name.startswith("DETOUR_CLUSTER__")]
    hosts = container(spec, "containerd-hosts", "initContainers")
    assert hosts["args"][hosts["args"].index("--out") + 1] == "/etc/containerd/certs.d"
    config = load_settings(embedded_config(objects, tmp_path))
    assert config.log_level == "debug"
    assert "registry.internal:5000" in config.registries


def test_every_knob(charts: dict[str, Objects]) -> None:
    """Each value of the table lands where it says."""
    objects = charts["no NetworkPolicies, every knob set"]
    assert not [o for o in objects if o["kind"] == "NetworkPolicy"]
    for o in objects:
        if o["kind"] in WORKLOADS:
            for c in o["spec"]["template"]["spec"]["containers"]:
                assert c["image"] == "registry.example.com/platform/detour:0.1.0"
                assert c["imagePullPolicy"] == "Always"
    hub = one(objects, "StatefulSet", "detour-hub")
    assert hub["spec"]["replicas"] == 5
    (claim,) = hub["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast-local"
    webhook = one(objects, "Deployment", "detour-webhook")
    assert webhook["spec"]["replicas"] == 3
    assert webhook["spec"]["template"]["spec"]["tolerations"][0]["key"] == "edge"
    proxy = pod_spec(objects, "DaemonSet")
    assert "priorityClassName" not in proxy
    (cache,) = [v for v in proxy["volumes"] if v["name"] == "cache"]
    assert cache["hostPath"]["path"] == "/mnt/disk1/detour"
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
    dashboard = one(objects, "ConfigMap", "detour-grafana-dashboard")
    assert dashboard["metadata"]["namespace"] == "grafana"


def test_the_hub_and_the_network_policies(charts: dict[str, Objects]) -> None:
    objects = charts["helm certificate, hub, monitoring, dashboard"]
    statefulset = one(objects, "StatefulSet", "detour-hub")
    assert peer_service(objects, statefulset, member=True) == "detour-hub"
    daemonset = one(objects, "DaemonSet", "detour-proxy")
    assert peer_service(objects, daemonset, member=False) == "detour-hub"
    hub_policy = one(objects, "NetworkPolicy", "detour-hub")
    assert admits(hub_policy, "detour", PROXY_LABELS, 7439)
    assert admits(hub_policy, "monitoring", {"app.kubernetes.io/name": "prometheus"}, 7439)
    assert not admits(hub_policy, "default", {"app": "anything"}, 7439)
    assert not admits(hub_policy, "detour", {"app": "anything"}, 7439)
    assert selects(hub_policy["spec"]["podSelector"], HUB_LABELS)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"proxy": {"cache": {"volume": "nfs"}}}, "at '/proxy/cache/volume': value must be one of"),
        ({"webhook": {"certifcate": "helm"}}, "'certifcate' not allowed"),
        ({"hub": {"replicas": 0}}, "at '/hub/replicas': minimum"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
    ],
)
def test_a_wrong_value_is_named(values: dict[str, Any], message: str) -> None:
    """values.schema.json: Helm refuses the values before rendering, naming the value."""
    with pytest.raises(helm().HelmValuesError, match=re.escape(message)):
        helm_render(values)


def test_the_release_workflow_publishes_the_chart_for_its_image(tmp_path: Path) -> None:
    """.github/workflows/image.yml's chart job, short of the push: its edit of values.yaml and
    the packaging with the tag's version make a chart that runs the image the job before
    published (ghcr.io/<owner>/<repo>, lower case, at that version)."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "image.yml").read_text())
    (step,) = [s for s in workflow["jobs"]["chart"]["steps"] if "run" in s]
    lines = step["run"].splitlines()
    (image,) = [line for line in lines if line.startswith("image=")]
    (edit,) = [line for line in lines if line.startswith("sed ")]
    assert "helm package deploy/helm/detour " in step["run"]
    copy_of_chart = tmp_path / "deploy" / "helm" / "detour"
    shutil.copytree(CHART, copy_of_chart)  # the dashboard's link followed, as helm's loader does
    script = f"{image}\n{edit}\n"
    subprocess.run(
        ["bash", "-euc", script],
        cwd=tmp_path,
        env={"GITHUB_REPOSITORY": "Edge-Org/Detour", "PATH": "/usr/bin:/bin"},
        check=True,
    )
    archive = helm().package(
        copy_of_chart, destination=tmp_path, version="0.2.0", app_version="0.2.0"
    )
    with helm().Chart.load(archive) as chart:
        manifests = chart.render({}, name="detour", namespace="detour")
    objects = [
        doc
        for name, text in manifests.items()
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    images = {
        c["image"]
        for o in objects
        if o["kind"] in WORKLOADS
        for field in ("initContainers", "containers")
        for c in o["spec"]["template"]["spec"].get(field, [])
    }
    assert images == {"ghcr.io/edge-org/detour:0.2.0"}
