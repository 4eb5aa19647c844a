"""Platforms (``os/architecture[/variant]``): the one ``detour warm --platform`` asks for, this
machine's own, and which children of a multi-platform index match it."""

from __future__ import annotations

import platform as _host
from dataclasses import dataclass

from proxy.oci import Descriptor, PlatformSpec

# platform.machine() → the OCI architecture and variant.
_MACHINES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
}


@dataclass(frozen=True, slots=True)
class Platform:
    """``os/architecture[/variant]``, as ``--platform`` takes it."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise ValueError(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        """This machine's own: ``linux/amd64`` on x86_64, ``linux/arm64`` on aarch64."""
        machine = _host.machine().lower()
        architecture, variant = _MACHINES.get(machine, (machine, None))
        return cls("linux", architecture, variant)

    @classmethod
    def of(cls, spec: PlatformSpec) -> Platform:
        return cls(spec["os"].lower(), spec["architecture"].lower(), spec.get("variant"))

    def _variant(self) -> str | None:
        # arm64 images usually leave out the variant, which then means v8.
        if self.architecture == "arm64" and self.variant is None:
            return "v8"
        return self.variant

    def matches(self, other: Platform) -> bool:
        """Whether ``other`` (a child's platform) is what this (the wanted one) asks for.

        Without a variant here, any variant of the architecture matches.
        """
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return self.variant is None or self._variant() == other._variant()

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def describe_platform(desc: Descriptor) -> str:
    """An index child's platform as ``os/arch[/variant]``, for the operator."""
    spec = desc.get("platform")
    return str(Platform.of(spec)) if spec is not None else "no platform"
