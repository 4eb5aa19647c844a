"""Cold and hit blob GETs, GB/s: a fresh blob per cache per repeat, read once (cold), again
once the cache has committed it (hit), and a third time (hit again: a cache that wrote it with
O_DIRECT and did not read it back read the disk on the first hit, the page cache now); the
mirror read directly is the limit. A cold blob's processor time, the cache's and the mirror's,
from its GET until it is stored (the peer stores from a second fetch, after or while it
answers), and the pages the cache faulted in meanwhile (a cache whose buffers are reused, not
taken from the kernel anew chunk after chunk, faults in a few blocks' worth whatever the
blob's size). Checks that a cold GET cost the expected upstream GETs and a hit none. The mirror
reads each blob itself first, so that it serves the cold GET from memory (see
:meth:`session.Bench.warm_mirror`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common import GB
from mirror import blob_requests
from targets import rotated

if TYPE_CHECKING:
    from processes import Service
    from session import Bench
    from targets import TargetKey


class CpuUse:
    """The processor time a cache and the mirror use from now on, and the pages the cache
    faults in."""

    def __init__(self, cache: Service, mirror: Service) -> None:
        self._services = (cache, mirror)
        self._start = [service.cpu_seconds() or 0.0 for service in self._services]
        self._faults = cache.minor_faults() or 0

    def since(self) -> tuple[float, float]:
        cache, mirror = (
            (service.cpu_seconds() or 0.0) - start
            for service, start in zip(self._services, self._start, strict=True)
        )
        return cache, mirror

    def faults(self) -> int:
        return (self._services[0].minor_faults() or 0) - self._faults


async def run(bench: Bench) -> None:
    assert bench.client is not None
    size = bench.o.blob_size
    hits_from_cache: dict[str, list[bool]] = {k: [] for k in bench.targets.caches}
    cold_upstream: dict[str, list[int]] = {k: [] for k in bench.targets.caches}

    async def get(url: str, metric: str, what: str, key: TargetKey) -> bool:
        """GET the blob and record its GB/s under ``metric`` (a first hit: and the server's
        processor time); False (an error) if it failed."""
        assert bench.client is not None
        server = bench.targets.service(key)
        before = server.cpu_seconds()
        result = await bench.client.fetch(url, verify=False)
        if not result.ok(size):
            bench.error(what, result.problem(size))
            return False
        bench.record(metric, key, size / result.seconds / GB)
        after = server.cpu_seconds()
        if metric == "blob_hit_gbps" and before is not None and after is not None:
            bench.record("blob_hit_cpu_s", key, after - before)
        return True

    for r in range(bench.o.repeat):
        await bench.warm_mirror([bench.content.mirror_blob], size)
        if await get(
            bench.targets["mirror"].blob(bench.content.mirror_blob),
            "blob_hit_gbps",
            "blob mirror",
            "mirror",
        ):
            gbps = bench.samples["blob_hit_gbps"]["mirror"][-1]
            bench.record("blob_cold_gbps", "mirror", gbps)
            bench.record("blob_hit_again_gbps", "mirror", gbps)
        for key in rotated(bench.targets.caches, r):
            digest = bench.content.cold[key][r]
            url = bench.targets[key].blob(digest)
            await bench.warm_mirror([digest], size)
            mark = bench.targets.mirror_log.mark()
            cpu = CpuUse(bench.targets.service(key), bench.targets.mirror)
            if not await get(url, "blob_cold_gbps", f"blob cold {key} #{r}", key):
                continue
            if not await bench.targets.wait_cached(key, digest):
                bench.error(f"blob cold {key} #{r}", "blob never appeared in the cache")
            else:  # the whole of a cold blob's work: the client's stream and the storing
                cache_cpu, mirror_cpu = cpu.since()
                bench.record("blob_cold_cpu_s", key, cache_cpu)
                bench.record("blob_cold_mirror_cpu_s", key, mirror_cpu)
                bench.record("blob_cold_faults", key, cpu.faults())
            gets, _ = blob_requests(await bench.targets.mirror_log.settle(mark), digest)
            cold_upstream[key].append(gets)
            mark = bench.targets.mirror_log.mark()
            if not await get(url, "blob_hit_gbps", f"blob hit {key} #{r}", key):
                continue
            # Again: a cache that wrote the blob past the page cache (O_DIRECT) and did not
            # read it back read the disk on the first hit; this one it reads from memory.
            if not await get(url, "blob_hit_again_gbps", f"blob hit again {key} #{r}", key):
                continue
            gets, _ = blob_requests(await bench.targets.mirror_log.settle(mark), digest)
            hits_from_cache[key].append(gets == 0)
    bench.details["checks"]["blob_cold_upstream_gets"] = cold_upstream
    bench.details["checks"]["blob_hit_served_from_cache"] = hits_from_cache
