"""The admission webhook that adds the node-local prefix to pod images; it shares only
reference parsing, settings and logging with the proxy.

What the rest of Detour (the CLI, the tests) uses of it is imported from here, so its modules
can be arranged without their importers knowing.
"""

from proxy.webhook.server import WebhookMetrics, create_webhook_app, rewrite_image, run_webhook

__all__ = ["WebhookMetrics", "create_webhook_app", "rewrite_image", "run_webhook"]
