"""The admission webhook: table tests of the rewrite, then real reviews over real TLS.

The server tests start the real aiohttp application on 127.0.0.1 with the SSL context
``run_webhook`` would use, certificates issued by a throw-away CA and mounted the way kubelet
mounts a Secret (files behind a ``..data`` symlink that a rotation swaps atomically), and post
AdmissionReview bodies with a client that trusts only that CA. The returned JSONPatch is applied
to the pod and the result compared with what the pod should look like.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

import proxy.webhook.server
from proxy.settings import ConfigError, WebhookSettings, load_settings
from proxy.webhook import create_webhook_app, rewrite_image
from proxy.webhook.review import parse_cost
from proxy.webhook.rewrite import (
    ORIGINAL_IMAGES_ANNOTATION,
    ImageRewrite,
    Policy,
    build_patch,
    plan_pod,
)
from proxy.webhook.server import MAX_EXPANSION
from proxy.webhook.tls import build_ssl_context

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


def test_apply_patch_refuses_adding_under_a_missing_object() -> None:
    with pytest.raises(KeyError):
        apply_patch(
            {"metadata": {}}, [{"op": "add", "path": "/metadata/annotations/a", "value": 1}]
        )


# --- Normalization and rewrite ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("nats:2.10.26-alpine", f"{PREFIX}/docker.io/library/nats:2.10.26-alpine"),
        ("library/postgres:16", f"{PREFIX}/docker.io/library/postgres:16"),
        ("busybox", f"{PREFIX}/docker.io/library/busybox:latest"),
        ("docker.io/nats", f"{PREFIX}/docker.io/library/nats:latest"),
        ("index.docker.io/bitnami/redis:7", f"{PREFIX}/docker.io/bitnami/redis:7"),
        ("ghcr.io/nats-io/nack:0.17.0", f"{PREFIX}/ghcr.io/nats-io/nack:0.17.0"),
        ("registry.local:5000/team/app:v1", f"{PREFIX}/registry.local_5000/team/app:v1"),
        ("localhost:5000/app", f"{PREFIX}/localhost_5000/app:latest"),
        ("registry:5000/app", f"{PREFIX}/registry_5000/app:latest"),
        ("registry.team-2/app:v1", f"{PREFIX}/registry.team-2/app:v1"),
        ("mirror.corp-01/x:1", f"{PREFIX}/mirror.corp-01/x:1"),
        ("svc.ns-2/app:v1", f"{PREFIX}/svc.ns-2/app:v1"),
        ("Quay.IO/x/y:1", f"{PREFIX}/quay.io/x/y:1"),
        (
            f"quay.io/prometheus/node-exporter@{DIGEST}",
            f"{PREFIX}/quay.io/prometheus/node-exporter@{DIGEST}",
        ),
        (f"nats:2.10@{DIGEST}", f"{PREFIX}/docker.io/library/nats:2.10@{DIGEST}"),
        (f"{PREFIX}/docker.io/library/redis:7", f"{PREFIX}/docker.io/library/redis:7"),
        (f"{PREFIX}/anything/at/all", f"{PREFIX}/anything/at/all"),
    ],
)
def test_rewrite_image(image: str, expected: str) -> None:
    assert rewrite_image(image, PREFIX) == expected
    assert rewrite_image(expected, PREFIX) == expected  # a second pass changes nothing


@pytest.mark.parametrize(
    "image",
    [
        "",
        "Nats:1",  # upper case repository
        "nats:bad tag",
        "nats@sha256:abc",  # short digest
        "nats@md5:0123456789abcdef0123456789abcdef",  # unsupported algorithm
        "[::1]:5000/app:v1",  # an IPv6 registry cannot be spelled in path mode
        "nats:",
    ],
)
def test_rewrite_image_refuses_what_does_not_parse(image: str) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        rewrite_image(image, PREFIX)


def test_rewrite_keeps_digest_bytes() -> None:
    out = rewrite_image(f"quay.io/x/y:v1@{DIGEST}", "cache.example:443")
    assert out == f"cache.example:443/quay.io/x/y:v1@{DIGEST}"
    assert out.endswith(HEX)


# --- Planning: what is skipped and why --------------------------------------------------------


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


POLICY = Policy(
    prefix=PREFIX,
    ignore_namespaces=frozenset({"kube-system", "detour"}),
    ignore_images=(),
    accept_images=(),
)


def _plan_summary(plan_: Any) -> tuple[Any, list[str], list[str]]:
    return (
        plan_.skip,
        [r.image for r in plan_.rewrites],
        [f"{s.image}:{s.reason}" for s in plan_.skipped_images],
    )


@pytest.mark.parametrize(
    ("case", "namespace", "policy", "expected"),
    [
        ("kube-system", "kube-system", POLICY, ("namespace", [], [])),
        ("own namespace", "detour", POLICY, ("namespace", [], [])),
        (
            "plain",
            "default",
            POLICY,
            (None, [f"{PREFIX}/docker.io/library/nats:1"], ["BAD:invalid_image"]),
        ),
        (
            "ignored",
            "default",
            Policy(prefix=PREFIX, ignore_images=(re.compile(r"^docker\.io/"),)),
            (None, [], ["nats:1:ignored_image", "BAD:invalid_image"]),
        ),
        (
            "ignored as written",
            "default",
            Policy(prefix=PREFIX, ignore_images=(re.compile(r"^nats:"),)),
            (None, [], ["nats:1:ignored_image", "BAD:invalid_image"]),
        ),
        (
            "accepted",
            "default",
            Policy(prefix=PREFIX, accept_images=(re.compile(r"ghcr\.io"),)),
            (None, [], ["nats:1:not_accepted", "BAD:invalid_image"]),
        ),
        (
            "accepted normalized",
            "default",
            Policy(prefix=PREFIX, accept_images=(re.compile(r"/library/nats:"),)),
            (None, [f"{PREFIX}/docker.io/library/nats:1"], ["BAD:invalid_image"]),
        ),
    ],
)
def test_plan_pod(case: str, namespace: str, policy: Policy, expected: Any) -> None:
    assert _plan_summary(plan_pod(pod("nats:1", "BAD"), namespace, policy)) == expected, case


@pytest.mark.parametrize(
    ("subject", "reason"),
    [
        (pod("nats:1", labels={"detour.io/skip": "true"}), "opt_out_label"),
        (pod("nats:1", annotations={"detour.io/skip": "True"}), "opt_out_annotation"),
        (pod("nats:1", labels={"detour.io/skip": "false"}), None),
        (pod("nats:1", annotations={"kubernetes.io/config.mirror": "0f3c"}), "mirror_pod"),
    ],
)
def test_plan_pod_opt_out(subject: dict[str, Any], reason: str | None) -> None:
    assert plan_pod(subject, "default", POLICY).skip == reason


def test_plan_pod_on_update_leaves_images_the_update_did_not_change() -> None:
    old = pod("nats:1", "redis:7")
    new = pod("nats:1", "redis:7")
    new["spec"]["ephemeralContainers"] = [{"name": "debug", "image": "busybox"}]
    plan_ = plan_pod(new, "default", POLICY, old_pod=old)
    assert [(r.key, r.image) for r in plan_.rewrites] == [
        ("ephemeralContainers/debug", f"{PREFIX}/docker.io/library/busybox:latest")
    ]


def test_plan_pod_refuses_a_pod_that_is_not_one() -> None:
    with pytest.raises(TypeError, match="spec"):
        plan_pod({"spec": []}, "default", POLICY)


# --- Patch building ---------------------------------------------------------------------------

NATS = ImageRewrite("containers", 0, "nats", "nats:1", f"{PREFIX}/docker.io/library/nats:1")
INIT = ImageRewrite(
    "initContainers", 0, "init", "busybox", f"{PREFIX}/docker.io/library/busybox:latest"
)
KEY = "detour.io~1original-images"


@pytest.mark.parametrize(
    ("metadata", "rewrites", "expected_tail", "recorded"),
    [
        pytest.param(
            {"name": "p"},
            [NATS],
            [
                {
                    "op": "add",
                    "path": "/metadata/annotations",
                    "value": {ORIGINAL_IMAGES_ANNOTATION: '{"containers/nats":"nats:1"}'},
                }
            ],
            {"containers/nats": "nats:1"},
            id="no annotations: add the whole object",
        ),
        pytest.param(
            None,
            [NATS],
            [
                {
                    "op": "add",
                    "path": "/metadata",
                    "value": {
                        "annotations": {ORIGINAL_IMAGES_ANNOTATION: '{"containers/nats":"nats:1"}'}
                    },
                }
            ],
            {"containers/nats": "nats:1"},
            id="no metadata at all",
        ),
        pytest.param(
            {"annotations": {"team": "a"}},
            [NATS, INIT],
            [
                {
                    "op": "add",
                    "path": f"/metadata/annotations/{KEY}",
                    "value": '{"containers/nats":"nats:1","initContainers/init":"busybox"}',
                }
            ],
            {"containers/nats": "nats:1", "initContainers/init": "busybox"},
            id="annotations present: add one member, key escaped",
        ),
        pytest.param(
            {"annotations": {ORIGINAL_IMAGES_ANNOTATION: '{"containers/old":"nats:0"}'}},
            [NATS],
            [
                {
                    "op": "add",
                    "path": f"/metadata/annotations/{KEY}",
                    "value": '{"containers/nats":"nats:1","containers/old":"nats:0"}',
                }
            ],
            {"containers/nats": "nats:1", "containers/old": "nats:0"},
            id="earlier record kept and merged",
        ),
        pytest.param(
            {"annotations": {ORIGINAL_IMAGES_ANNOTATION: "not json"}},
            [NATS],
            [
                {
                    "op": "add",
                    "path": f"/metadata/annotations/{KEY}",
                    "value": '{"containers/nats":"nats:1"}',
                }
            ],
            {"containers/nats": "nats:1"},
            id="unreadable record replaced",
        ),
        pytest.param(
            {"annotations": {ORIGINAL_IMAGES_ANNOTATION: "[" * 100_000 + "]" * 100_000}},
            [NATS],
            [
                {
                    "op": "add",
                    "path": f"/metadata/annotations/{KEY}",
                    "value": '{"containers/nats":"nats:1"}',
                }
            ],
            {"containers/nats": "nats:1"},
            id="record nested too deeply to read replaced",
        ),
    ],
)
def test_build_patch(
    metadata: dict[str, Any] | None,
    rewrites: list[ImageRewrite],
    expected_tail: list[dict[str, Any]],
    recorded: dict[str, str],
) -> None:
    subject: dict[str, Any] = {
        "spec": {
            "initContainers": [{"name": "init", "image": "busybox"}],
            "containers": [{"name": "nats", "image": "nats:1"}],
        }
    }
    if metadata is not None:
        subject["metadata"] = metadata
    patch = build_patch(subject, rewrites)
    replaces = [
        {"op": "replace", "path": f"/spec/{r.field}/{r.index}/image", "value": r.image}
        for r in rewrites
    ]
    assert patch == [*replaces, *expected_tail]
    result = apply_patch(subject, [dict(op) for op in patch])
    assert result["spec"]["containers"][0]["image"] == NATS.image
    assert json.loads(result["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION]) == recorded
    for name, value in (metadata or {}).get("annotations", {}).items():
        if name != ORIGINAL_IMAGES_ANNOTATION:
            assert result["metadata"]["annotations"][name] == value


def test_build_patch_without_rewrites_is_empty() -> None:
    assert build_patch(pod("nats:1"), []) == []


# --- Settings ---------------------------------------------------------------------------------


def test_settings_defaults_and_own_namespace() -> None:
    hook = WebhookSettings()
    assert (hook.listen, hook.prefix, hook.ignore_namespaces) == (
        "0.0.0.0:8443",
        "localhost:7439",
        ["kube-system"],
    )
    policy = Policy.from_settings(hook, {"POD_NAMESPACE": "detour-system"})
    assert policy.ignore_namespaces == {"kube-system", "detour-system"}
    policy = Policy.from_settings(WebhookSettings(namespace="mine"), {"POD_NAMESPACE": "x"})
    assert policy.ignore_namespaces == {"kube-system", "mine"}
    assert Policy.from_settings(hook, {}).ignore_namespaces == {"kube-system"}
    assert (hook.max_body, hook.max_concurrent) == (4 * MiB, 8)


def test_settings_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "detour.yaml"
    config.write_text(
        "webhook:\n"
        "  listen: 127.0.0.1:9443\n"
        "  prefix: Detour.Local:7439/\n"
        "  tls_reload_interval: 2s\n"
        "  ignore_namespaces: [kube-system, monitoring]\n"
        "  ignore_images: ['^registry\\.internal/']\n"
        "  accept_images: ['docker\\.io/', 'ghcr\\.io/']\n"
        "  max_body: 2.5MiB\n"
        "  max_concurrent: 3\n"
    )
    hook = load_settings(config).webhook
    assert (hook.max_body, hook.max_concurrent) == (int(2.5 * MiB), 3)
    assert hook.prefix == "detour.local:7439"
    assert hook.tls_reload_interval == 2.0
    assert hook.ignore_namespaces == ["kube-system", "monitoring"]
    assert hook.ignore_images[0].search("registry.internal/x:1")
    assert [p.pattern for p in hook.accept_images] == ["docker\\.io/", "ghcr\\.io/"]


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("webhook:\n  ignore_images: ['([']\n", "webhook.ignore_images.0"),
        ("webhook:\n  prefix: https://detour:7439\n", "without scheme or path"),
        ("webhook:\n  prefix: detour\n", "needs a '.'"),
        ("webhook:\n  prefix: localhost:7439/sub\n", "webhook.prefix"),
        ("webhook:\n  tls_reload_interval: soon\n", "webhook.tls_reload_interval"),
        ("webhook:\n  ignore_namespace: [x]\n", "webhook.ignore_namespace"),
        ("webhook:\n  max_body: 0\n", "webhook.max_body"),
        ("webhook:\n  max_body: lots\n", "webhook.max_body"),
        ("webhook:\n  max_concurrent: 0\n", "webhook.max_concurrent"),
    ],
)
def test_settings_refuse_bad_values(tmp_path: Path, yaml: str, message: str) -> None:
    config = tmp_path / "detour.yaml"
    config.write_text(yaml)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(config)


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


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def secret(tmp_path: Path, pki: Pki) -> MountedSecret:
    mounted = MountedSecret(tmp_path / "tls")
    mounted.write(pki.issue(serial=1001))
    return mounted


# --- The server over TLS ----------------------------------------------------------------------


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


@pytest.fixture
async def webhook(tmp_path: Path, pki: Pki, secret: MountedSecret) -> AsyncIterator[Webhook]:
    async with serve_webhook(tmp_path, pki, secret) as hook:
        yield hook


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


async def test_must_show_pod_is_rewritten_over_tls(webhook: Webhook) -> None:
    pod_ = nats_pod()
    review = admission_review(pod_, namespace="messaging")
    status, answer = await webhook.review(review)

    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is True
    patch = patch_of(response)
    assert patch is not None
    mutated = apply_patch(pod_, patch)

    expected = nats_pod()
    images = {
        ("initContainers", 0): f"{PREFIX}/docker.io/library/postgres:16",
        ("initContainers", 1): f"{PREFIX}/docker.io/library/busybox:latest",
        ("containers", 0): f"{PREFIX}/docker.io/library/nats:2.10.26-alpine",
        ("containers", 1): f"{PREFIX}/ghcr.io/nats-io/nack:0.17.0",
        ("containers", 2): f"{PREFIX}/registry.local_5000/team/app:v1",
        ("containers", 3): f"{PREFIX}/quay.io/prometheus/node-exporter@{DIGEST}",
        ("ephemeralContainers", 0): f"{PREFIX}/docker.io/library/redis:7",
    }
    for (where, index), image in images.items():
        expected["spec"][where][index]["image"] = image
    recorded = json.loads(mutated["metadata"]["annotations"].pop(ORIGINAL_IMAGES_ANNOTATION))
    assert mutated["metadata"].pop("annotations") == {}
    assert mutated == expected
    assert recorded == {
        "initContainers/migrate": "library/postgres:16",
        "initContainers/wait": "busybox",
        "containers/nats": "nats:2.10.26-alpine",
        "containers/nack": "ghcr.io/nats-io/nack:0.17.0",
        "containers/app": "registry.local:5000/team/app:v1",
        "containers/exporter": f"quay.io/prometheus/node-exporter@{DIGEST}",
    }

    # A second pass (a re-invocation, or the pod sent again) changes nothing.
    again = admission_review(apply_patch(pod_, patch), namespace="messaging")
    status, answer = await webhook.review(again)
    assert status == 200
    assert answer["response"] == {"uid": again["request"]["uid"], "allowed": True}

    metrics = await webhook.metrics()
    assert metrics[("detour_webhook_images_rewritten_total", ())] == 6
    assert metrics[("detour_webhook_reviews_total", (("outcome", "mutated"),))] == 1
    assert metrics[("detour_webhook_reviews_total", (("outcome", "unchanged"),))] == 1
    # One already-prefixed image on the first pass, all seven on the second.
    assert metrics[("detour_webhook_skips_total", (("reason", "already_prefixed"),))] == 8


async def test_later_pass_merges_the_record_without_clobbering_it(webhook: Webhook) -> None:
    first = pod("nats:1")
    _, answer = await webhook.review(admission_review(first))
    patch = patch_of(answer["response"])
    assert patch is not None
    mutated = apply_patch(first, patch)
    # Another container is added (another webhook, say) and the pod reviewed again.
    mutated["spec"]["containers"].append({"name": "side", "image": "redis:7"})
    _, answer = await webhook.review(admission_review(mutated))
    patch = patch_of(answer["response"])
    assert patch is not None
    final = apply_patch(mutated, patch)
    assert [c["image"] for c in final["spec"]["containers"]] == [
        f"{PREFIX}/docker.io/library/nats:1",
        f"{PREFIX}/docker.io/library/redis:7",
    ]
    assert json.loads(final["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION]) == {
        "containers/c0": "nats:1",
        "containers/side": "redis:7",
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b"", "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", '
            b'"request": {"uid": "x", "object": ' + b"[" * 5_000 + b"]" * 5_000 + b"}}",
            "nested too deeply",
        ),
        (b"[]", "JSON object"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "no request"),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}',
            "no uid",
        ),
        (b'{"apiVersion": "v1", "kind": "Pod", "request": {"uid": "x"}}', "AdmissionReview"),
        (
            b'{"apiVersion": "admission.k8s.io/v2", "kind": "AdmissionReview", '
            b'"request": {"uid": "x"}}',
            "apiVersion",
        ),
    ],
)
async def test_malformed_reviews_get_400(webhook: Webhook, body: bytes, message: str) -> None:
    status, answer = await webhook.review(body)
    assert status == 400
    assert message in answer["message"]
    metrics = await webhook.metrics()
    assert metrics[("detour_webhook_reviews_total", (("outcome", "malformed"),))] == 1


# --- Limits: body size, parse cost, the queue for large reviews ------------------------------


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


def test_kube_review_is_as_large_as_asked() -> None:
    body = kube_review(256 * 1024)
    assert 250 * 1024 < len(body) <= 256 * 1024


SHAPES = {
    "lists in lists": nested_lists(256 * 1024),
    "dicts in dicts": "[" + ",".join(['{"":' * 300 + "{}" + "}" * 300] * 100) + "]",
    "empty dicts": "[" + ",".join(["{}"] * 80_000) + "]",
    "one-key dicts": "[" + ",".join(['{"":0}'] * 40_000) + "]",
    "short strings": "[" + ",".join(['"ab"'] * 50_000) + "]",
    "unique keys": "{" + ",".join(f'"{i:x}":0' for i in range(30_000)) + "}",
    "ints": "[" + ",".join(["-6"] * 80_000) + "]",
    "floats": "[" + ",".join(["1e0"] * 60_000) + "]",
    # One character outside the BMP makes its whole string 4 bytes a character.
    "UCS-4 strings": json.dumps(["\U0001f600" + "a" * 1000] * 250, ensure_ascii=False),
    "UCS-4 by escapes": json.dumps(["\U0001f600" + "a" * 1000] * 250),
    "a pod": kube_review(256 * 1024).decode(),
}


@pytest.mark.parametrize("text", SHAPES.values(), ids=SHAPES.keys())
def test_parse_cost_bounds_what_parsing_takes(text: str) -> None:
    body = text.encode()
    tracemalloc.start()
    try:
        parsed = json.loads(body.decode())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del parsed
    assert peak <= parse_cost(body)


def test_parse_cost_admits_every_review_the_api_server_sends() -> None:
    body = kube_review(256 * 1024)
    # An ASCII pod is parsed up to max_body; the API server sends at most about 3 MiB, and a
    # pod with any other character (parse_cost assumes 4 bytes each then) is parsed up to that.
    assert parse_cost(body) / len(body) <= MAX_EXPANSION
    wide = body.replace(b'"value-1"', '"välue-1"'.encode())
    assert parse_cost(wide) / len(wide) <= MAX_EXPANSION * 4 / 3


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_review_over_max_body_gets_413(webhook: Webhook, chunked: bool) -> None:
    big = pod("nats:1", annotations={"note": "x" * (4 * MiB)})
    status, answer = await webhook.review(admission_review(big), chunked=chunked)
    assert status == 413
    assert "larger than webhook.max_body (4.0 MiB)" in answer["message"]
    status, _ = await webhook.review(admission_review(pod("nats:1")))
    assert status == 200
    metrics = await webhook.metrics()
    assert metrics[("detour_webhook_reviews_total", (("outcome", "too_large"),))] == 1
    assert metrics[("detour_webhook_reviews_total", (("outcome", "mutated"),))] == 1


async def test_a_review_that_could_take_too_much_memory_to_parse_gets_413(
    webhook: Webhook,
) -> None:
    # 2 MiB of lists in lists would take 88 MiB in Python objects: more than 20 x 4 MiB.
    body = review_carrying(nested_lists(2 * MiB))
    assert len(body) < 4 * MiB
    status, answer = await webhook.review(body)
    assert status == 413
    assert "to parse, more than 20 times webhook.max_body (80.0 MiB)" in answer["message"]
    metrics = await webhook.metrics()
    assert metrics[("detour_webhook_reviews_total", (("outcome", "too_large"),))] == 1


async def _stall(
    hook: Webhook, announced: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request that announces ``announced`` bytes of body and sends one."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", hook.port, ssl=hook.pki.client_context(), server_hostname="127.0.0.1"
    )
    writer.write(
        b"POST /mutate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {announced}\r\n\r\n{{".encode()
    )
    await writer.drain()
    return reader, writer


async def test_large_reviews_wait_their_turn_and_slow_senders_lose_it(
    tmp_path: Path, pki: Pki, secret: MountedSecret, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy.webhook.server, "BODY_TIMEOUT", 2.0)
    async with serve_webhook(tmp_path, pki, secret, "  max_concurrent: 2\n") as hook:
        # Two senders that stop after a byte hold both turns for large reviews.
        stalled = [await _stall(hook, MiB) for _ in range(2)]
        cut_off = [asyncio.create_task(reader.readline()) for reader, _ in stalled]
        big = admission_review(pod("nats:1", annotations={"note": "x" * 300_000}))
        waiting = asyncio.create_task(hook.review(big))
        # A small review does not queue behind them: it is answered before they are cut off.
        small = asyncio.create_task(hook.review(admission_review(pod("redis:7"))))
        done, _ = await asyncio.wait([small, *cut_off], return_when=asyncio.FIRST_COMPLETED)
        assert done == {small}
        assert small.result()[0] == 200
        assert not waiting.done()
        # After BODY_TIMEOUT the slow senders get 408, and the large review its turn.
        assert [(await line).split(b" ")[1] for line in cut_off] == [b"408", b"408"]
        status, answer = await waiting
        assert status == 200
        assert patch_of(answer["response"]) is not None
        for _, writer in stalled:
            writer.close()
        metrics = await hook.metrics()
        assert metrics[("detour_webhook_reviews_total", (("outcome", "timeout"),))] == 2
        assert metrics[("detour_webhook_reviews_total", (("outcome", "mutated"),))] == 2


async def test_a_sender_that_goes_away_mid_body_is_let_go(
    webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    """The API server stops waiting after timeoutSeconds: counted, and no error logged."""
    _, writer = await _stall(webhook, MiB)
    writer.close()

    async def abandoned() -> bool:
        metrics = await webhook.metrics()
        return metrics[("detour_webhook_reviews_total", (("outcome", "abandoned"),))] == 1

    await _wait_for(abandoned)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "review",
    [
        pytest.param(
            admission_review(
                {"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": {}}},
                kind={"group": "apps", "version": "v1", "kind": "Deployment"},
                resource={"group": "apps", "version": "v1", "resource": "deployments"},
            ),
            id="deployment",
        ),
        pytest.param(
            admission_review(
                {"kind": "ConfigMap", "data": {"image": "nats:1"}},
                kind={"group": "", "version": "v1", "kind": "ConfigMap"},
                resource={"group": "", "version": "v1", "resource": "configmaps"},
            ),
            id="configmap",
        ),
        pytest.param(
            admission_review(pod("nats:1"), operation="UPDATE", sub_resource="status"),
            id="pods/status",
        ),
        pytest.param(admission_review(None, operation="DELETE", old=pod("nats:1")), id="delete"),
    ],
)
async def test_anything_but_a_pod_is_allowed_unchanged(
    webhook: Webhook, review: dict[str, Any]
) -> None:
    status, answer = await webhook.review(review)
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["response"] == {"uid": review["request"]["uid"], "allowed": True}


async def test_new_ephemeral_container_is_rewritten_and_existing_ones_are_not(
    webhook: Webhook,
) -> None:
    old = pod(f"{PREFIX}/docker.io/library/nats:1")
    old["spec"]["ephemeralContainers"] = [{"name": "debug-1", "image": "busybox"}]
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"].append({"name": "debug-2", "image": "alpine:3.20"})
    review = admission_review(new, operation="UPDATE", sub_resource="ephemeralcontainers", old=old)
    _, answer = await webhook.review(review)
    patch = patch_of(answer["response"])
    assert patch is not None
    result = apply_patch(new, patch)
    assert [c["image"] for c in result["spec"]["ephemeralContainers"]] == [
        "busybox",  # the API server refuses changes to an existing ephemeral container
        f"{PREFIX}/docker.io/library/alpine:3.20",
    ]


async def test_skips_leave_pods_alone_and_are_counted(webhook: Webhook) -> None:
    skipped = [
        admission_review(pod("nats:1"), namespace="kube-system"),
        admission_review(pod("nats:1"), namespace="detour-system"),  # the webhook's own
        admission_review(pod("nats:1", labels={"detour.io/skip": "true"})),
        admission_review(pod("nats:1", annotations={"detour.io/skip": "true"})),
    ]
    for review in skipped:
        status, answer = await webhook.review(review)
        assert status == 200
        assert answer["response"] == {"uid": review["request"]["uid"], "allowed": True}

    mixed = pod("nats:1", "registry.internal/base:1", "Not/Valid:1")
    _, answer = await webhook.review(admission_review(mixed, namespace="apps"))
    patch = patch_of(answer["response"])
    assert patch is not None
    result = apply_patch(mixed, patch)
    assert [c["image"] for c in result["spec"]["containers"]] == [
        f"{PREFIX}/docker.io/library/nats:1",
        "registry.internal/base:1",
        "Not/Valid:1",
    ]

    metrics = await webhook.metrics()
    skips = {
        dict(labels)["reason"]: value
        for (name, labels), value in metrics.items()
        if name == "detour_webhook_skips_total"
    }
    assert skips == {
        "namespace": 2,
        "opt_out_label": 1,
        "opt_out_annotation": 1,
        "mirror_pod": 0,
        "ignored_image": 1,
        "invalid_image": 1,
        "already_prefixed": 0,
        "not_accepted": 0,
    }
    assert metrics[("detour_webhook_reviews_total", (("outcome", "skipped"),))] == 4


async def test_internal_error_still_allows_the_pod(webhook: Webhook) -> None:
    review = admission_review({"kind": "Pod", "metadata": {"name": "odd"}, "spec": ["?"]})
    status, answer = await webhook.review(review)
    assert status == 200
    assert answer["response"] == {"uid": review["request"]["uid"], "allowed": True}
    metrics = await webhook.metrics()
    assert metrics[("detour_webhook_reviews_total", (("outcome", "error"),))] == 1


async def test_healthz(webhook: Webhook) -> None:
    async with webhook.session() as session, session.get(f"{webhook.url}/healthz") as response:
        assert response.status == 200
        assert await response.text() == "ok\n"


async def _wait_for(condition: Any, within: float = 5.0) -> None:
    """Poll ``condition`` (the server's state is only visible from outside) until it holds."""
    async with asyncio.timeout(within):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.02)


