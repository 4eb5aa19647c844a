"""One bench run: its options, the content pushed for it, the samples and checks it gathers,
and the order of things (push, pick the client, each phase with its profiler, the closing
reads of RSS, Detour's metrics and its log). The phases themselves are in ``phases/``."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from clients import AiohttpClient, Client, CurlClient
from common import GB, MIB, log
from environment import tree_revision, write_speed
from mirror import Pusher
from phases import RUNNERS, image
from processes import reap, spawn
from targets import TargetKey, Targets


@dataclass
class Content:
    image: str = ""
    mirror_blob: str = ""
    mirror_herd: str = ""
    cold: dict[str, list[str]] = field(default_factory=dict)
    herd: dict[str, list[str]] = field(default_factory=dict)
    rss_cold: dict[str, str] = field(default_factory=dict)
    rss_warm: dict[str, str] = field(default_factory=dict)
    image_layers: dict[str, list[list[str]]] = field(default_factory=dict)


@dataclass
class Options:
    blob_mib: int
    herd_mib: int
    herd_clients: int
    rss_clients: int
    repeat: int
    wrk_duration: int
    wrk_connections: int
    wrk_threads: int
    client: str
    phases: tuple[str, ...]
    profile: Path | None
    json_path: Path | None = None
    keep: bool = False
    baseline: Path | None = None  # another source tree's Detour, run beside this one
    baseline_ramfs: bool = False  # its cache on a ramfs, which refuses O_DIRECT
    slow_disk: int | None = None  # bytes a second: each cache's storage on a disk this slow
    uplink_mbit: float | None = None  # what the mirror sends, held to this rate
    backed_memory: bool = False  # a VM's free memory written once, its reporting off

    @property
    def layer_size(self) -> int:
        """An image phase layer: a quarter of a blob."""
        return self.blob_size // 4

    @property
    def blob_size(self) -> int:
        return self.blob_mib * MIB

    @property
    def herd_size(self) -> int:
        return self.herd_mib * MIB


Samples = dict[str, dict[str, list[float]]]  # metric → target → one value per repeat


class Bench:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.o = options
        self.dir = workdir
        self.targets = Targets(
            workdir,
            options.baseline,
            options.baseline_ramfs,
            options.slow_disk,
            options.uplink_mbit,
            options.backed_memory,
        )
        self.content = Content()
        self.samples: Samples = {}
        self.details: dict[str, Any] = {"errors": [], "checks": {}}
        self.client: Client | None = None

    # --------------------------------------------------------------------- setup

    def start(self) -> None:
        self.targets.start_mirror()
        if self.targets.memory is not None:
            self.details["backed_memory"] = self.targets.memory.describe()
        self.push()
        self.targets.start_caches()

    def push(self) -> None:
        o, c = self.o, self.content
        pusher = Pusher(self.targets.mirror_port)
        started = time.perf_counter()
        total = 0

        def blob(size: int) -> str:
            nonlocal total
            total += size
            return pusher.random_blob(size)

        c.image = pusher.image()
        c.mirror_blob = blob(o.blob_size)
        for key in self.targets.caches:
            c.cold[key] = [blob(o.blob_size) for _ in range(o.repeat)] if "blob" in o.phases else []
            c.herd[key] = [blob(o.herd_size) for _ in range(o.repeat)] if "herd" in o.phases else []
            if "image" in o.phases:
                layers = image.IMAGE_LAYERS
                c.image_layers[key] = [
                    [blob(o.layer_size) for _ in range(layers)] for _ in range(o.repeat)
                ]
            if "rss" in o.phases:
                c.rss_cold[key] = blob(o.blob_size)
                c.rss_warm[key] = blob(o.blob_size)
        if "herd" in o.phases:
            c.mirror_herd = blob(o.herd_size)
        elapsed = time.perf_counter() - started
        log(f"pushed {total / MIB:.0f} MiB to the mirror in {elapsed:.1f}s")

    # --------------------------------------------------------------------- helpers

    def record(self, metric: str, key: TargetKey, value: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(key, []).append(value)

    async def warm_mirror(self, digests: list[str], size: int) -> None:
        """Read these blobs from the mirror (the bench's own reads, not counted as upstream
        requests), so that the caches' cold GETs find them in its page cache: an upstream that
        serves at a network's pace, not at this machine's disk's. Pushed minutes before, they
        may have left it (this VM's DAMON pages out what is idle for a minute)."""
        assert self.client is not None
        mirror = self.targets["mirror"]
        for digest in digests:
            result = await self.client.fetch(mirror.blob(digest), verify=False)
            if not result.ok(size):
                self.error("mirror warm-up", result.problem(size))

    def error(self, where: str, message: str) -> None:
        self.details["errors"].append(f"{where}: {message}")
        log(f"ERROR {where}: {message}")

    def check_alive(self) -> None:
        for service in self.targets.services:
            code = service.exit_code()
            if code is not None and not self.details.get(f"{service.name}_died"):
                self.details[f"{service.name}_died"] = code
                self.error(service.name, f"exited with {code}; log tail:\n{service.log_tail()}")

    async def _profiled(self, phase: str) -> asyncio.subprocess.Process | None:
        if self.o.profile is None:
            return None
        py_spy = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        if py_spy is None:
            log("--profile: py-spy not found (pip install py-spy); not profiling")
            self.o.profile = None
            return None
        self.o.profile.mkdir(parents=True, exist_ok=True)
        out = self.o.profile / f"detour-{phase}.txt"
        proc = await spawn(
            py_spy,
            "record",
            "--pid",
            str(self.targets.detour.pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)  # let it attach
        return proc

    @staticmethod
    async def _stop_profile(proc: asyncio.subprocess.Process | None) -> None:
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(reap(proc), 30)
        except TimeoutError:
            proc.kill()
            await reap(proc)

    # --------------------------------------------------------------------- measurements

    async def run(self) -> None:
        aio = AiohttpClient()
        clients: dict[str, Client] = {"aiohttp": aio}
        if shutil.which("curl") and shutil.which("openssl"):
            clients["curl"] = CurlClient()
        try:
            self.details["clients"] = await self.choose_client(clients)
            if self.o.baseline is not None:
                self.details["baseline_revision"] = tree_revision(self.o.baseline)
            speed = await asyncio.to_thread(write_speed, self.dir, self.o.blob_size)
            self.details["write_gbps"] = speed
            log(f"writing a new {self.o.blob_mib} MiB file here: {speed:.2f} GB/s")
            for phase in self.o.phases:
                profiler = await self._profiled(phase)
                try:
                    await RUNNERS[phase](self)
                finally:
                    await self._stop_profile(profiler)
                self.check_alive()
            await self.finish()
        finally:
            await aio.close()

    async def choose_client(self, clients: dict[str, Client]) -> dict[str, Any]:
        """Fetch the mirror's blob with each client; use the faster one for every target."""
        url = self.targets["mirror"].blob(self.content.mirror_blob)
        rates: dict[str, float] = {}
        for name, client in clients.items():
            if self.o.client not in ("auto", name):
                continue
            await client.fetch(url, verify=False)  # warm-up
            runs = []
            for _ in range(3):
                result = await client.fetch(url, verify=False)
                if not result.ok(self.o.blob_size):
                    raise RuntimeError(
                        f"{name} cannot read the mirror: {result.problem(self.o.blob_size)}"
                    )
                runs.append(result.size / result.seconds / GB)
            rates[name] = statistics.median(runs)
        if not rates:
            raise RuntimeError(f"client {self.o.client} is not available")
        chosen = max(rates, key=lambda n: rates[n])
        self.client = clients[chosen]
        summary = ", ".join(f"{n} {r:.2f} GB/s" for n, r in rates.items())
        log(f"client: {chosen} (mirror blob read: {summary})")
        return {"chosen": chosen, "mirror_gbps": rates}

    async def finish(self) -> None:
        t = self.targets
        keys: list[TargetKey] = ["detour", "peer", "mirror"]
        if t.base is not None:
            keys.append("base")
        for key in keys:
            hwm = t.service(key).status_kib("VmHWM")
            if hwm is not None:
                self.record("rss_run_hwm_mib", key, hwm / 1024)
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{t.detour_port}/metrics") as response,
            ):
                text = await response.text()
            self.details["detour_upstream_requests"] = [
                line
                for line in text.splitlines()
                if line.startswith("detour_upstream_requests_total")
            ]
        except aiohttp.ClientError as exc:
            self.details["detour_upstream_requests"] = [f"unavailable: {exc}"]
        for detour in (t.detour, t.base):
            if detour is None:
                continue
            problems = [
                line
                for line in detour.log_path.read_text(errors="replace").splitlines()
                if '"level": "error"' in line or '"level": "warning"' in line or "Traceback" in line
            ]
            self.details[f"{detour.name}_log_problems"] = problems[:50]
            self.details[f"{detour.name}_log_problem_count"] = len(problems)
