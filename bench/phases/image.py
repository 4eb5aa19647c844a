"""An image pull as a runtime makes it, cold: ``IMAGE_LAYERS`` fresh layers per cache per
repeat, fetched three at a time (as containerd's ``max_concurrent_downloads``), the next one
started as soon as one ends; GB/s is the image's bytes over the pull's wall time. Back to back
like this, a cache's work for one layer (writing it, flushing it, reading it back) competes
with the next layer's fetch, which one blob at a time hides. Checks each layer cost one
upstream GET, and counts the layers each cache kept. The mirror reads the layers itself first
(:meth:`session.Bench.warm_mirror`)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from common import GB
from mirror import blob_requests
from targets import rotated

if TYPE_CHECKING:
    from session import Bench
    from targets import TargetKey

IMAGE_LAYERS = 6
AT_ONCE = 3  # containerd's default max_concurrent_downloads


async def pull_image(bench: Bench, key: TargetKey, layers: list[str]) -> float | None:
    """The image's layers from ``key``, ``AT_ONCE`` at a time: its GB/s, None if one failed."""
    assert bench.client is not None
    client, size = bench.client, bench.o.layer_size
    slots = asyncio.Semaphore(AT_ONCE)
    failed: list[str] = []

    async def pull(digest: str) -> None:
        async with slots:
            result = await client.fetch(bench.targets[key].blob(digest), verify=False)
        if not result.ok(size):
            failed.append(result.problem(size))

    started = time.perf_counter()
    await asyncio.gather(*(pull(digest) for digest in layers))
    seconds = time.perf_counter() - started
    if failed:
        bench.error(f"image cold {key}", "; ".join(failed))
        return None
    return len(layers) * size / seconds / GB


async def run(bench: Bench) -> None:
    upstream: dict[str, list[int]] = {k: [] for k in bench.targets.caches}
    cached: dict[str, list[int]] = {k: [] for k in bench.targets.caches}
    for r in range(bench.o.repeat):
        for key in rotated(bench.targets.caches, r):
            layers = bench.content.image_layers[key][r]
            await bench.warm_mirror(layers, bench.o.layer_size)
            mark = bench.targets.mirror_log.mark()
            gbps = await pull_image(bench, key, layers)
            if gbps is None:
                continue
            bench.record("image_cold_gbps", key, gbps)
            entries = await bench.targets.mirror_log.settle(mark)
            upstream[key].append(sum(blob_requests(entries, digest)[0] for digest in layers))
            # Stored (or given up) before the next cache is measured.
            rate = bench.o.slow_disk or GB
            limit = 10 + 2 * len(layers) * bench.o.layer_size / rate
            waits = (bench.targets.wait_cached(key, digest, limit) for digest in layers)
            cached[key].append(sum(await asyncio.gather(*waits)))
    bench.details["checks"]["image_cold_upstream_gets"] = upstream
    bench.details["checks"]["image_layers_cached"] = cached
