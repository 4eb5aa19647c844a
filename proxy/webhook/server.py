"""The mutating admission webhook: point every pod's images at Detour in path mode.

``detour webhook --config FILE`` serves ``POST /mutate`` (AdmissionReview
``admission.k8s.io/v1``) over TLS, plus ``GET /healthz`` and ``GET /metrics``. For each pod it
rewrites the image of every entry in ``spec.containers``, ``spec.initContainers`` and
``spec.ephemeralContainers``: the reference is normalized, then prefixed with
``webhook.prefix``, a registry port spelled ``_<port>`` as the proxy's path mode expects (a
host name never contains ``_``, so ``registry.team-2`` stays the host it is)::

    nats:2.10.26-alpine              → localhost:7439/docker.io/library/nats:2.10.26-alpine
    busybox                          → localhost:7439/docker.io/library/busybox:latest
    registry.local:5000/team/app:v1  → localhost:7439/registry.local_5000/team/app:v1
    registry.team-2/app:v1           → localhost:7439/registry.team-2/app:v1
    quay.io/x/y@sha256:<hex>         → localhost:7439/quay.io/x/y@sha256:<hex>   (byte for byte)
    localhost:7439/...               → unchanged, so a second pass changes nothing

Names on the pod:

``detour.io/original-images`` (annotation, written by the webhook)
    One JSON object mapping ``containers/<name>``, ``initContainers/<name>`` and
    ``ephemeralContainers/<name>`` to the image as it was written before the rewrite. Later
    passes merge into it and never overwrite an entry with an already-prefixed image.
``detour.io/skip: "true"`` (label or annotation, set by you)
    Leave this pod alone. To exempt a whole namespace, put the label on the namespace and give
    the MutatingWebhookConfiguration a ``namespaceSelector`` that excludes it.

Skipped, with the pod or image left unchanged and ``detour_webhook_skips_total{reason}``
counted: pods in ``webhook.ignore_namespaces`` (``kube-system`` by default) or in the webhook's
own namespace (``webhook.namespace``, else ``$POD_NAMESPACE``) — reason ``namespace``; opted-out
pods — ``opt_out_label`` / ``opt_out_annotation``; mirror pods of static pods, which run from
the node's own manifest whatever the API says — ``mirror_pod``; and, one image at a time,
images matching a ``webhook.ignore_images`` regex — ``ignored_image``, images matching no
``webhook.accept_images`` regex when that list is set — ``not_accepted``, images that do not
parse — ``invalid_image``, and images already behind the prefix — ``already_prefixed``. A regex
matches when ``re.search`` finds it in the image as written or in its normalized form.

Failure modes: a body that is not JSON (or is nested deeper than the parser goes), or not an
AdmissionReview with a ``request`` and a ``request.uid``, gets HTTP 400 with a message.
A body over ``webhook.max_body`` gets 413 (at once when its ``Content-Length`` says so, else at
the first byte past the limit), and so does one whose JSON could take more than
``MAX_EXPANSION`` times ``webhook.max_body`` of memory to parse (:func:`parse_cost`); a body that
takes longer than ``BODY_TIMEOUT`` to arrive gets 408. The API server then applies the
webhook's ``failurePolicy``. A sender that goes away before its body is read (the API server
gave up waiting) is counted and logged at info.
Anything that is not a pod (``request.kind.kind`` other than ``Pod``,
``request.resource.resource`` other than ``pods``, a sub-resource other than
``ephemeralcontainers``, an operation other than CREATE or UPDATE) is allowed unchanged. Any
internal error still allows the pod, unchanged; it is logged and counted as
``detour_webhook_reviews_total{outcome="error"}``: the webhook must never be the reason a pod
cannot start. On UPDATE only images that differ from ``oldObject`` are rewritten, so a pod
created while the webhook was down is not restarted by an unrelated update, and existing
ephemeral containers (which the API server refuses to change) are not touched.

The TLS certificate and key are polled every ``webhook.tls_reload_interval`` seconds (a mounted
Secret is updated by a symlink swap that file events do not reliably report); when their content
changes and the new pair loads, new connections get the new certificate. A pair that does not
load (a half-written rotation, a key that does not match) is logged and the old one kept.

Memory: a killed webhook admits pods un-rewritten, so what it holds at once is bounded. Bodies
over ``SMALL_BODY`` are read inside a semaphore of ``webhook.max_concurrent``: the requests
waiting for it keep their bodies in the kernel, not in the process (smaller bodies are in
aiohttp's read buffer before the handler runs, so they skip the wait). Nothing awaits between
decoding a body and answering it, so only one review at a time is ever in its parsed form.
The peak resident memory is then at most::

    idle + max_concurrent * 1.25 * max_body      bodies being read (bytearray slack)
         + MAX_EXPANSION * max_body              the one review being parsed
         + 1.25 MiB per connection waiting       aiohttp's and TLS's read buffers

about 50 + 40 + 80 MiB with the defaults, plus the connections (tests/test_webhook.py measures
it).

Metrics (own registry, not the process-global one): ``detour_webhook_reviews_total{outcome}``
(``mutated``, ``unchanged``, ``skipped``, ``ignored``, ``error``, ``malformed``, ``too_large``,
``timeout``, ``abandoned``),
``detour_webhook_skips_total{reason}``, ``detour_webhook_images_rewritten_total``,
``detour_webhook_tls_reloads_total{result}`` (``success``, ``failure``).

Only :mod:`proxy.reference`, :mod:`proxy.errors` and :mod:`proxy.settings` are imported from
the proxy: the webhook runs as its own Deployment and shares nothing else with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NotRequired, Required, TypedDict, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from proxy.logs import configure_logging, get_logger
from proxy.reference import Reference, parse_json
from proxy.settings import ConfigError, Settings, WebhookSettings, split_host_port

ORIGINAL_IMAGES_ANNOTATION: Final = "detour.io/original-images"
SKIP_LABEL: Final = "detour.io/skip"
SKIP_ANNOTATION: Final = "detour.io/skip"
# Set by kubelet on the API's copy of a static pod; that pod runs from the node's manifest.
MIRROR_POD_ANNOTATION: Final = "kubernetes.io/config.mirror"
SUPPORTED_API_VERSIONS: Final = frozenset({"admission.k8s.io/v1", "admission.k8s.io/v1beta1"})
CONTAINER_FIELDS: Final = ("initContainers", "containers", "ephemeralContainers")
# A body this small is in aiohttp's read buffer (256 KiB, its default) before the handler runs:
# making it wait for the semaphore would save no memory, and would queue it behind large ones.
SMALL_BODY: Final = 256 * 1024
# The most bytes json.loads allocates per ``{``, ``[``, ``,`` or ``:`` in a body (measured on
# CPython 3.11: a list nested in a list takes 88 bytes for one ``[``; see parse_cost).
PARSE_COST_PER_TOKEN: Final = 96
# A review is parsed only if parse_cost bounds it by this many times webhook.max_body. It puts
# pods as the API server sends them at about 19 times their size (25 with any non-ASCII text),
# so with max_body at 4 MiB every review up to 3.2 MiB is parsed: the API server sends 3 MiB.
MAX_EXPANSION: Final = 20
# A body must arrive within this many seconds, so a slow sender cannot keep a turn for long; the
# API server gives up after the webhook's timeoutSeconds (5 in the manifests, 30 at most).
BODY_TIMEOUT: Final = 10.0

PodSkipReason = Literal["namespace", "opt_out_label", "opt_out_annotation", "mirror_pod"]
ImageSkipReason = Literal["already_prefixed", "invalid_image", "ignored_image", "not_accepted"]
SKIP_REASONS: Final[tuple[str, ...]] = (
    "namespace",
    "opt_out_label",
    "opt_out_annotation",
    "mirror_pod",
    "already_prefixed",
    "invalid_image",
    "ignored_image",
    "not_accepted",
)
OUTCOMES: Final = (
    "mutated",
    "unchanged",
    "skipped",
    "ignored",
    "error",
    "malformed",
    "too_large",
    "timeout",
    "abandoned",
)

_log = get_logger("detour.webhook")


# --- Wire formats ---------------------------------------------------------------------------


class GroupVersionKind(TypedDict, total=False):
    group: str
    version: str
    kind: str


class GroupVersionResource(TypedDict, total=False):
    group: str
    version: str
    resource: str


class UserInfo(TypedDict, total=False):
    username: str
    uid: str
    groups: list[str]
    extra: dict[str, list[str]]


class AdmissionRequest(TypedDict, total=False):
    uid: Required[str]
    kind: GroupVersionKind
    resource: GroupVersionResource
    subResource: str
    requestKind: GroupVersionKind
    requestResource: GroupVersionResource
    requestSubResource: str
    name: str
    namespace: str
    operation: Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
    userInfo: UserInfo
    object: dict[str, Any] | None
    oldObject: dict[str, Any] | None
    dryRun: bool
    options: dict[str, Any] | None


class AdmissionStatus(TypedDict, total=False):
    code: int
    message: str


class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    patchType: NotRequired[Literal["JSONPatch"]]
    patch: NotRequired[str]  # base64 of the JSON text of a list of JSONPatchOp
    status: NotRequired[AdmissionStatus]
    warnings: NotRequired[list[str]]


class AdmissionReview(TypedDict):
    apiVersion: str
    kind: Literal["AdmissionReview"]
    request: NotRequired[AdmissionRequest]
    response: NotRequired[AdmissionResponse]


class JSONPatchOp(TypedDict):
    """One RFC 6902 operation; the webhook only ever emits ``add`` and ``replace``."""

    op: Literal["add", "replace"]
    path: str
    value: Any


class MalformedReview(ValueError):
    """The body is not an AdmissionReview we can answer: HTTP 400."""


class ReviewTooLarge(Exception):
    """The body is over ``webhook.max_body``, or could take too much memory to parse: HTTP 413."""


# --- Pure functions: policy, rewrite, patch ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """What the webhook rewrites, resolved from settings and the environment once."""

    prefix: str = "localhost:7439"
    ignore_namespaces: frozenset[str] = frozenset({"kube-system"})
    ignore_images: tuple[re.Pattern[str], ...] = ()
    accept_images: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def from_settings(
        cls, settings: WebhookSettings, environ: Mapping[str, str] | None = None
    ) -> Policy:
        environ = os.environ if environ is None else environ
        own = (settings.namespace or environ.get("POD_NAMESPACE", "")).strip()
        ignored = set(settings.ignore_namespaces) | ({own} if own else set())
        return cls(
            prefix=settings.prefix,
            ignore_namespaces=frozenset(ignored),
            ignore_images=tuple(settings.ignore_images),
            accept_images=tuple(settings.accept_images),
        )


def rewrite_image(image: str, prefix: str) -> str:
    """The image as the proxy serves it in path mode behind ``prefix``.

    ``busybox`` → ``<prefix>/docker.io/library/busybox:latest``; an image already under
    ``<prefix>/`` is returned as is. Raises :class:`ValueError` (the reference module's
    ``NameInvalid``, ``TagInvalid``, ``DigestInvalid``) for an image that does not parse, or
    whose rewritten form would not be a valid reference (an IPv6 registry literal).
    """
    if image.startswith(prefix + "/"):
        return image
    ref = Reference.parse(image)
    rewritten = f"{prefix}/{ref.name.path_form()}{ref.suffix()}"
    Reference.parse(rewritten)  # what kubelet will be asked to pull must itself be valid
    return rewritten


@dataclass(frozen=True, slots=True)
class ImageRewrite:
    field: str  # "containers", "initContainers" or "ephemeralContainers"
    index: int
    name: str
    original: str
    image: str

    @property
    def key(self) -> str:
        return f"{self.field}/{self.name}"


@dataclass(frozen=True, slots=True)
class ImageSkip:
    field: str
    index: int
    name: str
    image: str
    reason: ImageSkipReason


@dataclass(frozen=True, slots=True)
class PodPlan:
    """What to do with one pod: skip it whole, or rewrite some images and leave others."""

    skip: PodSkipReason | None = None
    rewrites: tuple[ImageRewrite, ...] = ()
    skipped_images: tuple[ImageSkip, ...] = ()

    def skip_reasons(self) -> list[str]:
        """One entry per thing skipped, for the skip counter."""
        if self.skip is not None:
            return [self.skip]
        return [s.reason for s in self.skipped_images]


def _is_true(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "true"


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    """``value`` if it is an object; absent (None) is an empty one; anything else is an error."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} is not an object")
    return value


