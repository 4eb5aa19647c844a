"""What the webhook tests share: review bodies, a CA and a Secret mounted as kubelet mounts it,
and the webhook started over TLS, in this process or as ``detour webhook``.

The server runs on 127.0.0.1 with the SSL context ``run_webhook`` would use and certificates
issued by a throw-away CA, mounted the way kubelet mounts a Secret (files behind a ``..data``
symlink that a rotation swaps atomically); :class:`Webhook` posts AdmissionReview bodies with a
client that trusts only that CA. :func:`apply_patch` applies the JSONPatch it returns, so a test
compares the pod that results with what the pod should look like.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from proxy.settings import load_settings
from proxy.webhook import create_webhook_app
from proxy.webhook.tls import build_ssl_context
from tests.support import free_port

PREFIX = "localhost:7439"
HEX = "3f2c8b1e0a9d47c6b5e4f3a2d1c0b9a8f7e6d5c4b3a2918273645566778899aa"
DIGEST = f"sha256:{HEX}"
REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


# --- A tiny RFC 6902 applier: only what the webhook emits -------------------------------------


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_patch(document: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply ``add`` and ``replace`` operations, refusing anything RFC 6902 would refuse."""
    doc = copy.deepcopy(document)
    for op in patch:
        assert op["op"] in ("add", "replace"), op
        assert op["path"].startswith("/"), op
        *parents, last = [_unescape(t) for t in op["path"][1:].split("/")]
        target: Any = doc
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        if isinstance(target, list):
            index = len(target) if last == "-" else int(last)
            if op["op"] == "add":
                assert 0 <= index <= len(target), op
                target.insert(index, op["value"])
            else:
                assert 0 <= index < len(target), op
                target[index] = op["value"]
        else:
            assert isinstance(target, dict), f"{op['path']}: parent is not an object"
            if op["op"] == "replace":
                assert last in target, f"{op['path']}: replace of a missing member"
            target[last] = op["value"]
    return doc


# --- Review bodies: pods as tests write them, and as the API server sends them ----------------


def pod(
    *images: str,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "p"}
    if labels:
        metadata["labels"] = labels
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": f"c{i}", "image": im} for i, im in enumerate(images)]},
    }


def admission_review(
    obj: dict[str, Any] | None,
    *,
    namespace: str = "default",
    kind: dict[str, str] | None = None,
    resource: dict[str, str] | None = None,
    operation: str = "CREATE",
    sub_resource: str | None = None,
    old: dict[str, Any] | None = None,
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "uid": str(uuid.uuid4()),
        "kind": kind or {"group": "", "version": "v1", "kind": "Pod"},
        "resource": resource or {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": kind or {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": resource or {"group": "", "version": "v1", "resource": "pods"},
        "namespace": namespace,
        "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": obj,
        "oldObject": old,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    if sub_resource:
        request["subResource"] = sub_resource
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]] | None:
    if "patch" not in response:
        assert "patchType" not in response
        return None
    assert response["patchType"] == "JSONPatch"
    patch: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return patch


