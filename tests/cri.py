"""The kubelet's way to pull: the CRI image service of a node's containerd, over gRPC.

The kubelet pulls an image by calling ``runtime.v1.ImageService/PullImage`` on the runtime's
socket; containerd's CRI plugin then resolves and fetches it with the registry hosts of its
``registry.config_path`` (``hosts.toml``, mirror mode) or straight from the image's own host
(path mode). ``crictl pull`` makes the same call; Debian 12 has no ``crictl`` package, so
this module makes it itself, with grpcio.

The CRI messages used here carry only strings, repeated strings and sub-messages, so they
are written and read as the protocol-buffer wire format directly (field numbers from the CRI
API, ``k8s.io/cri-api/pkg/apis/runtime/v1/api.proto``), with no generated code:

* ``PullImageRequest {ImageSpec image = 1}`` → ``PullImageResponse {string image_ref = 1}``
* ``RemoveImageRequest {ImageSpec image = 1}`` → ``{}``
* ``ListImagesRequest {}`` → ``ListImagesResponse {repeated Image images = 1}``
* ``ImageSpec {string image = 1}``; ``Image {string id = 1; repeated string repo_tags = 2;
  repeated string repo_digests = 3}``
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc

_SERVICE = "/runtime.v1.ImageService/"
_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _image_spec(image: str) -> bytes:
    return _field(1, _field(1, image.encode()))


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes) -> Iterator[tuple[int, bytes | int]]:
    """(field number, value) of each field of a message: bytes if length-delimited."""
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(data, at)
            yield number, value
        elif wire == _LENGTH_DELIMITED:
            length, at = _read_varint(data, at)
            yield number, data[at : at + length]
            at += length
        elif wire in (1, 5):  # fixed 64 or 32 bits
            width = 8 if wire == 1 else 4
            yield number, int.from_bytes(data[at : at + width], "little")
            at += width
        else:
            raise ValueError(f"wire type {wire} in a CRI message")


def _strings(message: bytes, number: int) -> list[str]:
    return [v.decode() for n, v in _fields(message) if n == number and isinstance(v, bytes)]


@dataclass(frozen=True, slots=True)
class CriImage:
    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]


class CriError(Exception):
    """The CRI call failed: what containerd said, as the kubelet would report it."""


class ImageService:
    """``runtime.v1.ImageService`` on a containerd socket (``unix:///…/c.sock``)."""

    def __init__(self, socket_path: str) -> None:
        self._channel = grpc.aio.insecure_channel(f"unix://{socket_path}")

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: bytes, limit: float) -> bytes:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(
            _SERVICE + method
        )
        try:
            answer: bytes = await call(request, timeout=limit)
        except grpc.aio.AioRpcError as exc:
            raise CriError(f"{method}: {exc.code().name}: {exc.details()}") from None
        return answer

    async def pull(self, image: str, limit: float = 120.0) -> str:
        """PullImage, as the kubelet makes it: the image's ref (its config digest)."""
        answer = await self._call("PullImage", _image_spec(image), limit)
        return _strings(answer, 1)[0]

    async def remove(self, image: str) -> None:
        await self._call("RemoveImage", _image_spec(image), 30.0)

    async def images(self) -> list[CriImage]:
        answer = await self._call("ListImages", b"", 30.0)
        found = []
        for number, image in _fields(answer):
            if number == 1 and isinstance(image, bytes):
                found.append(
                    CriImage(
                        _strings(image, 1)[0],
                        tuple(_strings(image, 2)),
                        tuple(_strings(image, 3)),
                    )
                )
        return found
