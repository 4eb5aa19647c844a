"""The webhook's server, over real TLS on 127.0.0.1: pods rewritten and records kept, what is
not a pod let through, skips counted, malformed and oversized bodies refused, large reviews
queued and slow senders cut off, and an internal error that still admits the pod.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest

import proxy.webhook.server
from proxy.webhook.rewrite import ORIGINAL_IMAGES_ANNOTATION
from tests.webhook_harness import (
    DIGEST,
    PREFIX,
    MiB,
    MountedSecret,
    Pki,
    Webhook,
    admission_review,
    apply_patch,
    nats_pod,
    nested_lists,
    patch_of,
    pod,
    review_carrying,
    serve_webhook,
    wait_for,
)

# --- Reviews answered -------------------------------------------------------------------------


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


# --- Limits: body size, parse cost, the queue for large reviews -------------------------------


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

    await wait_for(abandoned)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- What is let through unchanged, and what is counted ---------------------------------------


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
    # Of this update the API server keeps spec.ephemeralContainers only: no annotation promised.
    assert [op["path"] for op in patch if not op["path"].startswith("/spec/")] == []


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