async def test_rotated_certificate_is_served_to_new_connections(
    webhook: Webhook, pki: Pki, secret: MountedSecret
) -> None:
    assert await webhook.served_serial() == 1001

    secret.write(pki.issue(serial=1002))

    async def rotated() -> bool:
        return await webhook.served_serial() == 1002

    await _wait_for(rotated)
    status, answer = await webhook.review(admission_review(pod("nats:1")))
    assert status == 200
    assert patch_of(answer["response"]) is not None
    metrics = await webhook.metrics()
    assert metrics[("detour_webhook_tls_reloads_total", (("result", "success"),))] == 1


async def test_broken_rotation_keeps_the_old_certificate(
    webhook: Webhook, pki: Pki, secret: MountedSecret
) -> None:
    # A certificate with someone else's key: refused, the old pair keeps serving.
    good, other = pki.issue(serial=2002), pki.issue(serial=2003)
    secret.write({"tls.crt": good["tls.crt"], "tls.key": other["tls.key"]})

    async def refused() -> bool:
        metrics = await webhook.metrics()
        return metrics[("detour_webhook_tls_reloads_total", (("result", "failure"),))] == 1

    await _wait_for(refused)
    assert await webhook.served_serial() == 1001
    status, _ = await webhook.review(admission_review(pod("nats:1")))
    assert status == 200

    secret.write(good)

    async def rotated() -> bool:
        return await webhook.served_serial() == 2002

    await _wait_for(rotated)


