"""Debian root file systems for test images, built with debootstrap and cached on the machine.

``debian_root(["python3", "python3-venv"])`` returns the path of a minimal Debian root
(``debootstrap --variant=minbase``) with those packages installed. The first call on a machine
builds it (a few minutes); later calls, from any test or process, return the same directory.
Each root is keyed by its suite, mirror and package list, under ``/var/cache/detour-tests/rootfs``
(or ``$DETOUR_TEST_CACHE/rootfs``), built beside its final place and renamed into it when
complete, under a file lock, so concurrent callers build it once and never see half a root.

Treat the returned directory as read-only: it is shared by every caller that asks for the same
packages. ``root_tarball`` packs it, with extra files laid over it, for ``docker import``.

Needs root and Debian's ``debootstrap`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BUILD_TIMEOUT = 1800.0


def cache_dir() -> Path:
    return Path(os.environ.get("DETOUR_TEST_CACHE", "/var/cache/detour-tests")) / "rootfs"


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), or deb.debian.org."""
    sources = Path("/etc/apt/sources.list.d")
    candidates = sorted(sources.glob("*.sources")) if sources.is_dir() else []
    for path in candidates:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "URIs":
                for uri in value.split():
                    if uri.rstrip("/").endswith("/debian"):
                        return uri.rstrip("/")
    one_line = [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[1].rstrip("/").endswith("/debian"):
                return words[1].rstrip("/")
    return DEFAULT_MIRROR


def debian_root(packages: Iterable[str], *, suite: str = SUITE, mirror: str | None = None) -> Path:
    """A minbase root of ``suite`` with ``packages`` installed, built once per machine."""
    wanted = sorted(set(packages))
    source = mirror or apt_mirror()
    key = hashlib.sha256("\n".join([suite, source, *wanted]).encode()).hexdigest()[:16]
    base = cache_dir()
    final = base / f"{suite}-{key}"
    if (final / ".complete").is_file():
        if final.stat().st_mode & 0o777 != 0o755:
            final.chmod(0o755)  # a root built before its mode was set
        return final
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{suite}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").is_file():
            return final
        if final.exists():
            shutil.rmtree(final)
        building = Path(tempfile.mkdtemp(prefix=f".{suite}-{key}-", dir=base))
        try:
            command = ["debootstrap", "--variant=minbase"]
            if wanted:
                command.append("--include=" + ",".join(wanted))
            bootstrap(command, suite, building, source)
            # What apt left behind, which no test image needs.
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (building / leftover).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            building.chmod(0o755)  # mkdtemp's 0700 would shut a container's users out of /
            (building / ".complete").write_text("\n".join(wanted) + "\n")
            building.rename(final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return final


def bootstrap(command: list[str], suite: str, target: Path, mirror: str) -> None:
    result = subprocess.run(
        [*command, suite, str(target), mirror],
        capture_output=True,
        text=True,
        check=False,
        timeout=BUILD_TIMEOUT,
    )
    if result.returncode != 0:
        log = target / "debootstrap" / "debootstrap.log"
        detail = log.read_text()[-3000:] if log.is_file() else result.stderr[-3000:]
        raise RuntimeError(f"{' '.join(command)} {suite} failed:\n{detail}")


def root_tarball(root: Path, dest: Path, overlay: Mapping[str, bytes] | None = None) -> Path:
    """``root`` as an uncompressed tar at ``dest`` for ``docker import``, with ``overlay``'s
    files (path inside the root -> content, mode 0644, owned by root) in place of the root's."""
    extra = {path.strip("/"): data for path, data in (overlay or {}).items()}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = info.name.removeprefix("./")
        if name in extra or name == ".complete":
            return None
        return info

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=".", filter=keep)
        for name, data in extra.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode = len(data), 0o644
            with tempfile.TemporaryFile() as body:
                body.write(data)
                body.seek(0)
                tar.addfile(info, body)
    return dest
