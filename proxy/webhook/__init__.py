"""The admission webhook that adds the node-local prefix to pod images.

It runs as its own Deployment and imports nothing from the proxy's api, content, upstream,
cache, cluster or tools: of the shared modules at the root it uses :mod:`proxy.reference`
(image references and the JSON parser), :mod:`proxy.settings`, :mod:`proxy.logs`, and, for
``detour webhook-certs``, :mod:`proxy.files` (the atomic write). Its modules:

- :mod:`proxy.webhook.rewrite`: what is rewritten in a pod and what is skipped, and the
  JSONPatch that does it (pure);
- :mod:`proxy.webhook.review`: the AdmissionReview wire format, its checks, and the answer to
  one review (pure);
- :mod:`proxy.webhook.metrics`: its counters;
- :mod:`proxy.webhook.tls`: the server's TLS context, reloaded when a mounted Secret rotates;
- :mod:`proxy.webhook.server`: the aiohttp application, the bounds on what it holds, and
  ``run_webhook``;
- :mod:`proxy.webhook.certs`: a CA and serving certificate (``detour webhook-certs``).

What the rest of Detour (the CLI, the tests) uses of it is imported from here, so its modules
can be arranged without their importers knowing.
"""

from proxy.webhook.metrics import WebhookMetrics
from proxy.webhook.rewrite import rewrite_image
from proxy.webhook.server import create_webhook_app, run_webhook

__all__ = ["WebhookMetrics", "create_webhook_app", "rewrite_image", "run_webhook"]