def _containers(spec: Mapping[str, Any], field_name: str) -> list[Any]:
    value = spec.get(field_name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError(f"spec.{field_name} is not a list")
    return value


def _image_check(image: str, policy: Policy) -> tuple[str | None, ImageSkipReason | None]:
    """``(rewritten, None)`` or ``(None, reason)``."""
    if image.startswith(policy.prefix + "/"):
        return None, "already_prefixed"
    try:
        rewritten = rewrite_image(image, policy.prefix)
        normalized = str(Reference.parse(image))
    except ValueError:
        return None, "invalid_image"
    forms = (image, normalized)
    if any(p.search(f) for p in policy.ignore_images for f in forms):
        return None, "ignored_image"
    if policy.accept_images and not any(p.search(f) for p in policy.accept_images for f in forms):
        return None, "not_accepted"
    return rewritten, None


def _images_by_key(pod: Mapping[str, Any] | None) -> dict[str, Any]:
    if not pod:
        return {}
    spec = _mapping(pod.get("spec"), "spec")
    out: dict[str, Any] = {}
    for field_name in CONTAINER_FIELDS:
        for index, container in enumerate(_containers(spec, field_name)):
            if isinstance(container, Mapping):
                out[f"{field_name}/{container.get('name', index)}"] = container.get("image")
    return out


def plan_pod(
    pod: Mapping[str, Any],
    namespace: str,
    policy: Policy,
    *,
    old_pod: Mapping[str, Any] | None = None,
) -> PodPlan:
    """Decide what to rewrite in ``pod`` (an object from ``request.object``).

    ``namespace`` is ``request.namespace``: at CREATE the pod's own ``metadata.namespace`` may
    still be empty. With ``old_pod`` (an UPDATE), an image equal to the old one for the same
    container is left as it is. Raises :class:`TypeError` when the pod is not shaped like one.
    """
    if namespace in policy.ignore_namespaces:
        return PodPlan(skip="namespace")
    metadata = _mapping(pod.get("metadata"), "metadata")
    if _is_true(_mapping(metadata.get("labels"), "metadata.labels").get(SKIP_LABEL)):
        return PodPlan(skip="opt_out_label")
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    if _is_true(annotations.get(SKIP_ANNOTATION)):
        return PodPlan(skip="opt_out_annotation")
    if MIRROR_POD_ANNOTATION in annotations:
        return PodPlan(skip="mirror_pod")

    spec = _mapping(pod.get("spec"), "spec")
    old_images = _images_by_key(old_pod)
    rewrites: list[ImageRewrite] = []
    skipped: list[ImageSkip] = []
    for field_name in CONTAINER_FIELDS:
        for index, container in enumerate(_containers(spec, field_name)):
            if not isinstance(container, Mapping):
                raise TypeError(f"spec.{field_name}[{index}] is not an object")
            name = str(container.get("name", index))
            image = container.get("image")
            key = f"{field_name}/{name}"
            if key in old_images and old_images[key] == image:
                continue  # unchanged by this UPDATE: rewriting it would restart the container
            if not isinstance(image, str):
                skipped.append(ImageSkip(field_name, index, name, repr(image), "invalid_image"))
                continue
            rewritten, reason = _image_check(image, policy)
            if reason is not None:
                skipped.append(ImageSkip(field_name, index, name, image, reason))
            elif rewritten is not None and rewritten != image:
                rewrites.append(ImageRewrite(field_name, index, name, image, rewritten))
    return PodPlan(rewrites=tuple(rewrites), skipped_images=tuple(skipped))


def json_pointer_escape(token: str) -> str:
    """RFC 6901: ``~`` → ``~0``, ``/`` → ``~1``."""
    return token.replace("~", "~0").replace("/", "~1")


def _existing_originals(annotations: Mapping[str, Any]) -> dict[str, str]:
    text = annotations.get(ORIGINAL_IMAGES_ANNOTATION)
    if not isinstance(text, str):
        return {}
    try:
        value = parse_json(text)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


def build_patch(pod: Mapping[str, Any], rewrites: Iterable[ImageRewrite]) -> list[JSONPatchOp]:
    """The JSONPatch that applies ``rewrites`` to ``pod`` and records the originals.

    One ``replace`` per image, then one ``add`` for the annotation, merged into what an earlier
    pass recorded. When ``metadata.annotations`` (or ``metadata``) is absent the whole object is
    added, since a JSONPatch cannot add a member to an object that does not exist.
    """
    rewrites = list(rewrites)
    if not rewrites:
        return []
    ops: list[JSONPatchOp] = [
        {"op": "replace", "path": f"/spec/{r.field}/{r.index}/image", "value": r.image}
        for r in rewrites
    ]
    metadata = pod.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, Mapping) else None
    existing = _existing_originals(annotations) if isinstance(annotations, Mapping) else {}
    merged = {**existing, **{r.key: r.original for r in rewrites}}
    if existing and merged == existing:
        return ops  # already recorded, word for word
    value = json.dumps(merged, sort_keys=True, separators=(",", ":"))
    if not isinstance(metadata, Mapping):
        ops.append(
            {
                "op": "add",
                "path": "/metadata",
                "value": {"annotations": {ORIGINAL_IMAGES_ANNOTATION: value}},
            }
        )
    elif not isinstance(annotations, Mapping):
        ops.append(
            {
                "op": "add",
                "path": "/metadata/annotations",
                "value": {ORIGINAL_IMAGES_ANNOTATION: value},
            }
        )
    else:
        key = json_pointer_escape(ORIGINAL_IMAGES_ANNOTATION)
        ops.append({"op": "add", "path": f"/metadata/annotations/{key}", "value": value})
    return ops


