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
import copy
import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
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

from proxy.settings import ConfigError, WebhookSettings, load_settings
from proxy.webhook import (
    ORIGINAL_IMAGES_ANNOTATION,
    ImageRewrite,
    Policy,
    build_patch,
    build_ssl_context,
    create_webhook_app,
    plan_pod,
    rewrite_image,
)

PREFIX = "localhost:7439"
HEX = "3f2c8b1e0a9d47c6b5e4f3a2d1c0b9a8f7e6d5c4b3a2918273645566778899aa"
DIGEST = f"sha256:{HEX}"
REPO_ROOT = Path(__file__).resolve().parent.parent


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
    )
    hook = load_settings(config).webhook
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

    async def review(self, body: Any) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
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


@pytest.fixture
async def webhook(tmp_path: Path, pki: Pki, secret: MountedSecret) -> AsyncIterator[Webhook]:
    config = tmp_path / "detour.yaml"
    config.write_text(
        "webhook:\n"
        f"  tls_cert: {secret.cert}\n"
        f"  tls_key: {secret.key}\n"
        "  tls_reload_interval: 0.05\n"
        f"  prefix: {PREFIX}\n"
        "  namespace: detour-system\n"
        "  ignore_images: ['^registry\\.internal/']\n"
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


async def test_detour_webhook_command_serves_reviews(
    tmp_path: Path, pki: Pki, secret: MountedSecret, command_env: dict[str, str]
) -> None:
    port = _free_port()
    config = tmp_path / "detour.yaml"
    config.write_text(
        f"webhook:\n  listen: 127.0.0.1:{port}\n  tls_cert: {secret.cert}\n"
        f"  tls_key: {secret.key}\n  prefix: cache.example:7439\n"
    )
    log = (tmp_path / "webhook.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "proxy", "webhook", "--config", str(config)],
        cwd=REPO_ROOT,
        env=command_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    hook = Webhook(f"https://127.0.0.1:{port}", port, pki)
    try:

        async def up() -> bool:
            assert process.returncode is None, (tmp_path / "webhook.log").read_text()
            try:
                async with hook.session() as session, session.get(f"{hook.url}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await _wait_for(up, within=20)
        _, answer = await hook.review(admission_review(pod("busybox"), namespace="apps"))
        patch = patch_of(answer["response"])
        assert patch is not None
        result = apply_patch(pod("busybox"), patch)
        assert result["spec"]["containers"][0]["image"] == (
            "cache.example:7439/docker.io/library/busybox:latest"
        )
        _, answer = await hook.review(admission_review(pod("busybox"), namespace="detour-system"))
        assert patch_of(answer["response"]) is None  # POD_NAMESPACE is the webhook's own
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 10)
        log.close()
    assert code == 0
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
