"""Prometheus metrics, on a registry of the app's own (so several apps can share a process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Upstream latencies: from a few ms on a LAN mirror to the connect timeout.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # The registries the operator named; every other one is labelled "other", so names a
    # client invents can't grow the number of series.
    known_registries: frozenset[str] = frozenset()

    def registry_label(self, registry: str) -> str:
        return registry if registry in self.known_registries else "other"

    def __post_init__(self) -> None:
        r = self.registry
        self.cache_requests = Counter(
            "detour_cache_requests",
            "Manifest and blob requests by cache result "
            "(hit, miss, stale, revalidated, bypass: not cached because private).",
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
        self.bytes_served = Counter(
            "detour_bytes_served",
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
            "too_large, no_room under cache.max_size); what they held was served uncached.",
            ["reason"],
            registry=r,
        )
        self.inflight_fetches = Gauge(
            "detour_inflight_blob_fetches",
            "Blob fetches from upstream under way.",
            registry=r,
        )
        self.peers = Gauge(
            "detour_peers",
            "Detours in the site's peer set (cluster.peers), this one included if a member.",
            registry=r,
        )
        self.peer_requests = Counter(
            "detour_peer_requests",
            "Requests to the owners of blobs, manifests and tags among the peers, by result: "
            "served, failed (the next peer or the upstream served), skipped (down lately).",
            ["result"],
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

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