def nats_pod() -> dict[str, Any]:
    """The must-show pod: two init containers, four containers, one ephemeral container."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "nats-7d9c6b5f4-",
            "labels": {"app.kubernetes.io/name": "nats"},
        },
        "spec": {
            "initContainers": [
                {"name": "migrate", "image": "library/postgres:16", "args": ["migrate"]},
                {"name": "wait", "image": "busybox", "command": ["sh", "-c", "true"]},
            ],
            "containers": [
                {
                    "name": "nats",
                    "image": "nats:2.10.26-alpine",
                    "ports": [{"containerPort": 4222}],
                },
                {"name": "nack", "image": "ghcr.io/nats-io/nack:0.17.0"},
                {"name": "app", "image": "registry.local:5000/team/app:v1"},
                {"name": "exporter", "image": f"quay.io/prometheus/node-exporter@{DIGEST}"},
            ],
            "ephemeralContainers": [
                {"name": "debug", "image": f"{PREFIX}/docker.io/library/redis:7"}
            ],
        },
    }


def kube_pod(containers: int, env: int = 30) -> dict[str, Any]:
    """A pod as the API server sends it for a Deployment: probes, env, resources, mounts, and the
    managedFields it records (the densest JSON in a pod: every field is a key of an object)."""
    specs = []
    fields: dict[str, Any] = {}
    for i in range(containers):
        name = f"app-{i}"
        variables = [{"name": f"SETTING_{j}", "value": f"value-{j}"} for j in range(env)]
        specs.append(
            {
                "name": name,
                "image": f"registry.example.com/team/app-{i}:v1.2.3",
                "args": ["--port=8080", "--log-level=info"],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [
                    *variables,
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                ],
                "resources": {
                    "limits": {"cpu": "1", "memory": "512Mi"},
                    "requests": {"cpu": "100m", "memory": "128Mi"},
                },
                "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": True}],
                "readinessProbe": {
                    "httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP"},
                    "periodSeconds": 10,
                    "failureThreshold": 3,
                },
                "imagePullPolicy": "IfNotPresent",
                "terminationMessagePath": "/dev/termination-log",
                "securityContext": {"capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True},
            }
        )
        fields[f'k:{{"name":"{name}"}}'] = {
            ".": {},
            "f:args": {},
            "f:env": {
                ".": {},
                **{f'k:{{"name":"{v["name"]}"}}': {".": {}, "f:value": {}} for v in variables},
            },
            "f:image": {},
            "f:ports": {".": {}, 'k:{"containerPort":8080,"protocol":"TCP"}': {"f:name": {}}},
            "f:resources": {"f:limits": {"f:cpu": {}, "f:memory": {}}},
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "app-7d9c6b5f4-",
            "namespace": "apps",
            "labels": {"app.kubernetes.io/name": "app", "pod-template-hash": "7d9c6b5f4"},
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "app-7d9c6b5f4"}
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:containers": fields}},
                }
            ],
        },
        "spec": {
            "containers": specs,
            "volumes": [{"name": "config", "configMap": {"name": "app-config"}}],
            "restartPolicy": "Always",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}
            ],
        },
    }


def kube_review(size: int) -> bytes:
    """The AdmissionReview (CREATE) of the largest :func:`kube_pod` whose JSON is under ``size``."""

    def body(containers: int) -> bytes:
        review = admission_review(kube_pod(containers), namespace="apps")
        return json.dumps(review, separators=(",", ":")).encode()

    one, two = len(body(1)), len(body(2))
    containers = (size - one) // (two - one) + 1
    while len(found := body(containers)) > size:
        containers -= 1
    return found


def nested_lists(size: int, depth: int = 400) -> str:
    """JSON of lists nested ``depth`` deep, repeated to about ``size`` bytes: what json.loads
    expands most (44 times its size, 88 bytes a ``[``)."""
    unit = "[" * depth + "]" * depth
    return "[" + ",".join([unit] * max(1, size // (len(unit) + 1))) + "]"


def review_carrying(json_text: str) -> bytes:
    """A valid review of ``pod("nats:1")`` with ``json_text`` as its (ignored) options."""
    review = admission_review(pod("nats:1"), namespace="apps")
    review["request"]["options"] = "@OPTIONS@"
    return json.dumps(review).replace('"@OPTIONS@"', json_text).encode()


# --- A CA, server certificates, and a Secret mounted the way kubelet mounts it ----------------


@dataclass
class Pki:
    root: Path
    ca_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    ca_cert: x509.Certificate | None = None

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "detour test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_path.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_path(self) -> Path:
        return self.root / "ca.crt"

    def issue(self, serial: int) -> dict[str, bytes]:
        """A server certificate for 127.0.0.1 and localhost, as a Secret's ``tls.*`` keys."""
        assert self.ca_cert is not None
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "detour-webhook")]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        return {
            "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
            "tls.key": key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        }

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_path)


