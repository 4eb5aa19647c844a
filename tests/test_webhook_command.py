"""``detour webhook --config FILE`` as its own process: it serves reviews, says so when its
certificate is missing, and under load stays inside the memory bound that
proxy/webhook/server.py's docstring gives, measured as the process's peak RSS (VmHWM).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.webhook.review import parse_cost
from proxy.webhook.server import MAX_EXPANSION
from tests.webhook_harness import (
    PREFIX,
    REPO_ROOT,
    MiB,
    MountedSecret,
    Pki,
    admission_review,
    apply_patch,
    detour_webhook,
    kube_review,
    nats_pod,
    nested_lists,
    patch_of,
    pod,
    review_carrying,
)


@pytest.fixture
def command_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETOUR_")}
    env["POD_NAMESPACE"] = "detour-system"
    return env


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
