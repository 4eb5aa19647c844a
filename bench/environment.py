"""What the numbers were measured on: the machine, the tools' versions, the revisions of the
Detours measured, and how fast a new file can be written where the caches keep theirs."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import aiohttp
from common import GB, MIB, REPO_ROOT, first_line
from guest_memory import OFF, PARAMETER


def write_speed(directory: Path, size: int) -> float:
    """GB/s of writing ``size`` new bytes to a file (1 MiB writes, no fsync): the ceiling for a
    cache that writes a blob to disk as it serves it. On VMs that back guest memory lazily,
    page cache in pages the guest has not touched lately is much slower than on bare metal."""
    chunk = os.urandom(MIB)
    path = directory / "write-speed.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(max(1, size // MIB)):
            os.write(fd, chunk)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
    return max(1, size // MIB) * MIB / elapsed / GB


def page_reporting() -> str:
    """Whether this VM gives the memory its guest frees back to the host (bench/guest_memory.py),
    as the machine was before the run: a run killed under ``--backed-memory`` leaves it off."""
    try:
        order = PARAMETER.read_text().strip()
    except OSError:
        return "no free page reporting"
    return f"free page reporting {'off' if order == OFF else 'on'}, page_reporting_order {order}"


def tree_revision(tree: Path) -> str:
    """The short commit of a source tree (``+`` if its proxy/ has changes), or, for a tree
    that is not a git checkout (a ``git archive`` export), its directory's name."""

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(
                ["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "--short", "HEAD")
    if head is None or head.returncode != 0:
        return tree.name
    status = git("status", "--porcelain", "--", "proxy")
    return head.stdout.strip() + ("+" if status is not None and status.stdout.strip() else "")


def environment() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match[1].strip() if match else cpu
    memory = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        memory = f"{int(match[1]) / 1024 / 1024:.1f} GiB" if match else memory
    revision = first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "proxy"])
    if dirty not in ("unavailable", ""):
        revision += " + uncommitted changes in proxy/"
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "memory": memory,
        "page_reporting": page_reporting(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "distribution": first_line(["docker-registry", "--version"]),
        "wrk": first_line(["wrk", "-v"]).split(" Copyright")[0],
        "curl": first_line(["curl", "--version"]).split(" (")[0],
        "detour": revision,
    }
