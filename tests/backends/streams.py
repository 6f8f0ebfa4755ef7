"""Reading a device's saving stream in tests."""

from __future__ import annotations

from backends.base import Device
from migd.errors import NoDataNow


def drain(dev: Device, limit: int | None = None, bufsize: int = 1 << 20) -> bytes:
    """Read until "no data for now" or the end (or ``limit`` bytes, roughly)."""
    out = bytearray()
    buf = bytearray(bufsize)
    while limit is None or len(out) < limit:
        try:
            n = dev.read_into(memoryview(buf))
        except NoDataNow:
            break
        if n == 0:
            break
        out += buf[:n]
    return bytes(out)
