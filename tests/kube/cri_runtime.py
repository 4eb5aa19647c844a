"""The node's pod sandboxes through CRI's ``runtime.v1.RuntimeService``: listed, stopped and
removed at the end, so containerd takes down the pods' containers, CNI set-up and network
namespaces itself rather than leaving them behind.

Wire format as in :mod:`tests.cri` (Debian has no ``crictl``):

* ``ListPodSandboxRequest {}`` -> ``ListPodSandboxResponse {repeated PodSandbox items = 1}``,
  ``PodSandbox {string id = 1; ...}``
* ``StopPodSandboxRequest`` / ``RemovePodSandboxRequest {string pod_sandbox_id = 1}`` -> ``{}``
"""

from __future__ import annotations

from pathlib import Path

import grpc

from tests.cri import _field, _fields, _strings

_SERVICE = "/runtime.v1.RuntimeService/"


class RuntimeClient:
    """A blocking client of the runtime service on ``socket``; a context manager."""

    def __init__(self, socket: Path) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket}")

    def __enter__(self) -> RuntimeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def _call(self, method: str, request: bytes, limit: float = 60.0) -> bytes:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(
            _SERVICE + method
        )
        answer: bytes = call(request, timeout=limit)
        return answer

    def sandboxes(self) -> list[str]:
        answer = self._call("ListPodSandbox", b"")
        return [
            _strings(item, 1)[0]
            for number, item in _fields(answer)
            if number == 1 and isinstance(item, bytes)
        ]

    def stop_sandbox(self, sandbox: str) -> None:
        self._call("StopPodSandbox", _field(1, sandbox.encode()))

    def remove_sandbox(self, sandbox: str) -> None:
        self._call("RemovePodSandbox", _field(1, sandbox.encode()))
