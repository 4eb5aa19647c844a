"""The webhook's counters, in a Prometheus registry of its own (not the process-global one).

``detour_webhook_reviews_total{outcome}`` (:data:`OUTCOMES`), ``detour_webhook_skips_total{reason}``
(:data:`proxy.webhook.rewrite.SKIP_REASONS`), ``detour_webhook_images_rewritten_total``,
``detour_webhook_tls_reloads_total{result}`` (``success``, ``failure``). Every series exists
from the start, at zero.

Nothing from the proxy outside the webhook is imported here.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter

from proxy.webhook.rewrite import SKIP_REASONS

# What became of a review: review_pod's answers (mutated, unchanged, skipped, ignored), an
# internal error that still allowed the pod (error), a body the server refused (malformed,
# too_large, timeout), and a sender that went away mid-body (abandoned).
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