def parse_cost(body: bytes | bytearray) -> int:
    """An upper bound on the bytes ``json.loads(body.decode())`` allocates, its text included.

    Every value and container json.loads builds is introduced by one of ``{ [ , :`` and costs at
    most :data:`PARSE_COST_PER_TOKEN` bytes with its slot in its parent (a 4 MiB body of lists
    nested in lists takes 44 times its size). The characters of strings take a byte each, and
    so does the decoded text, when the body is ASCII without ``\\u`` escapes; otherwise up to
    four each (one character outside the BMP makes its whole string UCS-4). The structural
    characters inside strings are counted too, which only over-estimates.
    """
    tokens = sum(body.count(c) for c in b"{[,:")
    width = 1 if body.isascii() and b"\\u" not in body else 4
    return PARSE_COST_PER_TOKEN * tokens + 2 * width * len(body)


def parse_review(body: Any) -> AdmissionReview:
    """Check that ``body`` is an AdmissionReview with a request we can answer.

    Raises :class:`MalformedReview` with a message for the client otherwise.
    """
    if not isinstance(body, dict):
        raise MalformedReview("expected a JSON object (an AdmissionReview)")
    if body.get("kind") != "AdmissionReview":
        raise MalformedReview('expected kind "AdmissionReview"')
    if body.get("apiVersion") not in SUPPORTED_API_VERSIONS:
        raise MalformedReview(f"expected apiVersion {' or '.join(sorted(SUPPORTED_API_VERSIONS))}")
    request = body.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("the AdmissionReview request has no uid")
    return cast(AdmissionReview, body)


