"""A pair of in-memory channels: the transport interface with nothing under it, so
that the pipeline's halves can be tested alone (no sockets, no daemons)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from migd.errors import LinkLost
from transports.base import Channel, Receiver


class MemoryChannel(Channel):
    transport = "memory"

    def __init__(self, name: str, window: int = 1 << 20) -> None:
        self.peer = name
        self.other: MemoryChannel | None = None
        self._rx: Receiver | None = None
        self._pending = bytearray()
        self._paused = False
        self._closed = False
        self._window = window  # bytes in flight before a sender waits (a socket buffer)
        self._drained = asyncio.Event()
        self._drained.set()
        #: Every byte this end sent, in order (for tests that look at the wire).
        self.sent = bytearray()

    async def send(self, frames: Sequence[bytes | bytearray | memoryview]) -> None:
        data = b"".join(bytes(f) for f in frames)
        other = self.other
        if self._closed or other is None or other._closed:
            raise LinkLost(f"{self.peer}: the memory channel is closed")
        self.sent += data
        other._pending += data
        asyncio.get_running_loop().call_soon(other._pump)
        while len(other._pending) > self._window and not other._closed:
            other._drained.clear()
            await other._drained.wait()

    def _pump(self) -> None:
        rx = self._rx
        while self._pending and rx is not None and not self._paused and not self._closed:
            try:
                buf = rx.get_buffer()
                n = min(len(buf), len(self._pending))
                buf[:n] = self._pending[:n]
                del self._pending[:n]
                rx.buffer_updated(n)
            except Exception as exc:  # as a real transport: the receiver's error ends it
                self._fail(exc)
                return
        if len(self._pending) <= self._window:
            self._drained.set()

    def start(self, receiver: Receiver) -> None:
        self._rx = receiver
        asyncio.get_running_loop().call_soon(self._pump)

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        asyncio.get_running_loop().call_soon(self._pump)

    def close(self) -> None:
        self._fail(None)

    def _fail(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._drained.set()
        if self._rx is not None:
            self._rx.connection_lost(exc)
        other = self.other
        if other is not None and not other._closed and other._rx is not None:
            try:
                other._rx.eof_received()
            except Exception as err:  # e.g. closed in the middle of a frame
                other._fail(err)


def channel_pair(window: int = 1 << 20) -> tuple[MemoryChannel, MemoryChannel]:
    a, b = MemoryChannel("source-end", window), MemoryChannel("destination-end", window)
    a.other, b.other = b, a
    return a, b