# --- `detour webhook --config FILE`, the command itself ---------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def command_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETOUR_")}
    env["POD_NAMESPACE"] = "detour-system"
    return env


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
    port = _free_port()
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

        await _wait_for(up, within=20)
        yield Command(hook, process.pid, log_path)
    finally:
        process.send_signal(signal.SIGTERM)
        # Shutting down, aiohttp waits for connections still discarding a body it refused
        # unread, for up to its lingering_time (10 s), even when the client has gone.
        code = await asyncio.wait_for(process.wait(), 30)
        log.close()
    assert code == 0, log_path.read_text()


async def test_detour_webhook_command_serves_reviews(
    tmp_path: Path, pki: Pki, secret: MountedSecret, command_env: dict[str, str]
) -> None:
    async with detour_webhook(
        tmp_path, pki, secret, command_env, "  prefix: cache.example:7439\n"
    ) as command:
        hook = command.hook
        _, answer = await hook.review(admission_review(pod("busybox"), namespace="apps"))
        patch = patch_of(answer["response"])
        assert patch is not None
        result = apply_patch(pod("busybox"), patch)
        assert result["spec"]["containers"][0]["image"] == (
            "cache.example:7439/docker.io/library/busybox:latest"
        )
        _, answer = await hook.review(admission_review(pod("busybox"), namespace="detour-system"))
        assert patch_of(answer["response"]) is None  # POD_NAMESPACE is the webhook's own
    lines = [json.loads(line) for line in (tmp_path / "webhook.log").read_text().splitlines()]
    started = next(line for line in lines if line["event"] == "webhook_listening")
    assert started["ignore_namespaces"] == ["detour-system", "kube-system"]
    mutated = next(line for line in lines if line["event"] == "pod_mutated")
    assert mutated["images"]["containers/c0"][0] == "busybox"