def _ignored_because(request: AdmissionRequest) -> str | None:
    """Why a request is not a pod we mutate, or None when it is."""
    kind = request.get("kind") or {}
    resource = request.get("resource") or {}
    if not isinstance(kind, Mapping) or kind.get("kind") != "Pod" or kind.get("group", ""):
        return "not a Pod"
    if not isinstance(resource, Mapping) or resource.get("resource") != "pods":
        return "not the pods resource"
    if request.get("subResource", "") not in ("", "ephemeralcontainers"):
        return f"sub-resource {request.get('subResource')}"
    if request.get("operation") not in ("CREATE", "UPDATE"):
        return f"operation {request.get('operation')}"
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one review, with what to count and log about it."""

    response: AdmissionResponse
    outcome: str
    plan: PodPlan | None = None
    note: str | None = None


def review_pod(request: AdmissionRequest, policy: Policy) -> Decision:
    """Answer one admission request. Raises on a pod that is not shaped like one."""
    uid = request["uid"]
    ignored = _ignored_because(request)
    if ignored is not None:
        return Decision({"uid": uid, "allowed": True}, "ignored", note=ignored)
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise TypeError("request.object is not a pod")
    old = request.get("oldObject") if request.get("operation") == "UPDATE" else None
    namespace = request.get("namespace") or ""
    plan = plan_pod(pod, namespace, policy, old_pod=old if isinstance(old, dict) else None)
    if plan.skip is not None:
        return Decision({"uid": uid, "allowed": True}, "skipped", plan)
    patch = build_patch(pod, plan.rewrites)
    if not patch:
        return Decision({"uid": uid, "allowed": True}, "unchanged", plan)
    encoded = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    response: AdmissionResponse = {
        "uid": uid,
        "allowed": True,
        "patchType": "JSONPatch",
        "patch": encoded,
    }
    return Decision(response, "mutated", plan)


# --- Metrics ----------------------------------------------------------------------------------


class WebhookMetrics:
    """The webhook's counters, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reviews = Counter(
            "detour_webhook_reviews",
            "Admission reviews answered, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.skips = Counter(
            "detour_webhook_skips",
            "Pods (namespace, opt-out) and images (the rest) left unchanged, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.images_rewritten = Counter(
            "detour_webhook_images_rewritten",
            "Container images pointed at the proxy.",
            registry=self.registry,
        )
        self.tls_reloads = Counter(
            "detour_webhook_tls_reloads",
            "Changed TLS certificate files loaded (success) or refused (failure).",
            ["result"],
            registry=self.registry,
        )
        # Every series exists from the start, so that rate() and alerts see zeros.
        for outcome in OUTCOMES:
            self.reviews.labels(outcome)
        for reason in SKIP_REASONS:
            self.skips.labels(reason)
        for result in ("success", "failure"):
            self.tls_reloads.labels(result)


