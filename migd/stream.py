"""The data pipeline: device -> encode -> seal -> wire, and back, with bounded memory.

Both sides work on a fixed set of pooled slots (``inflight`` of them), so
memory stays flat whatever the state size.  Device reads and writes happen on
one ordered I/O thread (the stream is ordered); compression and AEAD run on a
worker pool, which is where both cores earn their keep (zstandard and
cryptography release the GIL).  Frames go out in sequence order and chunks are
written to the destination device in index order.

Both sides fold every data frame's authenticated header and tag into a running
SHA-256 (the *stream digest*).  The end-of-stream record carries it with the
total length and chunk count; the destination commits only if all three match.
Because each tag authenticates its chunk under the session key, the digest
commits to every byte of the stream at the cost of hashing 52 bytes per chunk.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.base import Device

from .codec import Decoder, Encoder, Encoding
from .crypto import TAG_SIZE
from .endpoint import Endpoint
from .errors import (
    DeviceError,
    IncompleteStream,
    IntegrityError,
    MigdError,
    NoDataNow,
    OverAnnounced,
)
from .protocol.connection import Data
from .protocol.frames import HEADER_SIZE

log = logging.getLogger("migd.stream")

DEFAULT_INFLIGHT = 8
ACK_EVERY = 64 << 20


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
    acked: int = 0


class Workers:
    """The threads of one daemon: an ordered device-I/O thread and a codec pool."""

    def __init__(self, codec_threads: int = 2) -> None:
        self.io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="migd-io")
        self.codec = concurrent.futures.ThreadPoolExecutor(codec_threads,
                                                           thread_name_prefix="migd-codec")

    def shutdown(self) -> None:
        self.io.shutdown(wait=True, cancel_futures=True)
        self.codec.shutdown(wait=True, cancel_futures=True)


@dataclass(eq=False)
class _TxSlot:
    plain: bytearray
    wire: bytearray


class StreamSender:
    def __init__(self, ep: Endpoint, device: Device, encoder: Encoder, workers: Workers,
                 counters: Counters, inflight: int = DEFAULT_INFLIGHT) -> None:
        self.ep = ep
        self.device = device
        self.encoder = encoder
        self.workers = workers
        self.counters = counters
        self.chunk = ep.conn.max_chunk
        self.index = 0
        self.offset = 0
        self.announced = 0
        self.digest = hashlib.sha256()
        self._slots: asyncio.Queue[_TxSlot] = asyncio.Queue()
        for _ in range(inflight):
            self._slots.put_nowait(_TxSlot(bytearray(self.chunk),
                                           bytearray(HEADER_SIZE + self.chunk + TAG_SIZE)))
        self._queue: asyncio.Queue[tuple[int, asyncio.Future[memoryview], _TxSlot]] = (
            asyncio.Queue())
        self._loop = asyncio.get_running_loop()
        self._writer = self._loop.create_task(self._write_frames())
        self.downtime_phase = False

    async def announce(self, nbytes: int) -> None:
        """Raise what the destination will accept; it refuses anything beyond."""
        self.announced += nbytes
        await self.ep.send_control({"t": "announce", "bytes": nbytes})

    async def send(self, budget: int | None) -> int:
        """Stream device data: up to ``budget`` bytes (pre-copy) or to end of stream.

        Returns the bytes sent; stops early on "no data for now".
        """
        loop = self._loop
        sent = 0
        if budget is not None:
            await self.announce(budget)
        while budget is None or sent < budget:
            slot = await self._slots.get()
            self.ep.check()
            want = self.chunk if budget is None else min(self.chunk, budget - sent)
            if budget is None and self.offset + want > self.announced:
                await self.announce(max(want, self.device.stop_copy_size()))
            try:
                n = await loop.run_in_executor(self.workers.io, self.device.read_into,
                                               memoryview(slot.plain)[:want])
            except NoDataNow:
                n = 0
            if n == 0:
                self._slots.put_nowait(slot)
                break
            seq = self.ep.conn.reserve_seq()
            fut = loop.run_in_executor(self.workers.codec, self._seal, slot, n, seq, self.index,
                                       self.offset)
            self._queue.put_nowait((seq, fut, slot))
            self.index += 1
            self.offset += n
            sent += n
        await self._queue.join()
        self.ep.check()
        return sent

    def _seal(self, slot: _TxSlot, n: int, seq: int, index: int, offset: int) -> memoryview:
        plain = memoryview(slot.plain)[:n]
        encoding, payload = self.encoder.encode(plain)
        return self.ep.conn.seal_data_into(seq, index, offset, encoding, payload, n,
                                           memoryview(slot.wire))

    async def _write_frames(self) -> None:
        c = self.counters
        while True:
            seq, fut, slot = await self._queue.get()
            try:
                frame = await fut
                self.digest.update(frame[:HEADER_SIZE])
                self.digest.update(frame[-TAG_SIZE:])
                self.ep.conn.submit(seq, frame)
                await self.ep.flush()
                plain_len = int.from_bytes(frame[32:36], "little")
                encoding = frame[3]
                c.transferred += plain_len
                c.wire_bytes += len(frame)
                c.chunks += 1
                c.zero_chunks += encoding == Encoding.ZERO
                c.compressed_chunks += encoding == Encoding.ZSTD
                if self.downtime_phase:
                    c.downtime_bytes += plain_len
                else:
                    c.precopy_bytes += plain_len
            except MigdError as exc:
                self.ep.fail(exc)
            except Exception:  # a worker crashed: never leave the waiter hanging
                log.exception("send pipeline failed")
                self.ep.fail(MigdError("internal error in the send pipeline"))
            finally:
                self._slots.put_nowait(slot)
                self._queue.task_done()

    def end_record(self) -> dict[str, object]:
        return {"t": "end", "bytes": self.offset, "chunks": self.index,
                "digest": self.digest.digest()}

    async def close(self) -> None:
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)


@dataclass(eq=False)
class _RxSlot:
    payload: bytearray
    plain: bytearray


@dataclass
class _Scratch(threading.local):
    buf: bytearray = field(default_factory=bytearray)


class StreamReceiver:
    """Destination side: validates arrival order and allowance, decodes, loads in order."""

    def __init__(self, ep: Endpoint, device: Device, workers: Workers, counters: Counters,
                 max_chunk: int, limit_bytes: int, inflight: int = DEFAULT_INFLIGHT) -> None:
        self.ep = ep
        self.device = device
        self.workers = workers
        self.counters = counters
        self.limit_bytes = limit_bytes
        self.decoder = Decoder()
        self.announced = 0
        self.next_index = 0
        self.arrived = 0
        self.written = 0
        self.digest = hashlib.sha256()
        self.initial_target: int | None = None
        self.on_initial_loaded: Callable[[], None] | None = None
        self._free = collections.deque(
            _RxSlot(bytearray(max_chunk + TAG_SIZE), bytearray(max_chunk)) for _ in range(inflight)
        )
        self._by_payload: dict[int, _RxSlot] = {id(s.payload): s for s in self._free}
        self._scratch = _Scratch()
        self._max_chunk = max_chunk
        self._queue: asyncio.Queue[tuple[asyncio.Future[int], _RxSlot, int]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._writer = self._loop.create_task(self._write_chunks())
        self._next_ack = ACK_EVERY

    # --- hooks for Connection and Endpoint -----------------------------------------

    def take_buffer(self, size: int) -> bytearray | None:
        """Connection asks for a payload buffer; None applies back-pressure."""
        return self._free.popleft().payload if self._free else None

    def announce(self, msg: dict[str, object]) -> None:
        n = msg.get("bytes")
        if not isinstance(n, int) or n < 0:
            raise IntegrityError("announce: bad byte count")
        if self.announced + n > self.limit_bytes:
            raise OverAnnounced(
                f"source announced {self.announced + n} bytes, more than the {self.limit_bytes} "
                "this destination accepts for the device"
            )
        self.announced += n

    def on_data(self, ev: Data) -> None:
        h = ev.header
        slot = self._by_payload[id(ev.buf)]
        if h.index != self.next_index or h.offset != self.arrived:
            self._free.append(slot)
            raise IntegrityError(
                f"chunk {h.index} at offset {h.offset} where chunk {self.next_index} at "
                f"{self.arrived} was due"
            )
        if self.arrived + h.plain_len > self.announced:
            self._free.append(slot)
            raise OverAnnounced(
                f"chunk {h.index} goes past the {self.announced} bytes the source announced"
            )
        self.next_index += 1
        self.arrived += h.plain_len
        self.digest.update(h.pack())
        self.digest.update(memoryview(ev.buf)[h.payload_len - TAG_SIZE : h.payload_len])
        c = self.counters
        c.wire_bytes += HEADER_SIZE + h.payload_len
        c.chunks += 1
        fut = self._loop.run_in_executor(self.workers.codec, self._open, ev, slot)
        self._queue.put_nowait((fut, slot, h.plain_len))

    # --- worker side -----------------------------------------------------------------

    def _open(self, ev: Data, slot: _RxSlot) -> int:
        h = ev.header
        out = memoryview(slot.plain)[: h.plain_len]
        if h.encoding not in (Encoding.RAW, Encoding.ZERO, Encoding.ZSTD):
            raise IntegrityError(f"chunk {h.index} has unknown encoding {h.encoding}")
        if h.encoding == Encoding.ZSTD:
            scratch = self._scratch.buf
            if len(scratch) < self._max_chunk:
                scratch = self._scratch.buf = bytearray(self._max_chunk)
            n = self.ep.conn.open_data_into(ev, memoryview(scratch)[: h.payload_len - TAG_SIZE])
            self.decoder.decode_into(h.encoding, memoryview(scratch)[:n], out)
        elif h.encoding == Encoding.RAW:
            n = self.ep.conn.open_data_into(ev, out)
            if n != h.plain_len:
                raise IntegrityError(f"raw chunk {h.index} is {n} bytes, header says {h.plain_len}")
        else:
            if h.payload_len != TAG_SIZE:
                raise IntegrityError(f"zero chunk {h.index} carries a payload")
            self.ep.conn.open_data_into(ev, memoryview(slot.plain)[:0])
            self.decoder.decode_into(h.encoding, memoryview(b""), out)
        return h.plain_len

    def _load(self, data: memoryview) -> None:
        while data:
            n = self.device.write(data)
            if n <= 0:
                raise DeviceError("device accepted no data")
            data = data[n:]

    async def _write_chunks(self) -> None:
        c = self.counters
        while True:
            fut, slot, plain_len = await self._queue.get()
            try:
                await fut
                await self._loop.run_in_executor(self.workers.io, self._load,
                                                 memoryview(slot.plain)[:plain_len])
                self.written += plain_len
                c.transferred = self.written
                if self.written >= self._next_ack:
                    self._next_ack = self.written + ACK_EVERY
                    await self.ep.send_control({"t": "ack", "offset": self.written})
                if self.initial_target is not None and self.written >= self.initial_target:
                    self.initial_target = None
                    await self.ep.send_control({"t": "initial-loaded", "offset": self.written})
            except MigdError as exc:
                self.ep.fail(exc)
            except Exception:
                log.exception("load pipeline failed")
                self.ep.fail(MigdError("internal error in the load pipeline"))
            finally:
                self._free.append(slot)
                self._queue.task_done()
                self.ep.unblock()
                self.ep.poke()

    def initial_sent(self, msg: dict[str, object]) -> None:
        off = msg.get("offset")
        if not isinstance(off, int) or off < 0 or off > self.announced:
            raise IntegrityError("initial-sent: bad offset")
        if self.written >= off:
            self.initial_target = None
            self._loop.create_task(self.ep.send_control({"t": "initial-loaded", "offset": off}))
        else:
            self.initial_target = off

    async def finish(self, end: dict[str, object], timeout: float) -> None:
        """Wait for every chunk to be loaded, then check the end-of-stream record."""
        total, chunks, digest = end.get("bytes"), end.get("chunks"), end.get("digest")
        if not isinstance(total, int) or not isinstance(chunks, int) or not isinstance(digest, bytes):
            raise IncompleteStream("end-of-stream record is malformed")
        if total != self.arrived or chunks != self.next_index:
            raise IncompleteStream(
                f"source sent {total} bytes in {chunks} chunks, {self.arrived} bytes in "
                f"{self.next_index} chunks arrived"
            )
        await self.ep.wait_until(lambda: self.written == self.arrived, timeout,
                                 "the device to load the stream")
        if digest != self.digest.digest():
            raise IntegrityError("stream digest mismatch: what arrived is not what was sent")

    async def close(self) -> None:
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