def test_detour_webhook_command_without_certificate_says_so(
    tmp_path: Path, command_env: dict[str, str]
) -> None:
    config = tmp_path / "detour.yaml"
    config.write_text(
        f"webhook:\n  tls_cert: {tmp_path}/nope.crt\n  tls_key: {tmp_path}/nope.key\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "webhook", "--config", str(config)],
        cwd=REPO_ROOT,
        env=command_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "webhook.tls_cert" in done.stderr
    assert "nope.crt" in done.stderr


# --- Memory under load: `detour webhook` with the default limits, its peak RSS measured -------

MAX_BODY = 4 * MiB
MAX_CONCURRENT = 8
LIMIT = 256 * MiB  # deploy/kubernetes/base/webhook-deployment.yaml


def memory_bound(idle: int, *, read: int, parsed: bool, connections: int) -> int:
    """The module docstring's bound: ``read`` bodies read at once (at most max_concurrent) with
    their bytearray's slack, the one review being parsed, and each connection's read buffers.
    With the defaults and 12 connections: idle + 40 + 80 + 15 MiB."""
    assert read <= MAX_CONCURRENT
    parsing = MAX_EXPANSION * MAX_BODY if parsed else 0
    return int(idle + read * 1.25 * MAX_BODY + parsing + connections * 1.25 * MiB)


def _report(label: str, idle: int, peak: int) -> None:
    print(f"{label}: VmHWM idle {idle / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB")


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc/<pid>/status"
)


