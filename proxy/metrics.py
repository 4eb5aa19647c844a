"""Prometheus metrics, on a registry of the app's own (so several apps can share a process).

Names follow Prometheus' conventions: counters end in ``_total`` (prometheus_client adds it),
byte quantities in ``_bytes``, durations in ``_seconds``. Every label has a bounded set of
values, and the series of the known values of labelled counters exist from the start, at 0,
so that ``increase()`` and ``rate()`` see the first event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy import __version__

# Upstream latencies: from a few ms on a LAN mirror to the connect timeout.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Client requests: a cached manifest in a millisecond to a large blob streamed for minutes.
_REQUEST_BUCKETS = (*_LATENCY_BUCKETS, 60.0, 120.0, 300.0, 600.0)

# The label values each labelled counter is initialised with.
CACHE_RESULTS = {
    "blob": ("hit", "miss", "peer", "joined", "bypass"),
    "manifest": ("hit", "miss", "peer", "joined", "revalidated", "stale", "bypass"),
}
CACHE_WRITE_FAILURES = (
    "disk_full",
    "read_only",
    "io_error",
    "too_large",
    "no_room",
    "disk_behind",
)
PEER_RESULTS = ("served", "failed", "skipped", "not_held")
# Why a peer was bypassed at once (proxy.upstream.peer_checks): it lied, or could not
# prove it is one.
PEER_LIES = ("wrong_blob", "wrong_manifest", "redirect", "unproven_tag")
ENDED_FETCHES = ("abandoned", "too_slow")
# A silent peer probed (proxy.upstream.liveness): alive, waited on; hung, bypassed.
PEER_PROBES = ("alive", "hung")
# Where a blob client was let go of after upstream.client_wait with nothing to send it.
CLIENT_WAITS = ("headers", "body")
SOURCES = ("cache", "upstream")
DIGEST_KINDS = ("blob", "manifest")
TOKEN_OUTCOMES = ("issued", "refused", "error")
UPSTREAM_FAILURES = ("error", "timeout", "refused")  # the statuses that are not HTTP's
# The HTTP statuses registries answer a pull with (302 and 307: redirects to blob storage).
UPSTREAM_STATUSES = (200, 206, 302, 307, 401, 403, 404, 429, 500, 502, 503, 504)
OTHER = "other"
CACHE = "cache"  # the registry label of a cache file that failed its check

# Client requests: the endpoint kind and the method, each from a fixed set.
REQUEST_KINDS = (
    "manifests",
    "blobs",
    "tags",
    "referrers",
    "api_root",
    "metrics",
    "health",
    OTHER,
)
REQUEST_METHODS = ("GET", "HEAD", OTHER)

# The statuses Detour answers GET and HEAD with, by endpoint kind: their series start at 0, so
# the first 404 or 502 of each shows in rate(). (499: the client hung up; nginx's number.) The
# duration histogram's start for GET of every kind and HEAD of the pull endpoints (API_KINDS).
API_KINDS = ("manifests", "blobs", "tags", "referrers")
_API_STATUSES = (200, 400, 401, 403, 404, 429, 499, 500, 502, 503, 504)
REQUEST_STATUSES: dict[str, tuple[int, ...]] = {
    "manifests": (*_API_STATUSES, 406),
    "blobs": (*_API_STATUSES, 206, 416),
    "tags": _API_STATUSES,
    "referrers": _API_STATUSES,
    "api_root": (200, 499, 500, 503),
    "metrics": (200, 500),
    "health": (200, 500, 503),
    OTHER: (404, 500, 503),
}
# Any other method: 405 on every kind; and 400, a request the HTTP parser refused.
OTHER_METHOD_STATUSES: dict[str, tuple[int, ...]] = {
    **{kind: (405,) for kind in REQUEST_KINDS},
    OTHER: (400, 405),
}


def endpoint_kind(path: str) -> str:
    """The kind of endpoint a request path names, one of :data:`REQUEST_KINDS`."""
    if path in ("/v2", "/v2/"):
        return "api_root"
    if path.startswith("/v2/"):
        parts = path[4:].split("/")
        if len(parts) >= 3 and parts[0]:
            if parts[-2] in ("manifests", "blobs", "referrers"):
                return parts[-2]
            if parts[-2:] == ["tags", "list"]:
                return "tags"
        return OTHER
    if path == "/metrics":
        return "metrics"
    if path in ("/healthz", "/readyz"):
        return "health"
    return OTHER


class _PeerMetrics:
    """The site's peers (proxy.cluster, proxy.upstream): how many, which are down, and what
    asking them gave."""

    peers: Gauge
    peers_down: Gauge
    peer_requests: Counter
    peers_bypassed: Counter
    peer_probes: Counter

    def _add_peer_metrics(self, r: CollectorRegistry) -> None:
        self.peers = Gauge(
            "detour_peers",
            "Detours in the site's peer set (cluster.peers), this one included if a member.",
            registry=r,
        )
        self.peers_down = Gauge(
            "detour_peers_down",
            "Peers taken as down now: one that failed, hung or was bypassed is not asked for "
            "a while (the cluster's down period, 30 s by default).",
            registry=r,
        )
        self.peer_requests = Counter(
            "detour_peer_requests",
            "Requests to the owners of blobs, manifests and tags among the peers, by result: "
            "served, failed (the next peer or the upstream served), skipped (down lately), "
            "not_held (asked only for a copy it holds, it had none).",
            ["result"],
            registry=r,
        )
        self.peers_bypassed = Counter(
            "detour_peers_bypassed",
            "Peers marked down at once for an answer no Detour of the site gives, by reason: "
            "wrong_blob, wrong_manifest (bytes that do not match their digest), redirect, "
            "unproven_tag (a tag without proof of cluster.secret_dir's secret); the next peer "
            "or the upstream served instead.",
            ["reason"],
            registry=r,
        )
        self.peer_probes = Counter(
            "detour_peer_probes",
            "Peers silent for cluster.read_timeout, probed on a new connection, by result: alive "
            "(waited on: it waits for its own upstream), hung (no answer: marked down, the "
            "fetch went on from the next source).",
            ["result"],
            registry=r,
        )
        for result in PEER_RESULTS:
            self.peer_requests.labels(result)
        for reason in PEER_LIES:
            self.peers_bypassed.labels(reason)
        for result in PEER_PROBES:
            self.peer_probes.labels(result)


class _FetchMetrics:
    """Blob fetches (proxy.content): under way, queued, tried again, ended early, and the
    clients let go of while one waited."""

    inflight_fetches: Gauge
    queued_fetches: Gauge
    fetch_retries: Counter
    client_waits: Counter
    ended_fetches: Counter

    def _add_fetch_metrics(self, r: CollectorRegistry) -> None:
        self.inflight_fetches = Gauge(
            "detour_inflight_blob_fetches",
            "Blob fetches from upstream under way.",
            registry=r,
        )
        self.fetch_retries = Counter(
            "detour_blob_fetch_retries",
            "Blob fetches tried again, after a back-off, when every upstream failed (a WAN cut): "
            "within upstream.retry_for, from the byte reached.",
            registry=r,
        )
        self.client_waits = Counter(
            "detour_blob_client_waits_ended",
            "Blob clients sent nothing for upstream.client_wait while the fetch waited for its "
            "upstream, by where: headers (answered 504), body (connection closed); their retry "
            "joins the same fetch.",
            ["where"],
            registry=r,
        )
        self.queued_fetches = Gauge(
            "detour_queued_blob_fetches",
            "Blob fetches waiting for a slot (upstream.max_fetches, max_fetches_per_registry).",
            registry=r,
        )
        self.ended_fetches = Counter(
            "detour_ended_blob_fetches",
            "Blob fetches Detour ended early: abandoned (no client left), or too slow.",
            ["reason"],
            registry=r,
        )
        for reason in ENDED_FETCHES:
            self.ended_fetches.labels(reason)
        for where in CLIENT_WAITS:
            self.client_waits.labels(where)


@dataclass
class Metrics(_PeerMetrics, _FetchMetrics):
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # The registries the operator named; every other one is labelled "other", so names a
    # client invents can't grow the number of series.
    known_registries: frozenset[str] = frozenset()

    def registry_label(self, registry: str) -> str:
        return registry if registry in self.known_registries else OTHER

    def __post_init__(self) -> None:
        r = self.registry
        self.build_info = Gauge(
            "detour_build_info",
            "Always 1; the running Detour's version in its label.",
            ["version"],
            registry=r,
        )
        self.http_requests = Counter(
            "detour_http_requests",
            "Client requests answered, by method (GET, HEAD, other), endpoint kind and status.",
            ["method", "kind", "status"],
            registry=r,
        )
        self.tls_probes = Counter(
            "detour_tls_probes",
            "TLS handshakes sent to this plain-HTTP port (podman, docker and skopeo try TLS "
            "first on an insecure registry), answered 400 so that they fall back to HTTP; "
            "routine, and not in detour_http_requests_total.",
            registry=r,
        )
        self.http_duration = Histogram(
            "detour_http_request_duration_seconds",
            "Time from a client request's arrival to the end of its response.",
            ["method", "kind"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            "detour_cache_requests",
            "Manifest and blob requests by cache result: hit; miss; peer (a miss asked of the "
            "peer that owns it); joined (shared a fetch already under way); revalidated and "
            "stale (manifests by tag: confirmed upstream, or served from the cache while the "
            "upstream failed); bypass (not cached because private).",
            ["kind", "result"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "detour_upstream_requests",
            "Requests to upstream registries, by registry and HTTP status (or error, timeout).",
            ["registry", "status"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "detour_upstream_request_duration_seconds",
            "Time from sending an upstream request to its response headers.",
            ["registry"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.served_bytes = Counter(
            "detour_served_bytes",
            "Body bytes sent to clients, by source (cache, upstream).",
            ["source"],
            registry=r,
        )
        self.verify_failures = Counter(
            "detour_digest_mismatches",
            "Upstream content whose digest or size did not match; discarded, client aborted.",
            ["kind", "registry"],
            registry=r,
        )
        self.token_requests = Counter(
            "detour_token_requests",
            "Bearer token requests to upstream token services, by registry and outcome.",
            ["registry", "outcome"],
            registry=r,
        )
        self.cache_size = Gauge(
            "detour_cache_size_bytes",
            "Bytes of blobs and manifests in the cache.",
            registry=r,
        )
        self.cache_max_size = Gauge(
            "detour_cache_max_size_bytes",
            "cache.max_size (0: unbounded).",
            registry=r,
        )
        self.evictions = Counter(
            "detour_cache_evictions",
            "Cache entries evicted, least recently used first, to stay under cache.max_size.",
            registry=r,
        )
        self.cache_write_failures = Counter(
            "detour_cache_write_failures",
            "Cache writes refused or not attempted, by reason (disk_full, read_only, io_error; "
            "too_large, no_room under cache.max_size; disk_behind: the disk fell further behind "
            "the network than cache.write_behind); what they held was served uncached.",
            ["reason"],
            registry=r,
        )
        self._add_peer_metrics(r)
        self._add_fetch_metrics(r)
        self._initialise()

    def _initialise(self) -> None:
        """Create every series whose label values are known in advance, at 0."""
        self.build_info.labels(__version__).set(1)
        for method in REQUEST_METHODS:
            table = OTHER_METHOD_STATUSES if method == OTHER else REQUEST_STATUSES
            for kind, statuses in table.items():
                for status in statuses:
                    self.http_requests.labels(method, kind, str(status))
        for kind in REQUEST_KINDS:
            self.http_duration.labels("GET", kind)
        for kind in API_KINDS:
            self.http_duration.labels("HEAD", kind)
        for kind, results in CACHE_RESULTS.items():
            for result in results:
                self.cache_requests.labels(kind, result)
        for reason in CACHE_WRITE_FAILURES:
            self.cache_write_failures.labels(reason)
        for source in SOURCES:
            self.served_bytes.labels(source)
        self.verify_failures.labels("blob", CACHE)  # the cache's own files (proxy.content.blobs)
        for registry in sorted(self.known_registries | {OTHER}):
            for kind in DIGEST_KINDS:
                self.verify_failures.labels(kind, registry)
            for outcome in TOKEN_OUTCOMES:
                self.token_requests.labels(registry, outcome)
            for outcome in (*UPSTREAM_FAILURES, *map(str, UPSTREAM_STATUSES)):
                self.upstream_requests.labels(registry, outcome)
            self.upstream_latency.labels(registry)

    def request_finished(
        self, method: str, path: str, status: int, seconds: float, source: str | None, sent: int
    ) -> None:
        """Count a client request once it is answered (``proxy.api.app.metrics_middleware``):
        by method, endpoint kind and status, its duration, and its body bytes by source."""
        method = method if method in ("GET", "HEAD") else OTHER
        kind = endpoint_kind(path)
        self.http_requests.labels(method, kind, str(status)).inc()
        self.http_duration.labels(method, kind).observe(seconds)
        if source is not None:
            self.served_bytes.labels(source).inc(sent)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
