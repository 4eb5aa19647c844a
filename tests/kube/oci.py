"""Images for the node, built without a Docker engine and pushed to the test registry.

* :func:`push_pause`: the pod sandbox image, one layer holding Debian's static busybox
  (``busybox-static``), its entrypoint ``busybox sleep`` for ever; also the Deployments' image.
* :func:`push_detour`: Detour as the Dockerfile builds it, from a debootstrap root
  (:func:`tests.rootfs.debian_root`, python3) and a second layer with Detour and its
  dependencies installed by pip (``--target``), entrypoint ``python3 -m proxy``.

Each layer is a gzip'd tar with its diff_id in the config, pushed with :mod:`tests.images`.
The root's layer is kept beside the root in the test cache (it takes seconds to compress).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.images import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    Blob,
    PushedImage,
    make_layer,
    sha256_digest,
)
from tests.images import upload_image as upload
from tests.registry import Registry
from tests.support import ROOT

BUSYBOX = Path("/bin/busybox")
SLEEP_FOR_EVER = ["/bin/busybox", "sleep", "2147483647"]
ROOT_PACKAGES = ("python3", "python3-venv")
# The node's sandbox image (containerd's sandbox_image), pushed to the mirror at the start.
PAUSE_REPO = "k8s/pause"
PAUSE_TAG = "3.10"


def _layer(fill: Callable[[tarfile.TarFile], None]) -> Blob:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        fill(tar)
    data = raw.getvalue()
    packed = gzip.compress(data, compresslevel=1, mtime=0)
    return Blob(sha256_digest(packed), packed, OCI_LAYER, diff_id=sha256_digest(data))


def _image(
    repo: str,
    tag: str,
    layers: Sequence[Blob],
    entrypoint: Sequence[str],
    env: Sequence[str] = (),
) -> PushedImage:
    config_doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": list(entrypoint), "Env": ["PATH=/usr/bin:/bin", *env]},
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in layers]},
    }
    config_bytes = json.dumps(config_doc).encode()
    config = Blob(sha256_digest(config_bytes), config_bytes, OCI_CONFIG)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [b.descriptor() for b in layers],
        }
    ).encode()
    return PushedImage(
        repo,
        tag,
        manifest,
        sha256_digest(manifest),
        OCI_MANIFEST,
        config,
        tuple(layers),
        ("linux", "amd64"),
    )


def _busybox_layer() -> Blob:
    def fill(tar: tarfile.TarFile) -> None:
        for folder in ("bin", "tmp"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if folder == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in ("sh", "sleep", "cat", "wget"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)

    return _layer(fill)


def push_pause(registry: Registry, repo: str, tag: str) -> PushedImage:
    """busybox that sleeps (a pause container, or a pod that just runs) as ``repo:tag``."""
    image = _image(repo, tag, [_busybox_layer()], SLEEP_FOR_EVER)
    upload(registry, image)
    return image


def push_app(registry: Registry, repo: str, tag: str) -> PushedImage:
    """busybox that sleeps, and a layer of random bytes of its own: a new image every call."""
    image = _image(repo, tag, [_busybox_layer(), make_layer(64 * 1024)], SLEEP_FOR_EVER)
    upload(registry, image)
    return image


def _root_layer(root: Path) -> Blob:
    """The debootstrap root as a layer, cached beside it (keyed by the root's own key)."""
    cached = root.parent / f"{root.name}.layer.tar.gz"
    diff = root.parent / f"{root.name}.layer.diff_id"
    if cached.is_file() and diff.is_file():
        data = cached.read_bytes()
        return Blob(sha256_digest(data), data, OCI_LAYER, diff_id=diff.read_text().strip())

    def fill(tar: tarfile.TarFile) -> None:
        def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            return None if info.name == ".complete" else info

        for entry in sorted(root.iterdir()):
            tar.add(entry, arcname=entry.name, filter=keep)

    blob = _layer(fill)
    fd, name = tempfile.mkstemp(dir=root.parent, prefix=f".{root.name}.layer-")
    with os.fdopen(fd, "wb") as out:
        out.write(blob.data)
    os.replace(name, cached)
    assert blob.diff_id is not None
    diff.write_text(blob.diff_id)
    return blob


def _detour_layer(work: Path) -> Blob:
    """Detour and its dependencies, installed by pip into /opt/detour (PYTHONPATH)."""
    target = work / "opt" / "detour"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "-q", "--no-compile",
            "--disable-pip-version-check", "--target", str(target), str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )  # fmt: skip
    shutil.rmtree(target / "bin", ignore_errors=True)

    def fill(tar: tarfile.TarFile) -> None:
        tar.add(work / "opt", arcname="opt")

    return _layer(fill)


def push_detour(registry: Registry, repo: str, tag: str) -> PushedImage:
    """Detour's image, as ``repo:tag``; its entrypoint is ``detour``'s, so the manifests'
    ``args`` (``serve --config ...``, ``webhook --config ...``) run as they would."""
    from tests.rootfs import debian_root  # issue 25's builder, shared with the compose tests

    root = debian_root(ROOT_PACKAGES)
    with tempfile.TemporaryDirectory(prefix="detour-image-") as work:
        layers = [_root_layer(root), _detour_layer(Path(work))]
    image = _image(
        repo,
        tag,
        layers,
        ["/usr/bin/python3", "-m", "proxy"],
        env=["PYTHONPATH=/opt/detour", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"],
    )
    upload(registry, image)
    return image