@needs_proc
async def test_twelve_15_mib_reviews_get_413_and_valid_ones_their_patch(
    tmp_path: Path, pki: Pki, secret: MountedSecret, command_env: dict[str, str]
) -> None:
    """The incident: 12 concurrent 15 MiB reviews took it to 300 MiB. Now they are refused
    unread (or, without a Content-Length, at 4 MiB), while ordinary reviews are answered."""
    oversized = json.dumps(
        admission_review(pod("nats:1", annotations={"note": "x" * (15 * MiB)}))
    ).encode()
    valid = [admission_review(nats_pod(), namespace=f"team-{i}") for i in range(8)]
    async with detour_webhook(tmp_path, pki, secret, command_env) as command:
        hook = command.hook
        assert (await hook.review(valid[0]))[0] == 200
        idle = command.peak_rss()
        results = await asyncio.gather(
            *(hook.review(oversized) for _ in range(12)),
            *(hook.review(oversized, chunked=True) for _ in range(4)),
            *(hook.review(review) for review in valid),
        )
        peak = command.peak_rss()
    _report("12 + 4 chunked 15 MiB reviews, 8 valid ones", idle, peak)

    for status, answer in results[:16]:
        assert status == 413
        assert "larger than webhook.max_body (4.0 MiB)" in answer["message"]
    for review, (status, answer) in zip(valid, results[16:], strict=True):
        assert status == 200
        assert answer["response"]["uid"] == review["request"]["uid"]
        patch = patch_of(answer["response"])
        assert patch is not None
        images = [c["image"] for c in apply_patch(nats_pod(), patch)["spec"]["containers"]]
        assert images[0] == f"{PREFIX}/docker.io/library/nats:2.10.26-alpine"
    # Only the 4 chunked bodies are read, to the limit; nothing that large is parsed.
    assert peak <= memory_bound(idle, read=4, parsed=False, connections=24)
    assert peak < LIMIT // 2


