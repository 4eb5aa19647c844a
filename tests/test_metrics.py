"""The metrics an operator reads first: every client request counted by method, endpoint kind
and status, with its duration; the build's version; the known series of every labelled counter
there from the start, at 0, so that ``increase()`` sees the first event; units in the names,
as Prometheus names them; and ``promtool check metrics`` finding nothing to say about either
``/metrics`` (the proxy's and the webhook's).

The request counters are kept by the access logger, which only ``detour serve`` runs: those
tests start it as a real process."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy import __version__
from proxy.metrics import (
    API_KINDS,
    CACHE_RESULTS,
    CACHE_WRITE_FAILURES,
    DIGEST_KINDS,
    ENDED_FETCHES,
    OTHER_METHOD_STATUSES,
    PEER_LIES,
    PEER_RESULTS,
    REQUEST_KINDS,
    REQUEST_METHODS,
    REQUEST_STATUSES,
    SOURCES,
    TOKEN_OUTCOMES,
    UPSTREAM_FAILURES,
    UPSTREAM_STATUSES,
    Metrics,
    endpoint_kind,
)
from proxy.settings import Settings
from proxy.webhook import WebhookMetrics, create_webhook_app
from tests.images import ACCEPT_ALL, push_image, unique_repo
from tests.proxy import Proxy, parse_metrics, scenario
from tests.registry import Registry
from tests.support import ROOT
from tests.test_client_logs import client_hello

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

# Labelled counters and the label values their series start with. (The registry label's are
# the registries the operator named, and "other".)
INITIALISED: dict[str, set[Labels]] = {
    "detour_cache_requests_total": {
        (("kind", kind), ("result", result))
        for kind, results in CACHE_RESULTS.items()
        for result in results
    },
    "detour_cache_write_failures_total": {(("reason", r),) for r in CACHE_WRITE_FAILURES},
    "detour_peer_requests_total": {(("result", r),) for r in PEER_RESULTS},
    "detour_peers_bypassed_total": {(("reason", r),) for r in PEER_LIES},
    "detour_ended_blob_fetches_total": {(("reason", r),) for r in ENDED_FETCHES},
    "detour_served_bytes_total": {(("source", s),) for s in SOURCES},
    # Every status each (method, endpoint kind) is answered with.
    "detour_http_requests_total": {
        (("kind", kind), ("method", method), ("status", str(status)))
        for method in REQUEST_METHODS
        for kind, statuses in (
            OTHER_METHOD_STATUSES if method == "other" else REQUEST_STATUSES
        ).items()
        for status in statuses
    },
    # The duration histogram: GET of every kind, HEAD of the pull endpoints.
    "detour_http_request_duration_seconds_count": {
        (("kind", kind), ("method", "GET")) for kind in REQUEST_KINDS
    }
    | {(("kind", kind), ("method", "HEAD")) for kind in API_KINDS},
}


def per_registry(registries: set[str]) -> dict[str, set[Labels]]:
    return {
        "detour_digest_mismatches_total": {
            (("kind", k), ("registry", r)) for k in DIGEST_KINDS for r in registries
        }
        | {(("kind", "blob"), ("registry", "cache"))},  # the cache's own files
        "detour_token_requests_total": {
            (("outcome", o), ("registry", r)) for o in TOKEN_OUTCOMES for r in registries
        },
        "detour_upstream_requests_total": {
            (("registry", r), ("status", s))
            for r in registries
            for s in (*UPSTREAM_FAILURES, *map(str, UPSTREAM_STATUSES))
        },
        "detour_upstream_request_duration_seconds_count": {(("registry", r),) for r in registries},
    }


async def scrape(proxy: Proxy) -> Samples:
    async with proxy.session.get(f"{proxy.url}/metrics") as response:
        assert response.status == 200
        return parse_metrics(await response.text())


def labelled(samples: Samples, name: str) -> dict[Labels, float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


async def test_known_series_exist_at_zero_from_the_start(
    make_proxy: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await make_proxy(scenario(registry, tmp_path / "cache"))
    named = {"docker.io", "ghcr.io", registry.host}  # the redirects' and registries' hosts

    samples = await scrape(proxy)

    expected = INITIALISED | per_registry({*named, "other"})
    for name, series in expected.items():
        assert labelled(samples, name) == dict.fromkeys(series, 0.0), name
    assert labelled(samples, "detour_build_info") == {(("version", __version__),): 1.0}
    assert labelled(samples, "detour_tls_probes_total") == {(): 0.0}
    # The statuses a dashboard's error ratio looks for, on the endpoints a pull uses.
    for method in ("GET", "HEAD"):
        for kind in ("manifests", "blobs"):
            for status in ("200", "404", "499", "502", "504"):
                key = (("kind", kind), ("method", method), ("status", status))
                assert key in labelled(samples, "detour_http_requests_total"), key


async def wait_for(proxy: Proxy, wanted: Callable[[Samples], bool]) -> Samples:
    """The metrics once ``wanted`` holds: a request is counted when its response is finished,
    which may be just after the client has read it."""
    deadline = time.monotonic() + 10
    while True:
        samples = await scrape(proxy)
        if wanted(samples):
            return samples
        assert time.monotonic() < deadline, "the metrics never showed the requests"
        await asyncio.sleep(0.05)


def requests_of(samples: Samples) -> dict[tuple[str, str, str], float]:
    return {
        (dict(labels)["method"], dict(labels)["kind"], dict(labels)["status"]): value
        for labels, value in labelled(samples, "detour_http_requests_total").items()
    }


async def test_every_request_is_counted_by_method_kind_and_status(
    detour_process: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await detour_process(scenario(registry, tmp_path / "cache"))
    name = unique_repo("m").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=4096)
    base = f"{proxy.url}/v2/{name}"
    before = await wait_for(proxy, lambda s: ("GET", "metrics", "200") in requests_of(s))
    assert labelled(before, "detour_build_info") == {(("version", __version__),): 1.0}

    asked = [
        ("GET", f"{base}/manifests/v1", 200),
        ("HEAD", f"{base}/manifests/v1", 200),
        ("GET", f"{base}/blobs/{image.config.digest}", 200),
        ("GET", f"{base}/tags/list", 200),
        ("GET", f"{base}/referrers/{image.digest}", 404),  # distribution has no referrers API
        ("GET", f"{proxy.url}/v2/", 200),
        ("GET", f"{proxy.url}/healthz", 200),
        ("GET", f"{proxy.url}/readyz", 200),
        ("GET", f"{proxy.url}/nowhere", 404),
        ("GET", f"{proxy.url}/v2/{name}/nowhere/v1", 404),
        ("DELETE", f"{base}/manifests/v1", 405),
    ]
    for method, url, status in asked:
        async with proxy.session.request(method, url, headers={"Accept": ACCEPT_ALL}) as answer:
            assert answer.status == status, (method, url)
            await answer.read()

    added = {
        ("GET", "manifests", "200"): 1,
        ("HEAD", "manifests", "200"): 1,
        ("GET", "blobs", "200"): 1,
        ("GET", "tags", "200"): 1,
        ("GET", "referrers", "404"): 1,
        ("GET", "api_root", "200"): 1,
        ("GET", "health", "200"): 2,
        ("GET", "other", "404"): 2,
        ("other", "manifests", "405"): 1,
        ("GET", "metrics", "200"): 1,  # the scrape that read ``before``
    }

    def counted(samples: Samples) -> bool:
        now, then = requests_of(samples), requests_of(before)
        return all(now.get(key, 0) - then.get(key, 0) >= n for key, n in added.items())

    after = await wait_for(proxy, counted)
    now, then = requests_of(after), requests_of(before)
    changed = {key: now[key] - then.get(key, 0) for key in now if now[key] != then.get(key, 0)}
    # Exactly those: a scrape racing a response may count one more of the scrapes.
    metrics_scrapes = changed.pop(("GET", "metrics", "200"))
    assert metrics_scrapes >= 1
    del added[("GET", "metrics", "200")]
    assert changed == added

    # The histogram observed each of them, under the same method and kind.
    counts = labelled(after, "detour_http_request_duration_seconds_count")
    sums = labelled(after, "detour_http_request_duration_seconds_sum")
    for method, kind in {(m, k) for m, k, _ in now}:
        key = (("kind", kind), ("method", method))
        total = sum(v for (m, k, _), v in now.items() if (m, k) == (method, kind))
        assert counts.get(key, 0) == total, key
        assert (sums.get(key, 0) > 0) == (total > 0), key
    infinite = (("kind", "manifests"), ("le", "+Inf"), ("method", "GET"))
    assert labelled(after, "detour_http_request_duration_seconds_bucket")[infinite] == 1

    # Body bytes by source: the manifest and the config blob (a HEAD sends no body).
    served = labelled(after, "detour_served_bytes_total")
    assert sum(served.values()) == len(image.manifest) + image.config.size
    assert set(served) == {(("source", "cache"),), (("source", "upstream"),)}


async def test_requests_the_http_parser_refuses_are_counted_and_tls_probes_apart(
    detour_process: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    """Requests aiohttp's parser refuses are client 400s; a TLS ClientHello on the plain port
    (docker, podman and skopeo try TLS first) gets the same 400 but is counted as a probe, so
    the 4xx a dashboard shows are the API's."""
    proxy = await detour_process(scenario(registry, tmp_path / "cache"))
    host, port = proxy.host.split(":")
    hello = client_hello()
    sent = (
        b"\x01\x02 nonsense\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 9000,
        hello,
        hello,
        hello,
    )
    for data in sent:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(data if data is hello else data + b"\r\n\r\n")
        assert (await reader.read()).split(b" ", 2)[1] == b"400"  # then the proxy closes
        writer.close()

    def counted(samples: Samples) -> bool:  # once each answer is out
        refused = requests_of(samples).get(("other", "other", "400"), 0)
        return refused >= 2 and labelled(samples, "detour_tls_probes_total")[()] >= 3

    samples = await wait_for(proxy, counted)
    assert labelled(samples, "detour_tls_probes_total") == {(): 3.0}
    assert {k: v for k, v in requests_of(samples).items() if k[2] == "400" and v} == {
        ("other", "other", "400"): 2.0
    }


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v2", "api_root"),
        ("/v2/", "api_root"),
        ("/v2/library/nats/manifests/2.10", "manifests"),
        ("/v2/docker.io/library/nats/manifests/sha256:ab", "manifests"),
        ("/v2/a/b/c/d/blobs/sha256:ab", "blobs"),
        ("/v2/nats/tags/list", "tags"),
        ("/v2/nats/referrers/sha256:ab", "referrers"),
        ("/metrics", "metrics"),
        ("/healthz", "health"),
        ("/readyz", "health"),
        ("/v2/nats/blobs/uploads/", "other"),  # a push
        ("/v2/nats/blobs/uploads/some-uuid", "other"),
        ("/v2/nats/tags/other", "other"),
        ("/v2/_catalog", "other"),
        ("/v2//manifests/v1", "other"),
        ("/v2/manifests/v1", "other"),
        ("/", "other"),
        ("/metrics/x", "other"),
        ("/v2x/nats/manifests/v1", "other"),
    ],
)
def test_endpoint_kinds(path: str, kind: str) -> None:
    assert endpoint_kind(path) == kind


