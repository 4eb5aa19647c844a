"""Push a tiny two-platform test image into a registry through its HTTP API (stdlib only).

The compose demo runs this once, in the detour image, to put an image where the demo's redirect
rule sends Docker Hub names (``docker.io/library/hello-detour`` →
``mirror:5000/docker-mirror/library/hello-detour``), so the demo works with no internet access.

The image is an OCI index for linux/amd64 and linux/arm64 (so ``docker pull`` works on either),
each a manifest with one layer holding ``/hello-detour.txt``. Its content is fixed, so every run
pushes byte-identical blobs and the same digests: running it again changes nothing.

Usage: python seed.py --registry mirror:5000 --repository docker-mirror/library/hello-detour
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
import time
from http.client import HTTPConnection, HTTPResponse
from urllib.parse import urlencode, urlsplit

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))
MESSAGE = b"Hello from Detour: this image came through the pull-through cache.\n"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


def layer() -> tuple[bytes, str]:
    """A reproducible gzip'd tar with one file; returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("hello-detour.txt")
        info.size, info.mode, info.mtime = len(MESSAGE), 0o644, 0
        tar.addfile(info, io.BytesIO(MESSAGE))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=9, mtime=0), digest_of(tar_bytes)


def build() -> tuple[list[bytes], list[bytes], bytes]:
    """(blobs, platform manifests, index): everything to push, in push order."""
    layer_blob, diff_id = layer()
    blobs, manifests, entries = [layer_blob], [], []
    for os_name, arch in PLATFORMS:
        config = json.dumps(
            {
                "architecture": arch,
                "os": os_name,
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created_by": "detour deploy/compose/seed.py"}],
            },
            sort_keys=True,
        ).encode()
        blobs.append(config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, config),
                "layers": [descriptor(OCI_LAYER, layer_blob)],
            },
            sort_keys=True,
        ).encode()
        manifests.append(manifest)
        entries.append(
            {
                **descriptor(OCI_MANIFEST, manifest),
                "platform": {"architecture": arch, "os": os_name},
            }
        )
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, sort_keys=True
    ).encode()
    return blobs, manifests, index


class Registry:
    """Just enough of the distribution API to push, over plain HTTP, without auth."""

    def __init__(self, host: str) -> None:
        self.host = host

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[HTTPResponse, bytes]:
        conn = HTTPConnection(self.host, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response, response.read()
        finally:
            conn.close()

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                response, _ = self.request("GET", "/v2/")
                if response.status in (200, 401):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"seed: registry {self.host} did not answer in {timeout:.0f}s")
            time.sleep(0.5)

    def push_blob(self, repository: str, data: bytes) -> None:
        digest = digest_of(data)
        response, _ = self.request("HEAD", f"/v2/{repository}/blobs/{digest}")
        if response.status == 200:
            return
        response, body = self.request("POST", f"/v2/{repository}/blobs/uploads/")
        if response.status != 202:
            raise SystemExit(f"seed: starting an upload: HTTP {response.status} {body[:300]!r}")
        location = urlsplit(response.headers["Location"])
        query = f"{location.query}&" if location.query else ""
        response, body = self.request(
            "PUT",
            f"{location.path}?{query}{urlencode({'digest': digest})}",
            body=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if response.status != 201:
            raise SystemExit(f"seed: uploading {digest}: HTTP {response.status} {body[:300]!r}")

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> None:
        response, body = self.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            body=data,
            headers={"Content-Type": media_type},
        )
        if response.status != 201:
            raise SystemExit(
                f"seed: putting manifest {reference}: HTTP {response.status} {body[:300]!r}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Push a tiny test image into a registry.")
    parser.add_argument("--registry", required=True, help="host:port, plain HTTP, no auth")
    parser.add_argument("--repository", required=True, help="e.g. docker-mirror/library/x")
    parser.add_argument("--tag", default="1.0")
    parser.add_argument("--timeout", type=float, default=60.0, help="wait for the registry")
    args = parser.parse_args(argv)

    registry = Registry(args.registry)
    registry.wait(args.timeout)
    blobs, manifests, index = build()
    for blob in blobs:
        registry.push_blob(args.repository, blob)
    for manifest in manifests:
        registry.put_manifest(args.repository, digest_of(manifest), manifest, OCI_MANIFEST)
    registry.put_manifest(args.repository, args.tag, index, OCI_INDEX)
    print(
        f"seeded {args.registry}/{args.repository}:{args.tag} ({digest_of(index)})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