@needs_proc
async def test_twelve_reviews_just_under_the_limits_stay_inside_the_memory_bound(
    tmp_path: Path, pki: Pki, secret: MountedSecret, command_env: dict[str, str]
) -> None:
    """12 concurrent pods just under max_body, then 12 reviews just under the parse budget in
    the shape json.loads expands most: every one is answered, inside the bound."""
    pods = kube_review(MAX_BODY)
    worst = review_carrying(nested_lists(1))
    budget = MAX_EXPANSION * MAX_BODY - parse_cost(worst)
    worst = review_carrying(nested_lists(int(budget / 50.5)))
    assert MAX_BODY - 64 * 1024 < len(pods) <= MAX_BODY
    assert 0.99 * MAX_EXPANSION * MAX_BODY < parse_cost(worst) <= MAX_EXPANSION * MAX_BODY
    async with detour_webhook(tmp_path, pki, secret, command_env) as command:
        hook = command.hook
        assert (await hook.review(admission_review(pod("nats:1"))))[0] == 200
        idle = command.peak_rss()
        results = await asyncio.gather(*(hook.review(pods) for _ in range(12)))
        after_pods = command.peak_rss()
        results += await asyncio.gather(*(hook.review(worst) for _ in range(12)))
        peak = command.peak_rss()
    _report(f"12 pods of {len(pods) / MiB:.2f} MiB", idle, after_pods)
    _report(f"then 12 reviews of {len(worst) / MiB:.2f} MiB that parse to ~80 MiB", idle, peak)

    containers = len(json.loads(pods)["request"]["object"]["spec"]["containers"])
    for status, answer in results[:12]:
        assert status == 200
        patch = patch_of(answer["response"])
        assert patch is not None
        assert len(patch) == containers + 1  # every image, and the record of the originals
    for status, answer in results[12:]:
        assert status == 200
        patch = patch_of(answer["response"])
        assert patch is not None
        assert patch[0]["value"] == f"{PREFIX}/docker.io/library/nats:1"
    assert peak <= memory_bound(idle, read=MAX_CONCURRENT, parsed=True, connections=12)
    assert peak < 3 * LIMIT // 4