class MountedSecret:
    """A directory laid out as kubelet's AtomicWriter lays out a Secret volume.

    ``tls.crt -> ..data/tls.crt``, ``..data -> ..<timestamp>``; an update writes a new
    timestamped directory and renames a new ``..data`` symlink over the old one.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir()

    def write(self, files: dict[str, bytes]) -> None:
        self.generation += 1
        version = self.root / f"..2026_11_24_20_00_{self.generation:02d}.{uuid.uuid4().hex[:8]}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        staging = self.root / "..data_tmp"
        staging.symlink_to(version.name)
        os.replace(staging, self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")

    @property
    def cert(self) -> Path:
        return self.root / "tls.crt"

    @property
    def key(self) -> Path:
        return self.root / "tls.key"


def mount_secret(tmp_path: Path, pki: Pki) -> MountedSecret:
    """The Secret the tests start with: a certificate with serial 1001, in ``tmp_path/tls``."""
    mounted = MountedSecret(tmp_path / "tls")
    mounted.write(pki.issue(serial=1001))
    return mounted


# --- The server over TLS, in this process -----------------------------------------------------


@dataclass
class Webhook:
    url: str
    port: int
    pki: Pki

    def session(self) -> aiohttp.ClientSession:
        """A client trusting only the test CA; no connection reuse across sessions."""
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.pki.client_context()))

    async def review(self, body: Any, *, chunked: bool = False) -> tuple[int, Any]:
        """POST ``body`` (bytes, or JSON to encode) to /mutate; chunked: no Content-Length."""
        data: Any = body if isinstance(body, bytes) else json.dumps(body).encode()
        if chunked:
            data = _chunks(data, MiB)
        async with (
            self.session() as session,
            session.post(
                f"{self.url}/mutate", data=data, headers={"Content-Type": "application/json"}
            ) as response,
        ):
            return response.status, await response.json()

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with self.session() as session, session.get(f"{self.url}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def served_serial(self) -> int:
        """The serial number of the certificate a brand-new TLS connection is shown."""
        _, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.pki.client_context(), server_hostname="127.0.0.1"
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        return x509.load_der_x509_certificate(der).serial_number


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@contextlib.asynccontextmanager
async def serve_webhook(
    tmp_path: Path, pki: Pki, secret: MountedSecret, more: str = ""
) -> AsyncIterator[Webhook]:
    """The application over TLS on 127.0.0.1; ``more`` is YAML added to ``webhook:``."""
    config = tmp_path / "detour.yaml"
    config.write_text(
        "webhook:\n"
        f"  tls_cert: {secret.cert}\n"
        f"  tls_key: {secret.key}\n"
        "  tls_reload_interval: 0.05\n"
        f"  prefix: {PREFIX}\n"
        "  namespace: detour-system\n"
        "  ignore_images: ['^registry\\.internal/']\n" + more
    )
    settings = load_settings(config)
    context = build_ssl_context(settings.webhook)
    runner = web.AppRunner(create_webhook_app(settings, ssl_context=context))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    port = runner.addresses[0][1]
    try:
        yield Webhook(f"https://127.0.0.1:{port}", port, pki)
    finally:
        await runner.cleanup()
    leaked = [t for t in asyncio.all_tasks() if t.get_name().startswith("detour-") and not t.done()]
    assert not leaked, f"tasks left running after shutdown: {leaked}"


async def wait_for(condition: Any, within: float = 5.0) -> None:
    """Poll ``condition`` (the server's state is only visible from outside) until it holds."""
    async with asyncio.timeout(within):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.02)


# --- `detour webhook --config FILE`, as its own process ---------------------------------------


@dataclass
class Command:
    """``detour webhook`` running as its own process."""

    hook: Webhook
    pid: int
    log: Path

    def peak_rss(self) -> int:
        """VmHWM: the most memory the process has had resident, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmHWM in /proc/{self.pid}/status")


@contextlib.asynccontextmanager
async def detour_webhook(
    tmp_path: Path, pki: Pki, secret: MountedSecret, env: dict[str, str], more: str = ""
) -> AsyncIterator[Command]:
    """Run ``detour webhook --config FILE`` until it answers; stop it with SIGTERM after."""
    port = free_port()
    config = tmp_path / "detour.yaml"
    config.write_text(
        f"webhook:\n  listen: 127.0.0.1:{port}\n  tls_cert: {secret.cert}\n"
        f"  tls_key: {secret.key}\n" + more
    )
    log_path = tmp_path / "webhook.log"
    log = log_path.open("wb")
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "proxy", "webhook", "--config", str(config)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    hook = Webhook(f"https://127.0.0.1:{port}", port, pki)
    try:

        async def up() -> bool:
            assert process.returncode is None, log_path.read_text()
            try:
                async with hook.session() as session, session.get(f"{hook.url}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_for(up, within=20)
        yield Command(hook, process.pid, log_path)
    finally:
        process.send_signal(signal.SIGTERM)
        # Shutting down, aiohttp waits for connections still discarding a body it refused
        # unread, for up to its lingering_time (10 s), even when the client has gone.
        code = await asyncio.wait_for(process.wait(), 30)
        log.close()
    assert code == 0, log_path.read_text()
