"""What ``detour warm`` reads from the proxy, checked as it is parsed: image manifests and
indexes (each descriptor's media type, digest and size), digests, and the proxy's OCI error
bodies, turned into one line for the operator. Anything malformed is a :class:`WarmError`
naming where it was found."""

from __future__ import annotations

from typing import Any

from proxy.oci import Descriptor, ImageIndex, ImageManifest, PlatformSpec
from proxy.reference import Digest, parse_json


class WarmError(Exception):
    """One image could not be warmed; the message says why, for the operator."""


def _text(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise WarmError(f"{where}: missing or invalid {key!r}")
    return value


def _descriptor(obj: Any, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise WarmError(f"{where}: a descriptor is not an object")
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise WarmError(f"{where}: missing or invalid 'size'")
    desc: Descriptor = {
        "mediaType": _text(obj, "mediaType", where),
        "digest": _text(obj, "digest", where),
        "size": size,
    }
    plat = obj.get("platform")
    if isinstance(plat, dict):
        spec: PlatformSpec = {
            "os": str(plat.get("os", "")),
            "architecture": str(plat.get("architecture", "")),
        }
        if isinstance(plat.get("variant"), str):
            spec["variant"] = plat["variant"]
        desc["platform"] = spec
    urls = obj.get("urls")
    if isinstance(urls, list):
        desc["urls"] = [str(u) for u in urls]
    return desc


def _json_object(body: bytes, where: str) -> dict[str, Any]:
    try:
        doc = parse_json(body)
    except ValueError:
        raise WarmError(f"{where}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise WarmError(f"{where}: not a JSON object")
    return doc


def parse_image_manifest(body: bytes, where: str) -> ImageManifest:
    doc = _json_object(body, where)
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise WarmError(f"{where}: missing 'layers'")
    return {
        "schemaVersion": int(doc.get("schemaVersion", 2)),
        "config": _descriptor(doc.get("config"), f"{where} config"),
        "layers": [_descriptor(layer, f"{where} layer") for layer in layers],
    }


def parse_index(body: bytes, where: str) -> ImageIndex:
    doc = _json_object(body, where)
    children = doc.get("manifests")
    if not isinstance(children, list):
        raise WarmError(f"{where}: missing 'manifests'")
    return {
        "schemaVersion": int(doc.get("schemaVersion", 2)),
        "manifests": [_descriptor(child, f"{where} entry") for child in children],
    }


def parse_digest(text: str, where: str) -> Digest:
    try:
        return Digest.parse(text)
    except ValueError:
        raise WarmError(f"{where}: invalid or unsupported digest {text[:100]!r}") from None


def refusal(status: int, body: bytes) -> str:
    """The proxy's OCI error body, as one line: message, code, status, what was tried."""
    try:
        entry = parse_json(body)["errors"][0]
        code, message = str(entry["code"]), str(entry["message"])
    except (ValueError, KeyError, IndexError, TypeError):
        return f"HTTP {status}: {body[:200].decode('utf-8', 'replace').strip()}"
    text = f"{message} ({code}, HTTP {status})"
    detail = entry.get("detail")
    if isinstance(detail, dict):
        attempts = detail.get("attempts")
        if isinstance(attempts, list) and attempts:
            tried = ", ".join(
                f"{a.get('upstream')}: {a.get('error')}" for a in attempts if isinstance(a, dict)
            )
            text += f"; tried {tried}"
        elif isinstance(detail.get("upstream"), str):
            text += f"; upstream {detail['upstream']}"
    return text
