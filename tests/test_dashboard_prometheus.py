"""The Grafana dashboard (deploy/grafana) against a real Prometheus: Debian's ``prometheus``
scrapes a real ``detour serve`` and ``detour webhook`` while skopeo pulls an image through
Detour twice, next to a few requests that fail (404, 502). Then every expression of every panel
is evaluated through Prometheus' HTTP API as Grafana would send it, with the template variables
filled in: each must return data, and the hit, miss and byte panels must say what the workload
did.

Grafana's ``$__rate_interval`` and ``$__range`` are given one window that reaches back past the
first scrape, and each expression is evaluated at the time of the last scrape. Every counter a
panel reads starts at 0, so over that window Prometheus' ``increase()`` is the counter's exact
rise, and ``rate()`` that rise over the window: the values can be compared with the workload
exactly, however slowly a loaded machine scraped.

The table of every panel, expression and value is printed, and written to
``dashboard-values.txt`` in the test's directory.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy import __version__
from tests.images import ACCEPT_ALL, PushedImage, push_image, unique_repo
from tests.proxy import Proxy, scenario
from tests.registry import Registry
from tests.support import ROOT, Daemon, free_port, run_command
from tests.webhook_harness import (
    MountedSecret,
    Pki,
    Webhook,
    admission_review,
    detour_webhook,
    pod,
)

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian's prometheus package; .ci/run)"
)

DASHBOARD = ROOT / "deploy" / "grafana" / "detour-dashboard.json"
NAMESPACE, NODE = "detour-system", "node-a"  # the labels a ServiceMonitor would add
SCRAPE = "1s"
MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


@dataclass
class Prometheus:
    url: str
    session: aiohttp.ClientSession

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to (at ``at``, or now)."""
        params = {"query": expr} | ({} if at is None else {"time": f"{at:.3f}"})
        async with self.session.get(f"{self.url}/api/v1/query", params=params) as response:
            answer = await response.json()
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value of ``expr``, or None while it has none."""
        result = await self.query(expr, at)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None


async def start_prometheus(
    tmp_path: Path, detour: str, webhook: str, ca: Path
) -> tuple[Daemon, Prometheus]:
    """Prometheus scraping ``detour`` (plain HTTP) and ``webhook`` (HTTPS, ``ca``) every
    second, with the namespace and node labels the dashboard filters on."""
    config = {
        "global": {"scrape_interval": SCRAPE, "scrape_timeout": SCRAPE},
        "scrape_configs": [
            {
                "job_name": "detour",
                "static_configs": [
                    {"targets": [detour], "labels": {"namespace": NAMESPACE, "node": NODE}}
                ],
            },
            {
                "job_name": "webhook",
                "scheme": "https",
                "tls_config": {"ca_file": str(ca)},
                "static_configs": [{"targets": [webhook], "labels": {"namespace": NAMESPACE}}],
            },
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    assert PROMETHEUS is not None
    daemon = Daemon(
        "prometheus",
        [
            PROMETHEUS,
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        tmp_path / "prometheus.log",
        grace=10,
        interval=0.2,
    )
    session = aiohttp.ClientSession()
    url = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        try:
            async with session.get(f"{url}/-/ready") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await daemon.start_async(ready, 60)
    except BaseException:
        await session.close()
        raise
    return daemon, Prometheus(url, session)


async def until(what: str, check: Callable[[], Awaitable[bool]], limit: float = 90.0) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, f"Prometheus never showed {what}"
        await asyncio.sleep(0.25)


def panel_targets() -> list[tuple[str, str, str, str]]:
    """(panel title, refId, legend, expression) of every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["refId"], target.get("legendFormat", ""), target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def as_grafana_sends(expr: str, window: str) -> str:
    """``expr`` with the dashboard's variables filled in."""
    for variable, value in (
        ("$__rate_interval", window),
        ("$__range", window),
        ("$namespace", NAMESPACE),
        ("$node", NODE),
    ):
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


