"""The webhook's certificate rotation, as kubelet does it to a mounted Secret: a new pair is
served to new connections without a restart, and a pair that does not load is refused while the
old one keeps serving.
"""

from __future__ import annotations

from tests.webhook_harness import (
    MountedSecret,
    Pki,
    Webhook,
    admission_review,
    patch_of,
    pod,
    wait_for,
)


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
