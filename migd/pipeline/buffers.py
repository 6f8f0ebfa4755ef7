"""The pipeline's memory: pooled buffers reused from one migration to the next
(the bank, bounded by the daemon's budget), the worker threads, and how much a
migration's sender and receiver need (what admission reserves)."""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass

from ..protocol.digest import sealed_size
from ..protocol.frames import HEADER_SIZE

DEFAULT_INFLIGHT = 8
#: The destination acknowledges its loaded position every this many chunks (the
#: source asks; a resumed stream starts there).  A source that keeps its chunks in a
#: pool of buffers asks often; one whose device lends its memory keeps views, which
#: cost nothing, and asks rarely: each acknowledgement costs both sides a control
#: message.  With ``auto`` compression once per window of 16 chunks: acknowledgements
#: time each window's delivery (every 4 or 8 cost 10-15 % of a fast link's throughput).
ACK_AUTO = 16
ACK_OFTEN = 12
ACK_RARELY = 64


@dataclass
class Counters:
    """Stream counters, named as QEMU's query-migrate names them."""

    transferred: int = 0  # state bytes moved
    wire_bytes: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    chunks: int = 0
    zero_chunks: int = 0
    compressed_chunks: int = 0
    sparse_chunks: int = 0
    auto_windows: int = 0  # --compress auto: windows decided ...
    auto_compressed_windows: int = 0  # ... and how many of them chose to compress
    acked: int = 0
    resent_bytes: int = 0  # sent again after a resume


class BufferBank:
    """Pre-faulted buffer sets owned by the daemon and reused by every migration.

    Fresh pages are expensive on first touch here; a migration that allocated
    its buffers would pay that on every run.  What it keeps free is bounded by
    ``limit`` (with what is given out): a burst of migrations does not leave its
    peak behind for good.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        #: Bytes given out and not back yet, and bytes kept free.
        self.out = 0
        self.free = 0
        self._free: dict[tuple[int, ...], list[list[bytearray]]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _fresh(sizes: tuple[int, ...]) -> list[bytearray]:
        out = []
        for n in sizes:
            buf = bytearray(n)
            buf[0:n:4096] = bytes(len(range(0, n, 4096)))  # touch every page now
            out.append(buf)
        return out

    def take(self, sizes: tuple[int, ...]) -> list[bytearray]:
        n = sum(sizes)
        with self._lock:
            self.out += n
            free = self._free.get(sizes)
            if free:
                self.free -= n
                return free.pop()
        return self._fresh(sizes)

    def give(self, sizes: tuple[int, ...], bufs: list[bytearray]) -> None:
        n = sum(sizes)
        with self._lock:
            self.out -= n
            self._keep(sizes, bufs, n)

    def _keep(self, sizes: tuple[int, ...], bufs: list[bytearray], n: int) -> None:
        if self.limit is None or self.out + self.free + n <= self.limit:
            self._free.setdefault(sizes, []).append(bufs)
            self.free += n

    def prewarm(self, sizes: tuple[int, ...]) -> None:
        bufs = self._fresh(sizes)
        with self._lock:
            self._keep(sizes, bufs, sum(sizes))


class Workers:
    """The threads and buffers of one daemon: an ordered device-I/O thread for
    backends whose I/O may block, a codec pool for compression, and the bank."""

    def __init__(self, codec_threads: int = 2, bank_limit: int | None = None) -> None:
        self.io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="migd-io")
        self.codec = concurrent.futures.ThreadPoolExecutor(codec_threads,
                                                           thread_name_prefix="migd-codec")
        self.codec_threads = codec_threads
        self.bank = BufferBank(bank_limit)

    def shutdown(self) -> None:
        self.io.shutdown(wait=True, cancel_futures=True)
        self.codec.shutdown(wait=True, cancel_futures=True)


def tx_sizes(chunk: int, inflight: int) -> tuple[int, ...]:
    return (chunk, HEADER_SIZE + sealed_size(chunk)) * inflight


def rx_sizes(chunk: int, inflight: int) -> tuple[int, ...]:
    return (sealed_size(chunk), chunk) * inflight


def rx_slots(inflight: int, channels: int) -> int:
    """Receive slots per channel: every channel keeps at least two in flight."""
    return max(2, inflight // channels)


def sender_buffers(chunk: int, inflight: int = DEFAULT_INFLIGHT, keep: bool = True) -> int:
    """The most bytes of the bank one device's sender holds (``keep``: with the
    chunks kept for a resume), what admission reserves for it."""
    return sum(tx_sizes(chunk, inflight)) + ((inflight + 2 * ACK_OFTEN) * chunk if keep else 0)


def receiver_buffers(chunk: int, channels: int, inflight: int = DEFAULT_INFLIGHT) -> int:
    return sum(rx_sizes(chunk, rx_slots(inflight, channels) * channels))
