"""The webhook's certificate rotation, as kubelet does it to a mounted Secret: a new pair is
served to new connections without a restart, and a pair that does not load is refused while the
old one keeps serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.webhook_harness import (
    MountedSecret,
    Pki,
    Webhook,
    admission_review,
    mount_secret,
    patch_of,
    pod,
    serve_webhook,
    wait_for,
)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def secret(tmp_path: Path, pki: Pki) -> MountedSecret:
    return mount_secret(tmp_path, pki)


@pytest.fixture
async def webhook(tmp_path: Path, pki: Pki, secret: MountedSecret) -> AsyncIterator[Webhook]:
    async with serve_webhook(tmp_path, pki, secret) as hook:
        yield hook


async def test_rotated_certificate_is_served_to_new_connections(
    webhook: Webhook, pki: Pki, secret: MountedSecret
) -> None:
    assert await webhook.served_serial() == 1001

    secret.write(pki.issue(serial=1002))

    async def rotated() -> bool:
        return await webhook.served_serial() == 1002

    await wait_for(rotated)
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

    await wait_for(refused)
    assert await webhook.served_serial() == 1001
    status, _ = await webhook.review(admission_review(pod("nats:1")))
    assert status == 200

    secret.write(good)

    async def rotated() -> bool:
        return await webhook.served_serial() == 2002

    await wait_for(rotated)