# --- TLS --------------------------------------------------------------------------------------


def build_ssl_context(settings: WebhookSettings) -> ssl.SSLContext:
    """A server context with ``tls_cert`` / ``tls_key``; :class:`ConfigError` if they won't load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise ConfigError(
            f"webhook.tls_cert / webhook.tls_key: cannot load {settings.tls_cert} and "
            f"{settings.tls_key}: {exc}"
        ) from None
    return context


class CertificateReloader:
    """Poll a certificate and key; load them into a live context when their content changes.

    Mounted Secrets change by an atomic swap of a ``..data`` symlink, which inotify does not
    reliably report, so the content of both files is hashed every ``interval`` seconds. A new
    pair is first loaded into a scratch context, so a half-written or mismatched pair never
    reaches the live one; it is refused, logged and retried when the files change again.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        cert: Path,
        key: Path,
        interval: float,
        metrics: WebhookMetrics | None = None,
    ) -> None:
        self.context = context
        self.cert = cert
        self.key = key
        self.interval = interval
        self.metrics = metrics
        self._seen = self._fingerprint()

    def _fingerprint(self) -> bytes | None:
        digest = hashlib.sha256()
        try:
            for path in (self.cert, self.key):
                data = path.read_bytes()
                digest.update(len(data).to_bytes(8, "big"))
                digest.update(data)
        except OSError:
            return None  # mid-swap or gone: look again next time
        return digest.digest()

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.tls_reloads.labels(result).inc()

    def check(self, fingerprint: bytes | None = None) -> bool:
        """Reload if the files changed since the last look; whether a new pair was loaded."""
        if fingerprint is None:
            fingerprint = self._fingerprint()
        if fingerprint is None or fingerprint == self._seen:
            return False
        self._seen = fingerprint
        try:
            scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            scratch.load_cert_chain(self.cert, self.key)
            self.context.load_cert_chain(self.cert, self.key)
        except OSError as exc:
            _log.warning(
                "tls_reload_failed", cert=str(self.cert), key=str(self.key), error=str(exc)
            )
            self._count("failure")
            return False
        _log.info("tls_reloaded", cert=str(self.cert))
        self._count("success")
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            # Reading runs off the loop; loading stays on it, where handshakes use the context.
            fingerprint = await asyncio.to_thread(self._fingerprint)
            self.check(fingerprint)


