"""The AdmissionReview: its wire format, its checks, and the answer to one pod's review.

The API server posts an AdmissionReview (``admission.k8s.io/v1``, or ``v1beta1``); the answer
echoes its ``apiVersion`` and ``request.uid`` and carries a base64 JSONPatch
(:mod:`proxy.webhook.rewrite` decides what it changes). A body that is not an AdmissionReview
with a ``request`` and a ``request.uid`` is a :class:`MalformedReview`. Anything that is not a
pod (``request.kind.kind`` other than ``Pod``, ``request.resource.resource`` other than
``pods``, a sub-resource other than ``ephemeralcontainers``, an operation other than CREATE or
UPDATE) is allowed unchanged. :func:`parse_cost` bounds what parsing a body could take, so the
server can refuse one before parsing it.

Pure functions, no I/O. Nothing from the proxy outside the webhook is imported here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NotRequired, Required, TypedDict, cast

from proxy.webhook.rewrite import PodPlan, Policy, build_patch, plan_pod

SUPPORTED_API_VERSIONS: Final = frozenset({"admission.k8s.io/v1", "admission.k8s.io/v1beta1"})
# The most bytes json.loads allocates per ``{``, ``[``, ``,`` or ``:`` in a body (measured on
# CPython 3.11: a list nested in a list takes 88 bytes for one ``[``; see parse_cost).
PARSE_COST_PER_TOKEN: Final = 96


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


class MalformedReview(ValueError):
    """The body is not an AdmissionReview we can answer: HTTP 400."""


# --- Checking and answering a review -------------------------------------------------------


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
    # Of a pods/ephemeralcontainers update the API server keeps spec.ephemeralContainers only.
    ephemeral = request.get("subResource", "") == "ephemeralcontainers"
    patch = build_patch(pod, plan.rewrites, record=not ephemeral)
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
