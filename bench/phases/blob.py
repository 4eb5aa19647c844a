"""Cold and hit blob GETs, GB/s: a fresh blob per cache per repeat, read once (cold), again
once the cache has committed it (hit), and a third time (hit again: a cache that wrote it with
O_DIRECT and did not read it back read the disk on the first hit, the page cache now); the
mirror read directly is the limit. Checks that a cold GET cost the expected upstream GETs and a
hit none."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common import GB
from mirror import blob_requests
from targets import rotated

if TYPE_CHECKING:
    from session import Bench


async def run(bench: Bench) -> None:
    assert bench.client is not None
    size = bench.o.blob_size
    hits_from_cache: dict[str, list[bool]] = {k: [] for k in bench.targets.caches}
    cold_upstream: dict[str, list[int]] = {k: [] for k in bench.targets.caches}
    for r in range(bench.o.repeat):
        result = await bench.client.fetch(
            bench.targets["mirror"].blob(bench.content.mirror_blob), verify=False
        )
        if result.ok(size):
            bench.record("blob_cold_gbps", "mirror", size / result.seconds / GB)
            bench.record("blob_hit_gbps", "mirror", size / result.seconds / GB)
            bench.record("blob_hit_again_gbps", "mirror", size / result.seconds / GB)
        else:
            bench.error("blob mirror", result.problem(size))
        for key in rotated(bench.targets.caches, r):
            digest = bench.content.cold[key][r]
            url = bench.targets[key].blob(digest)
            mark = bench.targets.mirror_log.mark()
            cold = await bench.client.fetch(url, verify=False)
            if not cold.ok(size):
                bench.error(f"blob cold {key} #{r}", cold.problem(size))
                continue
            bench.record("blob_cold_gbps", key, size / cold.seconds / GB)
            if not await bench.targets.wait_cached(key, digest):
                bench.error(f"blob cold {key} #{r}", "blob never appeared in the cache")
            gets, _ = blob_requests(await bench.targets.mirror_log.settle(mark), digest)
            cold_upstream[key].append(gets)
            mark = bench.targets.mirror_log.mark()
            hit = await bench.client.fetch(url, verify=False)
            if not hit.ok(size):
                bench.error(f"blob hit {key} #{r}", hit.problem(size))
                continue
            bench.record("blob_hit_gbps", key, size / hit.seconds / GB)
            # Again: a cache that wrote the blob past the page cache (O_DIRECT) and did not
            # read it back read the disk on the first hit; this one it reads from memory.
            again = await bench.client.fetch(url, verify=False)
            if not again.ok(size):
                bench.error(f"blob hit again {key} #{r}", again.problem(size))
                continue
            bench.record("blob_hit_again_gbps", key, size / again.seconds / GB)
            gets, _ = blob_requests(await bench.targets.mirror_log.settle(mark), digest)
            hits_from_cache[key].append(gets == 0)
    bench.details["checks"]["blob_cold_upstream_gets"] = cold_upstream
    bench.details["checks"]["blob_hit_served_from_cache"] = hits_from_cache
