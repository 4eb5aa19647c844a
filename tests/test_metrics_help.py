"""The help text an operator reads in ``/metrics`` names every value a labelled counter's
``result`` takes, so a series at 0 is never a word found nowhere else."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import CACHE_RESULTS, Metrics


def test_the_cache_requests_help_names_every_result() -> None:
    families = text_string_to_metric_families(Metrics().exposition().decode())
    (help_text,) = [f.documentation for f in families if f.name == "detour_cache_requests"]
    words = set(re.findall(r"[a-z_]+", help_text))

    for kind, results in CACHE_RESULTS.items():
        assert [r for r in results if r not in words] == [], kind