def test_methods_and_kinds_are_bounded() -> None:
    metrics = Metrics()
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "BREW", "get"):
        metrics.request_finished(method, f"/v2/{method}/x/anything", 404, 0.01, None, 0)
    counted = labelled(parse_metrics(metrics.exposition().decode()), "detour_http_requests_total")
    assert {dict(labels)["method"] for labels in counted} == {"GET", "HEAD", "other"}
    assert {dict(labels)["kind"] for labels, value in counted.items() if value} == {"other"}


# --- Names ------------------------------------------------------------------------------------

# Units other than the base ones (seconds, bytes), and spellings Prometheus advises against.
_NOT_BASE_UNITS = re.compile(
    r"_(ms|us|ns|millis|milliseconds|microseconds|nanoseconds|minutes|hours|days"
    r"|kb|mb|gb|kib|mib|gib|kilobytes|megabytes|gigabytes|bits|percent|ratio_percent)(_|$)"
)


def families(registry: CollectorRegistry) -> list[tuple[str, str, str]]:
    """(name, type, help) of every metric, as exposed (counters with ``_total``)."""
    return [
        (
            family.name + ("_total" if family.type == "counter" else ""),
            family.type,
            family.documentation,
        )
        for family in registry.collect()
    ]


@pytest.mark.parametrize("which", ["proxy", "webhook"])
def test_no_metric_name_lacks_its_unit(which: str) -> None:
    registry = Metrics().registry if which == "proxy" else WebhookMetrics().registry
    found = families(registry)
    assert found
    for name, kind, help_text in found:
        assert re.fullmatch(r"detour_[a-z][a-z0-9_]*", name), name
        assert help_text, f"{name} has no help"
        assert not _NOT_BASE_UNITS.search(name), name
        base = name.removesuffix("_total")
        if kind == "counter":
            assert name.endswith("_total"), name
            assert "_total" not in base, name
        else:
            assert not name.endswith("_total"), name
        # A quantity of bytes says so first ("Bytes of ...", "Body bytes sent ...").
        measures_bytes = "size" in base or re.match(r"(body )?bytes\b", help_text.lower())
        measures_time = kind == "histogram" or re.search(
            r"duration|latency|seconds|\btime\b|\bage\b", f"{base} {help_text.lower()}"
        )
        if measures_bytes:
            assert base.endswith("_bytes"), f"{name}: bytes, so _bytes"
        elif measures_time:
            assert base.endswith("_seconds"), f"{name}: a duration, so _seconds"