async def skopeo_pull(proxy: Proxy, name: str, dest: Path) -> None:
    """A real pull client: TLS first (a probe on Detour's plain port), then plain HTTP."""
    done = await run_command(
        "skopeo",
        "copy",
        "--src-tls-verify=false",
        f"docker://{proxy.host}/{name}:v1",
        f"oci:{dest}:v1",
    )
    done.check()


async def get(proxy: Proxy, path: str, method: str = "GET") -> int:
    async with proxy.session.request(
        method, f"{proxy.url}{path}", headers={"Accept": ACCEPT_ALL}
    ) as response:
        await response.read()
        return response.status


@dataclass(frozen=True)
class Workload:
    """What the workload did, as the panels should show it."""

    pulls: int
    cache_results: dict[tuple[str, str], int]  # (kind, result): requests
    served_bytes: dict[str, int]  # source: body bytes
    answered: dict[tuple[str, str], int]  # (endpoint kind, status): client requests


async def run_workload(
    proxy: Proxy, mirror: Registry, hook: Webhook, image: PushedImage, name: str, tmp_path: Path
) -> Workload:
    """Three pulls by skopeo (each begins with a TLS probe on the plain port): the first
    fetches everything; the second finds the tag's manifest confirmed upstream (``tag_ttl`` is
    1 ms) and the blobs on disk; the third, the mirror stopped, gets the manifest stale from
    disk. Between them, a pod reviewed and requests that fail: an unknown tag and blob (404)
    and a mirror nobody answers on (502)."""
    await skopeo_pull(proxy, name, tmp_path / "first")
    await skopeo_pull(proxy, name, tmp_path / "second")
    status, _ = await hook.review(admission_review(pod("nats:2.10"), namespace="apps"))
    assert status == 200
    failing = [
        ("GET", f"/v2/{name}/manifests/nope", 404),
        ("HEAD", f"/v2/{name}/blobs/sha256:{'ab' * 32}", 404),
        ("GET", "/v2/quay.io/team/app/manifests/v1", 502),
    ]
    for method, path, expected in failing:
        assert await get(proxy, path, method) == expected, path
    mirror.stop()
    await skopeo_pull(proxy, name, tmp_path / "third")

    blobs = len(image.blobs)
    size = len(image.manifest) + sum(blob.size for blob in image.blobs)
    return Workload(
        pulls=3,
        cache_results={
            ("manifest", "miss"): 3,  # the first pull, the unknown tag, the 502
            ("manifest", "revalidated"): 1,
            ("manifest", "stale"): 1,
            ("blob", "miss"): blobs + 1,  # the first pull, the unknown blob
            ("blob", "hit"): 2 * blobs,
        },
        served_bytes={"upstream": size, "cache": 2 * size},
        answered={
            ("manifests", "200"): 3,
            ("manifests", "404"): 1,
            ("manifests", "502"): 1,
            ("blobs", "200"): 3 * blobs,
            ("blobs", "404"): 1,
        },
    )


Series = dict[tuple[tuple[str, str], ...], float]


def series_of(result: list[dict[str, Any]]) -> Series:
    return {tuple(sorted(sample["metric"].items())): float(sample["value"][1]) for sample in result}


def table(rows: list[tuple[str, str, Series]], window: float) -> str:
    """A Markdown table: panel (and query), expression as sent, what it returned. A rate is
    also shown as its count over the window; series at 0 and quantiles of nothing observed
    (NaN) are counted, not listed."""
    lines = [
        f"Dashboard expressions, evaluated at the last scrape, over a window of {window:.0f}s",
        "",
        "| panel | expression | value |",
        "| --- | --- | --- |",
    ]
    for panel, expr, series in rows:
        counts = "rate(" in expr and "/" not in expr and "histogram_quantile" not in expr
        shown, zeros, nans = [], 0, 0
        for labels, value in sorted(series.items()):
            if math.isnan(value):
                nans += 1
                continue
            if value == 0 and len(series) > 1:
                zeros += 1
                continue
            name = ",".join(f"{k}={v}" for k, v in labels if k != "instance") or "-"
            text = f"{value:.6g}" + (f" (= {value * window:.6g})" if counts and value else "")
            shown.append(f"{name}: {text}")
        shown += [f"{zeros} more at 0"] if zeros else []
        shown += [f"{nans} NaN (nothing observed)"] if nans else []
        lines.append(f"| {panel} | `{expr}` | {'; '.join(shown) or 'NO DATA'} |")
    return "\n".join(lines) + "\n"


