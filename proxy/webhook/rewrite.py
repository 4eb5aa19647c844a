"""What the webhook does to a pod: its images pointed at Detour in path mode, originals kept.

Each image in ``spec.containers``, ``spec.initContainers`` and ``spec.ephemeralContainers`` is
normalized, then prefixed with ``webhook.prefix``, a registry port spelled ``_<port>`` as the
proxy's path mode expects (a host name never contains ``_``, so ``registry.team-2`` stays the
host it is)::

    nats:2.10.26-alpine              → localhost:7439/docker.io/library/nats:2.10.26-alpine
    busybox                          → localhost:7439/docker.io/library/busybox:latest
    registry.local:5000/team/app:v1  → localhost:7439/registry.local_5000/team/app:v1
    registry.team-2/app:v1           → localhost:7439/registry.team-2/app:v1
    quay.io/x/y@sha256:<hex>         → localhost:7439/quay.io/x/y@sha256:<hex>   (byte for byte)
    localhost:7439/...               → unchanged, so a second pass changes nothing

Names on the pod:

``detour.io/original-images`` (annotation, written by the webhook)
    One JSON object mapping ``containers/<name>`` and ``initContainers/<name>`` to the image
    as it was written before the rewrite. Later passes merge into it and never overwrite an
    entry with an already-prefixed image. An ephemeral container has no entry: it is added by
    a ``pods/ephemeralcontainers`` update, of which the API server keeps only
    ``spec.ephemeralContainers``, so an annotation written then would never land. Its
    rewritten image still names where it came from (``<prefix>/<registry>/<name>:<tag>``).
``detour.io/skip: "true"`` (label or annotation, set by you)
    Leave this pod alone. To exempt a whole namespace, put the label on the namespace and give
    the MutatingWebhookConfiguration a ``namespaceSelector`` that excludes it.

Skipped, with the pod or image left unchanged (the reason is what
``detour_webhook_skips_total{reason}`` counts): pods in ``webhook.ignore_namespaces``
(``kube-system`` by default) or in the webhook's own namespace (``webhook.namespace``, else
``$POD_NAMESPACE``) — reason ``namespace``; opted-out pods — ``opt_out_label`` /
``opt_out_annotation``; mirror pods of static pods, which run from the node's own manifest
whatever the API says — ``mirror_pod``; and, one image at a time, images matching a
``webhook.ignore_images`` regex — ``ignored_image``, images matching no ``webhook.accept_images``
regex when that list is set — ``not_accepted``, images that do not parse — ``invalid_image``,
and images already behind the prefix — ``already_prefixed``. A regex matches when ``re.search``
finds it in the image as written or in its normalized form. On UPDATE only images that differ
from ``oldObject`` are rewritten, so a pod created while the webhook was down is not restarted
by an unrelated update, and existing ephemeral containers (which the API server refuses to
change) are not touched.

No I/O: pure functions, and a :class:`Policy` resolved once from the settings and
``$POD_NAMESPACE``. Of the proxy it imports :mod:`proxy.reference` (image references and
the JSON parser; a reference that does not parse raises one of :mod:`proxy.errors`'
``ValueError`` subclasses) and :mod:`proxy.settings` (``WebhookSettings``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypedDict

from proxy.reference import Reference, parse_json
from proxy.settings import WebhookSettings

ORIGINAL_IMAGES_ANNOTATION: Final = "detour.io/original-images"
SKIP_LABEL: Final = "detour.io/skip"
SKIP_ANNOTATION: Final = "detour.io/skip"
# Set by kubelet on the API's copy of a static pod; that pod runs from the node's manifest.
MIRROR_POD_ANNOTATION: Final = "kubernetes.io/config.mirror"
CONTAINER_FIELDS: Final = ("initContainers", "containers", "ephemeralContainers")

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


class JSONPatchOp(TypedDict):
    """One RFC 6902 operation; the webhook only ever emits ``add`` and ``replace``."""

    op: Literal["add", "replace"]
    path: str
    value: Any


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


def build_patch(
    pod: Mapping[str, Any], rewrites: Iterable[ImageRewrite], *, record: bool = True
) -> list[JSONPatchOp]:
    """The JSONPatch that applies ``rewrites`` to ``pod`` and, with ``record``, records the
    originals (not for a ``pods/ephemeralcontainers`` update, which keeps no annotation).

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
    if not record:
        return ops
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
