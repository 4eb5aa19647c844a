"""The settings' value types: durations (``30s``, ``5m``), sizes (``20GiB``, ``500MB``) and
addresses to listen on (``0.0.0.0:7439``), each parsed from what a YAML file or a ``DETOUR_*``
variable holds, and refused with the form to write instead."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

_DURATION = re.compile(r"^\s*(?P<n>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(?P<n>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[KMGTP]i?B?|B)?\s*$", re.IGNORECASE)


def _parse_duration(value: Any) -> Any:
    """``30``, ``"30s"``, ``"5m"``, ``"1.5h"`` → seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("expected a duration such as 30s, 5m or 1h")
        return float(match["n"]) * _DURATION_UNITS[match["unit"] or "s"]
    return value


def _parse_size(value: Any) -> Any:
    """``20GiB``, ``500MB``, ``1048576`` → bytes (K/M/G are powers of 1000, Ki/Mi/Gi of 1024)."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError("expected a size such as 20GiB or 500MB")
        unit = (match["unit"] or "B").upper().rstrip("B") or "B"
        powers = "KMGTP"
        if unit == "B":
            factor = 1
        elif unit.endswith("I"):
            factor = 1024 ** (powers.index(unit[0]) + 1)
        else:
            factor = 1000 ** (powers.index(unit[0]) + 1)
        return int(float(match["n"]) * factor)
    return value


Duration = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]
ByteSize = Annotated[int, BeforeValidator(_parse_size), Field(gt=0)]
ByteSizeOrZero = Annotated[int, BeforeValidator(_parse_size), Field(ge=0)]
DurationOrZero = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)]


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port in {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _check_listen(value: str) -> str:
    """``host:port`` (``[::]:port`` for IPv6); a port alone or a URL is refused with the
    address to write instead, at config check rather than when the socket is opened."""
    text = value.strip()
    if text.isdigit():
        raise ValueError(
            f"a port alone; write 0.0.0.0:{text} (every address) or 127.0.0.1:{text} "
            "(this machine only)"
        )
    if "://" in text or "/" in text:
        address = text.partition("://")[2].split("/")[0] or "127.0.0.1:7439"
        raise ValueError(f"an address to listen on, not a URL; write {address}")
    split_host_port(text, 0)
    return text


Listen = Annotated[str, BeforeValidator(lambda v: _check_listen(str(v)))]