def test_the_dashboard_shows_what_an_operator_asks_first() -> None:
    """Panels for the version, TLS probes apart from requests, fetches queued and ended early,
    the peers; and a hit ratio that says what it counts."""
    exprs = " ".join(expr for _, _, _, expr in panel_targets())
    for metric in (
        "detour_build_info",
        "detour_tls_probes_total",
        "detour_queued_blob_fetches",
        "detour_ended_blob_fetches_total",
        "detour_peers",
        "detour_peers_down",
        "detour_peer_requests_total",
    ):
        assert re.search(rf"\b{metric}\{{", exprs), metric
    dashboard = json.loads(DASHBOARD.read_text())
    (ratio,) = [p for p in dashboard["panels"] if p["title"].startswith("Cache hit ratio")]
    said = f"{ratio['title']} {ratio['description']}"
    assert all(word in said for word in ("hit", "revalidated", "stale", "miss", "joined"))


@needs_prometheus
async def test_every_dashboard_panel_shows_the_workload(
    detour_process: MakeProxy,
    make_registry: Callable[..., Registry],
    pki: Pki,
    secret: MountedSecret,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mirror = make_registry()
    name = unique_repo("dash").split("/")[1]
    image = push_image(
        mirror, f"docker-mirror/library/{name}", "v1", layers=2, layer_size=64 * 1024
    )
    closed = f"127.0.0.1:{free_port()}"  # a mirror nobody answers on: 502
    cache = {"dir": str(tmp_path / "cache"), "max_size": "1GiB", "tag_ttl": 0.001}
    config = scenario(mirror, tmp_path / "cache", cache=cache)
    config["redirects"].append({"src": "quay.io/", "to": f"{closed}/quay-mirror/"})
    config["registries"][closed] = {"insecure": True}
    proxy = await detour_process(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETOUR_")}
    env["POD_NAMESPACE"] = NAMESPACE
    began = time.time()
    async with detour_webhook(tmp_path, pki, secret, env) as webhook:
        daemon, prometheus = await start_prometheus(
            tmp_path, proxy.host, f"127.0.0.1:{webhook.hook.port}", pki.ca_path
        )
        try:

            async def both_up() -> bool:  # scraped once: every counter's first sample is 0
                return await prometheus.value('sum(up{job=~"detour|webhook"})') == 2

            await until("both targets up", both_up)
            done = await run_workload(proxy, mirror, webhook.hook, image, name, tmp_path)
            rows, window = await evaluate_dashboard(prometheus, done, began)
        finally:
            await prometheus.session.close()
            await asyncio.to_thread(daemon.stop)
    report = table(rows, window)
    (tmp_path / "dashboard-values.txt").write_text(report)
    with capsys.disabled():
        print("\n" + report)
    check_panels(rows, done, window)


async def evaluate_dashboard(
    prometheus: Prometheus, done: Workload, began: float
) -> tuple[list[tuple[str, str, Series]], float]:
    """Every dashboard expression's result at the last scrape that saw the whole workload."""
    cache_requests = sum(done.cache_results.values())
    served = sum(done.served_bytes.values())

    found: list[float] = []

    async def all_scraped() -> bool:
        """Whether the last scrape of Detour (a successful one: its series are not stale)
        saw the whole workload, and the webhook's the review."""
        at = await prometheus.value('timestamp(detour_build_info{job="detour"})')
        if at is None:
            return False
        counts = [
            await prometheus.value(f'sum(detour_{name}{{job="detour"}})', at)
            for name in ("cache_requests_total", "served_bytes_total")
        ]
        reviews = await prometheus.value("sum(detour_webhook_reviews_total)", at)
        found[:] = [at]
        return counts == [cache_requests, served] and reviews == 1

    await until("the whole workload", all_scraped)
    (last,) = found
    window = math.ceil(last - began) + 60  # back past the first scrape
    rows = []
    for title, ref, _, expr in panel_targets():
        sent = as_grafana_sends(expr, f"{window}s")
        result = series_of(await prometheus.query(sent, at=last))
        rows.append((f"{title} [{ref}]", sent, result))
    total = await prometheus.query(
        f'sum(increase(detour_http_requests_total{{job="detour"}}[{window}s]))', at=last
    )
    rows.append(("(all client requests, for the error ratio)", "", series_of(total)))
    return rows, float(window)


def check_panels(rows: list[tuple[str, str, Series]], done: Workload, window: float) -> None:
    found = {panel: series for panel, _, series in rows}
    # Every query returns data, and a number: no panel stays empty.
    empty = [panel for panel, series in found.items() if not series]
    assert empty == []
    blank = [p for p, series in found.items() if not any(map(math.isfinite, series.values()))]
    assert blank == []

    def by(panel: str, label: str, scale: float = 1.0) -> dict[str, float]:
        return {dict(labels)[label]: value * scale for labels, value in found[panel].items()}

    def one(panel: str) -> float:
        (value,) = found[panel].values()
        return value

    approx = pytest.approx
    hits = done.cache_results.get(("blob", "hit"), 0) + done.cache_results.get(
        ("manifest", "hit"), 0
    )
    from_disk = hits + sum(
        n for (_, result), n in done.cache_results.items() if result in ("revalidated", "stale")
    )
    requests = sum(done.cache_results.values())
    hit_ratio = "Cache hit ratio (hit; from disk: hit + revalidated + stale)"
    assert one(f"{hit_ratio} [A]") == approx(hits / requests)
    assert one(f"{hit_ratio} [B]") == approx(from_disk / requests)
    assert by("Hit ratio by kind (hits only) [A]", "kind") == approx(
        {
            kind: done.cache_results.get((kind, "hit"), 0)
            / sum(n for (k, _), n in done.cache_results.items() if k == kind)
            for kind in ("manifest", "blob")
        }
    )
    results = {
        (dict(labels)["kind"], dict(labels)["result"]): round(value * window, 6)
        for labels, value in found["Cache requests by result [A]"].items()
    }
    assert {key: n for key, n in results.items() if n} == done.cache_results
    assert by("Bytes served by source [A]", "source", window) == approx(done.served_bytes)

    answered = {
        (dict(labels)["kind"], dict(labels)["status"]): round(value * window, 6)
        for labels, value in found["Client requests by endpoint and status [A]"].items()
    }
    pulls = {k: n for k, n in answered.items() if k[0] in ("manifests", "blobs") and n}
    assert pulls == done.answered
    (total,) = found["(all client requests, for the error ratio)"].values()
    errors = {
        code: sum(n for (_, status), n in done.answered.items() if status.startswith(code[0]))
        for code in ("5xx", "4xx")
    }
    assert one("Client error ratio [A]") * total == approx(errors["5xx"])
    # The TLS probes are not among the 4xx: only the unknown tag and blob.
    assert one("Client error ratio [B]") * total == approx(errors["4xx"])
    # skopeo tries TLS once per pull, at least.
    assert round(one("TLS probes on the plain-HTTP port [A]") * window, 6) >= done.pulls
    # The request durations of every kind of endpoint the workload asked, the first included.
    for ref in ("A", "B"):
        durations = by(f"Client request duration by endpoint (p50, p99) [{ref}]", "kind")
        kinds = {kind for kind, _ in done.answered} | {"api_root"}
        assert {kind for kind, value in durations.items() if math.isfinite(value)} >= kinds
    assert by("Running versions [A]", "version") == {__version__: 1.0}