# --- The application --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Intake:
    """How much of the API server's traffic the webhook holds at once (the module docstring)."""

    max_body: int
    max_cost: int
    gate: asyncio.Semaphore

    @classmethod
    def from_settings(cls, settings: WebhookSettings) -> Intake:
        return cls(
            max_body=settings.max_body,
            max_cost=MAX_EXPANSION * settings.max_body,
            gate=asyncio.Semaphore(settings.max_concurrent),
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


async def _read_body(request: web.Request, limit: int) -> bytearray:
    """The request's body, refused at the first byte past ``limit``."""
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > limit:
            raise ReviewTooLarge(
                f"the AdmissionReview is larger than webhook.max_body ({_mib(limit)})"
            )
    return body


async def receive_review(request: web.Request, intake: Intake) -> AdmissionReview:
    """Read, check and parse the body. Raises :class:`ReviewTooLarge`, :class:`TimeoutError`
    (:data:`BODY_TIMEOUT`), or :class:`ValueError` for a malformed body."""
    async with asyncio.timeout(BODY_TIMEOUT):
        raw = await _read_body(request, intake.max_body)
    cost = parse_cost(raw)
    if cost > intake.max_cost:
        raise ReviewTooLarge(
            f"the AdmissionReview ({_mib(len(raw))}) could take up to {_mib(cost)} to parse, more "
            f"than {MAX_EXPANSION} times webhook.max_body ({_mib(intake.max_cost)})"
        )
    text = raw.decode()
    del raw  # the bytes go before the objects come
    return parse_review(parse_json(text))


POLICY = web.AppKey("detour_webhook_policy", Policy)
METRICS = web.AppKey("detour_webhook_metrics", WebhookMetrics)
RELOADER = web.AppKey("detour_webhook_reloader", CertificateReloader)
INTAKE = web.AppKey("detour_webhook_intake", Intake)


def _refuse(request: web.Request, status: int, outcome: str, message: str) -> web.Response:
    request.app[METRICS].reviews.labels(outcome).inc()
    _log.warning(
        f"review_{outcome}",
        message=message,
        size=request.content_length,
        remote=request.remote,
    )
    return web.json_response({"message": message}, status=status)


def _pod_label(request: AdmissionRequest) -> str:
    pod = request.get("object") or {}
    metadata = pod.get("metadata") if isinstance(pod, dict) else None
    metadata = metadata if isinstance(metadata, dict) else {}
    name = request.get("name") or metadata.get("name") or f"{metadata.get('generateName', '')}*"
    return f"{request.get('namespace', '')}/{name}"


async def mutate(request: web.Request) -> web.Response:
    intake = request.app[INTAKE]
    size = request.content_length
    if size is not None and size > intake.max_body:  # refused unread
        message = (
            f"the AdmissionReview ({_mib(size)}) is larger than webhook.max_body "
            f"({_mib(intake.max_body)})"
        )
        return _refuse(request, 413, "too_large", message)
    try:
        if size is not None and size <= SMALL_BODY:
            review = await receive_review(request, intake)
        else:
            async with intake.gate:
                review = await receive_review(request, intake)
    except ReviewTooLarge as exc:
        return _refuse(request, 413, "too_large", str(exc))
    except TimeoutError:
        message = f"the AdmissionReview did not arrive within {BODY_TIMEOUT:g}s"
        return _refuse(request, 408, "timeout", message)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        message = str(exc) if isinstance(exc, MalformedReview) else f"invalid JSON: {exc}"
        return _refuse(request, 400, "malformed", message)
    except ConnectionError:  # the sender went away mid-body: no one to answer
        request.app[METRICS].reviews.labels("abandoned").inc()
        _log.info("review_abandoned", size=size, remote=request.remote)
        return web.Response(status=400)
    # Nothing awaits from here to the response, so the review whose turn comes next (the gate
    # is released) is read only after this one's objects are gone.
    return _answer(request, review)


def _answer(request: web.Request, review: AdmissionReview) -> web.Response:
    metrics = request.app[METRICS]
    admission = review["request"]
    uid = admission["uid"]
    try:
        decision = review_pod(admission, request.app[POLICY])
    except Exception:
        _log.exception("review_failed", uid=uid, pod=_pod_label(admission))
        decision = Decision({"uid": uid, "allowed": True}, "error")
    metrics.reviews.labels(decision.outcome).inc()
    plan = decision.plan
    if plan is not None:
        for reason in plan.skip_reasons():
            metrics.skips.labels(reason).inc()
        if decision.outcome == "mutated":
            metrics.images_rewritten.inc(len(plan.rewrites))
            _log.info(
                "pod_mutated",
                uid=uid,
                pod=_pod_label(admission),
                images={r.key: [r.original, r.image] for r in plan.rewrites},
                skipped={f"{s.field}/{s.name}": s.reason for s in plan.skipped_images} or None,
            )
        else:
            _log.debug(
                "pod_unchanged",
                uid=uid,
                pod=_pod_label(admission),
                skip=plan.skip,
                skipped={f"{s.field}/{s.name}": s.reason for s in plan.skipped_images} or None,
            )
    elif decision.note is not None:
        _log.debug("review_ignored", uid=uid, why=decision.note)
    answer: AdmissionReview = {
        "apiVersion": review["apiVersion"],
        "kind": "AdmissionReview",
        "response": decision.response,
    }
    return web.json_response(answer)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _reload_certificates(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[RELOADER].run(), name="detour-webhook-tls-reload")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_webhook_app(
    settings: Settings, *, ssl_context: ssl.SSLContext | None = None
) -> web.Application:
    """The webhook's application: ``POST /mutate``, ``GET /healthz``, ``GET /metrics``.

    With ``ssl_context`` (the one the server is started with) the certificate files named in
    the settings are polled and reloaded into it while the application runs.
    """
    app = web.Application(client_max_size=settings.webhook.max_body)
    metrics = WebhookMetrics()
    app[POLICY] = Policy.from_settings(settings.webhook)
    app[INTAKE] = Intake.from_settings(settings.webhook)
    app[METRICS] = metrics
    if ssl_context is not None:
        hook = settings.webhook
        app[RELOADER] = CertificateReloader(
            ssl_context, hook.tls_cert, hook.tls_key, hook.tls_reload_interval, metrics
        )
        app.cleanup_ctx.append(_reload_certificates)
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    return app


def run_webhook(settings: Settings) -> None:
    """Serve the webhook over TLS on ``webhook.listen`` until SIGINT or SIGTERM."""
    configure_logging(settings.log_level)
    hook = settings.webhook
    ssl_context = build_ssl_context(hook)
    app = create_webhook_app(settings, ssl_context=ssl_context)
    host, port = split_host_port(hook.listen, 8443)
    policy = app[POLICY]
    _log.info(
        "webhook_listening",
        listen=hook.listen,
        prefix=policy.prefix,
        ignore_namespaces=sorted(policy.ignore_namespaces),
    )
    try:
        web.run_app(
            app,
            host=host,
            port=port,
            ssl_context=ssl_context,
            access_log=None,
            print=None,
        )
    except OSError as exc:
        listening = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)
        if not isinstance(exc, socket.gaierror) and exc.errno not in listening:
            raise  # not the listen address: a bug must not read as bad input
        gai = isinstance(exc, socket.gaierror)
        reason = (exc.strerror or str(exc)) if gai or not exc.errno else os.strerror(exc.errno)
        raise ConfigError(f"cannot listen on {hook.listen}: {reason}") from None