def documented(section: str) -> set[str]:
    """The metric names the table under ``## <section>`` of docs/metrics.md gives."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    (body,) = [part for part in text.split("\n## ") if part.startswith(section)]
    return set(re.findall(r"^\| `(detour_[a-z_]+)` \|", body, re.MULTILINE))


def test_every_metric_is_documented_and_nothing_else() -> None:
    """docs/metrics.md's tables name exactly the metrics the proxy and the webhook export."""
    assert {name for name, _, _ in families(Metrics().registry)} == documented(
        "The proxy's metrics"
    )
    assert {name for name, _, _ in families(WebhookMetrics().registry)} == documented(
        "The webhook's metrics"
    )


# --- promtool ---------------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian's prometheus package; .ci/run)"
)


def promtool_problems(text: str) -> str:
    """What ``promtool check metrics`` says about an exposition: nothing, when it is clean."""
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    said = (done.stdout + done.stderr).decode().strip()
    if done.returncode != 0 and not said:
        said = f"promtool exited with status {done.returncode}"
    return said


@needs_promtool
async def test_promtool_finds_nothing_in_the_proxys_metrics(
    detour_process: MakeProxy, registry: Registry, tmp_path: Path
) -> None:
    proxy = await detour_process(scenario(registry, tmp_path / "cache"))
    name = unique_repo("p").split("/")[1]
    push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=1024)
    url = f"{proxy.url}/v2/{name}/manifests/v1"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as answer:
        assert answer.status == 200
    # Every kind of metric with samples: histograms with observations, labelled counters.
    samples = await wait_for(proxy, lambda s: ("GET", "manifests", "200") in requests_of(s))
    assert labelled(samples, "detour_upstream_request_duration_seconds_count")
    async with proxy.session.get(f"{proxy.url}/metrics") as response:
        text = await response.text()
    assert promtool_problems(text) == ""


@needs_promtool
async def test_promtool_finds_nothing_in_the_webhooks_metrics(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    settings = Settings.model_validate({"cache": {"dir": str(tmp_path / "cache")}})
    client = await aiohttp_client(create_webhook_app(settings))
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7d3c4f36-1f7e-4bde-9f56-1b2b1a8f0c11",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default",
            "operation": "CREATE",
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "p", "namespace": "default"},
                "spec": {"containers": [{"name": "c", "image": "nats:2.10"}]},
            },
        },
    }
    async with client.post("/mutate", json=review) as answer:
        assert answer.status == 200
        assert (await answer.json())["response"]["allowed"] is True
    async with client.get("/metrics") as response:
        text = await response.text()
    assert "detour_webhook_images_rewritten_total 1.0" in text
    assert promtool_problems(text) == ""
