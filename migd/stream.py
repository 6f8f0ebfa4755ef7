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
from dataclasses import dataclass, field

from backends.base import Device
from transports.base import Credit, Placement

from .codec import Decoder, Encoder, Encoding, bitmap_len, sparse_runs, zero_view
from .crypto import TAG_SIZE, Opener
from .endpoint import Bus, Endpoint
from .errors import (
    DecompressionError,
    DeviceError,
    IncompleteStream,
    IntegrityError,
    MigdError,
    NoDataNow,
    OverAnnounced,
)
from .pacing import AutoPolicy, TokenBucket, Window
from .protocol.connection import Data
from .protocol.frames import HEADER_SIZE, Header

log = logging.getLogger("migd.stream")

DEFAULT_INFLIGHT = 8
_DIRECT = (Encoding.RAW, Encoding.SPARSE)
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
    sparse_chunks: int = 0
    auto_windows: int = 0  # --compress auto: windows decided ...
    auto_compressed_windows: int = 0  # ... and how many of them chose to compress
    acked: int = 0


class BufferBank:
    """Pre-faulted buffer sets owned by the daemon and reused by every migration.

    Fresh pages are expensive on first touch here; a migration that allocated
    its buffers would pay that on every run.
    """

    def __init__(self) -> None:
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
        with self._lock:
            free = self._free.get(sizes)
            if free:
                return free.pop()
        return self._fresh(sizes)

    def give(self, sizes: tuple[int, ...], bufs: list[bytearray]) -> None:
        with self._lock:
            self._free.setdefault(sizes, []).append(bufs)

    def prewarm(self, sizes: tuple[int, ...]) -> None:
        self.give(sizes, self._fresh(sizes))


class Workers:
    """The threads and buffers of one daemon: an ordered device-I/O thread for
    backends whose I/O may block, a codec pool for compression, and the bank."""

    def __init__(self, codec_threads: int = 2) -> None:
        self.io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="migd-io")
        self.codec = concurrent.futures.ThreadPoolExecutor(codec_threads,
                                                           thread_name_prefix="migd-codec")
        self.bank = BufferBank()

    def shutdown(self) -> None:
        self.io.shutdown(wait=True, cancel_futures=True)
        self.codec.shutdown(wait=True, cancel_futures=True)


def tx_sizes(chunk: int, inflight: int) -> tuple[int, ...]:
    return (chunk, HEADER_SIZE + chunk + TAG_SIZE) * inflight


def rx_sizes(chunk: int, inflight: int) -> tuple[int, ...]:
    return (chunk + TAG_SIZE, chunk) * inflight


@dataclass(eq=False)
class _TxSlot:
    plain: bytearray
    wire: bytearray


@dataclass(eq=False, slots=True)
class _Sealed:
    """One sealed DATA frame, ready to go."""

    header: memoryview
    payload: memoryview  # ciphertext and tag
    encoding: int
    plain_len: int
    credit: Credit | None  # one-sided: the destination buffer it goes to
    in_place: bool  # the payload already lies in that buffer
    frame: memoryview | None = None  # header and payload contiguous (stream transports)


class StreamSender:
    """Source side.  Chunk ``i`` travels on channel ``i mod N``, so the destination
    can check each channel's indices exactly.

    AEAD alone costs ~0.1 ms per MiB, less than a thread hop, so a chunk that is
    not compressed is sealed inline (when nothing is queued ahead of it); zstd
    goes to the codec pool and an ordered writer sends its frames.  With
    ``auto`` compression an :class:`~migd.pacing.AutoPolicy` decides per window
    of chunks; ``max_bandwidth`` paces wire bytes with a token bucket."""

    WINDOW = 16  # chunks per auto-compression decision
    PROBE_EVERY = 4  # raw windows compress one chunk every this many, to keep measuring

    def __init__(self, channels: list[Endpoint], device: Device, encoder: Encoder,
                 workers: Workers, counters: Counters, inflight: int = DEFAULT_INFLIGHT,
                 max_bandwidth: int = 0, timeout: float = 30.0) -> None:
        self.channels = channels
        self.control = channels[0]
        self.device = device
        self.encoder = encoder
        #: Every payload is a store into the destination's memory: a copy, not link time.
        self.local = all(e.channel.placement is not None and e.channel.placement.maps_remote
                         for e in channels)
        if self.local:
            encoder.sparse = False
        self.workers = workers
        self.counters = counters
        self.chunk = self.control.conn.max_chunk
        #: Seconds of peer silence after which a wait fails (the migration's timeout).
        self.timeout = timeout
        self.index = 0
        self.offset = 0
        self.announced = 0
        self.acked_announced = 0
        self.digest = hashlib.sha256()
        self._sizes = tx_sizes(self.chunk, inflight)
        self._bufs = workers.bank.take(self._sizes)
        self._slots: asyncio.Queue[_TxSlot] = asyncio.Queue()
        for i in range(0, len(self._bufs), 2):
            self._slots.put_nowait(_TxSlot(self._bufs[i], self._bufs[i + 1]))
        self._queue: asyncio.Queue[tuple[Endpoint, int, asyncio.Future[_Sealed], _TxSlot]] = (
            asyncio.Queue())
        self._queued = 0  # frames handed to the writer and not yet sent
        self._loop = asyncio.get_running_loop()
        self._writer = self._loop.create_task(self._write_frames())
        self.control.handlers["announced"] = self._on_announced
        self.downtime_phase = False
        # ``auto`` over shared memory without a cap: compressing to save a memory copy is
        # never faster, so it does not even probe.
        self.auto = (AutoPolicy(threads=2, cap=max_bandwidth or None)
                     if encoder.mode.name == "auto" and (max_bandwidth or not self.local)
                     else None)
        self.bucket = TokenBucket(max_bandwidth, self._loop.time()) if max_bandwidth else None
        self._paced = 0.0
        self._win_start = self._loop.time()
        self._win_chunks = self._win_state = self._win_wire = 0
        self._win_waited = self._waited()

    def _on_announced(self, msg: dict[str, object]) -> None:
        n = msg.get("bytes")
        if isinstance(n, int):
            self.acked_announced = max(self.acked_announced, n)

    async def announce(self, nbytes: int) -> None:
        """Raise what the destination will accept, and wait until it has: data on
        other channels may overtake the announcement otherwise."""
        self.announced += nbytes
        await self.control.send_control({"t": "announce", "bytes": nbytes})
        target = self.announced
        await self.control.bus.wait_until(lambda: self.acked_announced >= target, self.timeout,
                                          "the destination to accept the announcement")

    async def _read(self, buf: memoryview, lend: bool) -> memoryview:
        """The next up to ``len(buf)`` bytes of the device's stream: lent by the
        device when ``lend`` and it can (no copy), else read into ``buf``.
        Empty: nothing for now, or the end."""
        try:
            if lend:
                views = self.device.read_views(len(buf))
                if views is not None:
                    if len(views) == 1:
                        return views[0]
                    n = 0  # a record boundary: the encoder wants one buffer
                    for v in views:
                        buf[n : n + len(v)] = v
                        n += len(v)
                    return buf[:n]
            if self.device.blocking_io:
                n = await self._loop.run_in_executor(self.workers.io, self.device.read_into, buf)
            else:
                n = self.device.read_into(buf)
            return buf[:n]
        except NoDataNow:
            return buf[:0]

    def _compress_next(self) -> bool:
        mode = self.encoder.mode.name
        if mode != "auto":
            return mode == "zstd"
        if self.auto is None:
            return False
        if self.auto.compress:
            return True
        # One probe chunk now and then keeps the compressor's speed and ratio measured,
        # while they matter.  By index: the window counters only move when frames are sent.
        return self.auto.wants_probe() and self.index % (self.WINDOW * self.PROBE_EVERY) == 0

    async def send(self, budget: int | None) -> int:
        """Stream device data: up to ``budget`` bytes (pre-copy) or to end of stream.

        Returns the bytes sent; stops early on "no data for now".
        """
        if budget is not None:
            await self.announce(budget)
        sent = 0
        while budget is None or sent < budget:
            slot = await self._slots.get()
            self.control.check()
            want = self.chunk if budget is None else min(self.chunk, budget - sent)
            if budget is None and self.offset + want > self.announced:
                await self.announce(max(want, self.device.stop_copy_size()))
            ep = self.channels[self.index % len(self.channels)]
            placement = ep.channel.placement
            credit = target = None
            if placement is not None:
                # One-sided: the payload goes into a buffer the destination posted,
                # filled right there when its memory is mapped here.
                try:
                    credit = await placement.credit()
                except BaseException:
                    self._slots.put_nowait(slot)
                    raise
                target = placement.view(credit)
            compress = self._compress_next()
            # Over shared memory the device's bytes go straight into the destination's
            # buffer; otherwise they are sealed from wherever the device keeps them.
            into = target if target is not None and not compress else memoryview(slot.plain)
            plain = await self._read(into[:want], lend=into is not target)
            n = len(plain)
            if n == 0:
                if placement is not None and credit is not None:
                    placement.unused(credit)
                self._slots.put_nowait(slot)
                break
            seq = ep.conn.reserve_seq()
            args = (ep, slot, plain, seq, self.index, self.offset, credit, target)
            if compress:
                self._hand_to_writer(ep, seq, self._loop.run_in_executor(
                    self.workers.codec, self._seal, *args, True), slot)
            elif self._queued == 0:  # nothing ahead of it: seal and send it right here
                try:
                    await self._emit(ep, seq, self._seal(*args, False))
                finally:
                    self._slots.put_nowait(slot)
            else:
                done: asyncio.Future[_Sealed] = self._loop.create_future()
                done.set_result(self._seal(*args, False))
                self._hand_to_writer(ep, seq, done, slot)
            self.index += 1
            self.offset += n
            sent += n
        await self._queue.join()
        self.control.check()
        return sent

    def _hand_to_writer(self, ep: Endpoint, seq: int, fut: asyncio.Future[_Sealed],
                        slot: _TxSlot) -> None:
        self._queued += 1
        self._queue.put_nowait((ep, seq, fut, slot))

    def _seal(self, ep: Endpoint, slot: _TxSlot, plain: memoryview, seq: int, index: int,
              offset: int, credit: Credit | None, target: memoryview | None,
              compress: bool) -> _Sealed:
        # Pieces only into our own buffer: it has room past the payload for the cipher.
        encoding, payload = self.encoder.encode(plain, compress,
                                                pieces=target is None and ep.conn.seals_pieces)
        wire = memoryview(slot.wire)
        header = wire[:HEADER_SIZE]
        sealed = ep.conn.seal_data_into(seq, index, offset, encoding, payload, len(plain), header,
                                        target if target is not None else wire[HEADER_SIZE:])
        if credit is None:  # header and payload side by side: one buffer on the stream
            return _Sealed(header, sealed, encoding, len(plain), None, False,
                           wire[:HEADER_SIZE + len(sealed)])
        return _Sealed(header, sealed, encoding, len(plain), credit, target is not None)

    def _waited(self) -> float:
        return sum(e.channel.waited for e in self.channels) + self._paced

    async def _emit(self, ep: Endpoint, seq: int, sealed: _Sealed) -> None:
        """Pace, send (in sequence order) and account for one sealed frame."""
        if self.bucket is not None:
            delay = self.bucket.delay(HEADER_SIZE + len(sealed.payload), self._loop.time())
            if delay:
                self._paced += delay
                await asyncio.sleep(delay)
        placement = ep.channel.placement
        if sealed.frame is not None:
            ep.conn.submit(seq, sealed.frame)
            await ep.flush()
        else:
            assert placement is not None and sealed.credit is not None
            # The payload lands before the header that points the receiver at it.
            written = placement.write(sealed.credit, None if sealed.in_place else sealed.payload,
                                      len(sealed.payload))
            ep.conn.submit(seq, sealed.header)
            try:
                await ep.flush()
            finally:
                if not written.done():  # (a done one costs no trip through the loop)
                    await asyncio.wait([written])
            written.result()
        self._count(sealed)

    def _count(self, sealed: _Sealed) -> None:
        header, payload = sealed.header, sealed.payload
        self.digest.update(header)
        self.digest.update(payload[-TAG_SIZE:])
        c = self.counters
        encoding, plain_len = sealed.encoding, sealed.plain_len
        c.transferred += plain_len
        c.wire_bytes += HEADER_SIZE + len(payload)
        c.chunks += 1
        c.zero_chunks += encoding == Encoding.ZERO
        c.compressed_chunks += encoding == Encoding.ZSTD
        c.sparse_chunks += encoding == Encoding.SPARSE
        if self.downtime_phase:
            c.downtime_bytes += plain_len
        else:
            c.precopy_bytes += plain_len
        if self.auto is not None:
            self._window(plain_len, HEADER_SIZE + len(payload))

    def _window(self, state: int, wire: int) -> None:
        self._win_chunks += 1
        self._win_state += state
        self._win_wire += wire
        if self._win_chunks < self.WINDOW:
            return
        assert self.auto is not None
        now, waited = self._loop.time(), self._waited()
        cpu, n_in, n_out = self.encoder.take_stats()
        decided = self.auto.record(Window(
            compressed=self.auto.compress, state_bytes=self._win_state, wire_bytes=self._win_wire,
            seconds=now - self._win_start, waiting_seconds=waited - self._win_waited,
            compress_cpu=cpu, compress_in=n_in, compress_out=n_out))
        self.counters.auto_windows += 1
        self.counters.auto_compressed_windows += decided
        self._win_start, self._win_waited = now, waited
        self._win_chunks = self._win_state = self._win_wire = 0

    async def _write_frames(self) -> None:
        while True:
            ep, seq, fut, slot = await self._queue.get()
            try:
                await self._emit(ep, seq, await fut)
            except MigdError as exc:
                ep.fail(exc)
            except Exception:  # a worker crashed: never leave the waiter hanging
                log.exception("send pipeline failed")
                ep.fail(MigdError("internal error in the send pipeline"))
            finally:
                self._slots.put_nowait(slot)
                self._queued -= 1
                self._queue.task_done()

    def end_record(self) -> dict[str, object]:
        return {"t": "end", "bytes": self.offset, "chunks": self.index,
                "digest": self.digest.digest()}

    async def close(self) -> None:
        # Until it is done: a cancel can be absorbed by what the writer awaits.
        while not self._writer.done():
            self._writer.cancel()
            await asyncio.wait([self._writer], timeout=1.0)
        # Frames still being sealed by a worker must not write into buffers
        # that another migration already took.
        while not self._queue.empty():
            _, _, pending, _ = self._queue.get_nowait()
            await asyncio.gather(pending, return_exceptions=True)
        self.workers.bank.give(self._sizes, self._bufs)


@dataclass(eq=False)
class _RxSlot:
    payload: bytearray | memoryview
    plain: bytearray
    channel: int = 0


@dataclass
class _Scratch(threading.local):
    buf: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class _Placed:
    """A chunk that arrived and is waiting for its turn to be loaded."""

    pieces: asyncio.Future[list[memoryview] | None]  # None: still sealed, opened into the device
    slot: _RxSlot
    ev: Data


def _check_body(h: Header, body: int) -> None:
    """A RAW or SPARSE chunk's payload length against its header, before anything is
    opened: whichever way it is opened, the same refusal."""
    if h.encoding == Encoding.RAW and body != h.plain_len:
        raise IntegrityError(f"raw chunk {h.index} is {body} bytes, header says {h.plain_len}")
    if h.encoding == Encoding.SPARSE:
        if body >= h.plain_len:
            raise IntegrityError(f"sparse chunk {h.index} is not smaller than its data")
        if body < bitmap_len(h.plain_len):
            raise DecompressionError("sparse chunk shorter than its bitmap")


class StreamReceiver:
    """Destination side: checks each channel's indices and the allowance on arrival,
    decodes, then loads chunks into the device strictly in index order.

    Each channel has its own buffers.  The chunk due next always travels on a
    channel whose earlier chunks are all loaded, so that channel has a free
    buffer for it: reassembly cannot deadlock, and memory stays bounded.
    """

    def __init__(self, bus: Bus, device: Device, workers: Workers, counters: Counters,
                 max_chunk: int, limit_bytes: int, channels: int = 1,
                 inflight: int = DEFAULT_INFLIGHT) -> None:
        self.bus = bus
        self.device = device
        self.workers = workers
        self.counters = counters
        self.limit_bytes = limit_bytes
        self.nchannels = channels
        self.endpoints: list[Endpoint | None] = [None] * channels
        self.decoder = Decoder()
        self.announced = 0
        self.arrived_chunks = 0
        self.next_index = 0  # next chunk to load
        self.written = 0
        self.digest = hashlib.sha256()
        self.initial_target: int | None = None
        per_channel = max(2, inflight // channels)
        self._sizes = rx_sizes(max_chunk, per_channel * channels)
        self._bufs = workers.bank.take(self._sizes)
        self._free: list[collections.deque[_RxSlot]] = [collections.deque() for _ in range(channels)]
        for i in range(0, len(self._bufs), 2):
            ch = (i // 2) // per_channel
            self._free[ch].append(_RxSlot(self._bufs[i], self._bufs[i + 1], ch))
        self._by_payload: dict[int, _RxSlot] = {
            id(s.payload): s for q in self._free for s in q}
        #: Channels whose payloads the source writes one-sided into posted buffers.
        self._placements: list[Placement | None] = [None] * channels
        self._chan_next = list(range(channels))
        self._ready: dict[int, _Placed] = {}
        self._have = asyncio.Event()
        self._scratch = _Scratch()
        self._max_chunk = max_chunk
        self._loop = asyncio.get_running_loop()
        self._writing = False
        self._writer = self._loop.create_task(self._write_chunks())
        self._next_ack = ACK_EVERY
        #: Per channel: open RAW and SPARSE chunks straight into device memory (with
        #: AES-GCM: the other ciphers have no streaming opener).
        self._direct = [False] * channels

    @property
    def control(self) -> Endpoint:
        ep = self.endpoints[0]
        assert ep is not None
        return ep

    # --- hooks for Connection and Endpoint -----------------------------------------

    def attach(self, channel: int, ep: Endpoint) -> None:
        self.endpoints[channel] = ep
        ep.on_data = lambda ev: self.on_data(channel, ev)
        self._direct[channel] = (self.device.lends_memory and not self.device.blocking_io
                                 and ep.conn.opens_pieces)
        placement = ep.channel.placement
        if placement is not None:
            # The channel's payload buffers become registered memory the source
            # writes into; each free one is a credit at the source.
            slots = list(self._free[channel])
            self._free[channel].clear()
            regions = placement.register(self._max_chunk + TAG_SIZE, len(slots))
            self._placements[channel] = placement
            for slot, region in zip(slots, regions, strict=True):
                del self._by_payload[id(slot.payload)]
                slot.payload = region
                self._by_payload[id(region)] = slot
                placement.post(region)

    def take_buffer(self, channel: int, size: int) -> bytearray | memoryview | None:
        """A channel's Connection asks for a payload buffer; None applies back-pressure.
        One-sided channels hand over the buffer the payload already landed in."""
        placement = self._placements[channel]
        if placement is not None:
            return placement.landed(size)
        free = self._free[channel]
        return free.popleft().payload if free else None

    def _release(self, slot: _RxSlot) -> None:
        placement = self._placements[slot.channel]
        if placement is not None:
            assert isinstance(slot.payload, memoryview)
            placement.post(slot.payload)  # a credit again
            return
        self._free[slot.channel].append(slot)
        ep = self.endpoints[slot.channel]
        if ep is not None:
            ep.unblock()

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
        self.control.post_control({"t": "announced", "bytes": self.announced})

    def on_data(self, channel: int, ev: Data) -> None:
        h = ev.header
        slot = self._by_payload[id(ev.buf)]
        if h.index != self._chan_next[channel]:
            self._release(slot)
            raise IntegrityError(
                f"chunk {h.index} on channel {channel} where chunk {self._chan_next[channel]} "
                "was due"
            )
        # Every byte is announced (and acknowledged) before it is sent, on any channel.
        if h.offset + h.plain_len > self.announced:
            self._release(slot)
            raise OverAnnounced(
                f"chunk {h.index} goes past the {self.announced} bytes the source announced"
            )
        self._chan_next[channel] += self.nchannels
        self.arrived_chunks += 1
        c = self.counters
        c.wire_bytes += HEADER_SIZE + h.payload_len
        c.chunks += 1
        pieces: asyncio.Future[list[memoryview] | None]
        if h.encoding == Encoding.ZSTD:
            pieces = self._loop.run_in_executor(self.workers.codec, self._open, ev, slot)
        else:
            # None: opened straight into the device when its turn comes (it waits sealed).
            decoded = None
            if not (self._direct[channel] and h.encoding in _DIRECT):
                try:
                    decoded = self._open(ev, slot)
                except BaseException:
                    self._release(slot)
                    raise
            if (h.index == self.next_index and not self._writing and not self.device.blocking_io):
                try:  # the common case: in order, nothing ahead of it, load it now
                    self._place(ev, slot, decoded)
                finally:
                    self._release(slot)
                return
            pieces = self._loop.create_future()
            pieces.set_result(decoded)
        self._ready[h.index] = _Placed(pieces, slot, ev)
        self._have.set()

    # --- decoding (inline or on a worker) --------------------------------------------

    def _open(self, ev: Data, slot: _RxSlot) -> list[memoryview]:
        """Authenticate and decode one chunk; returns its plain bytes as pieces."""
        h = ev.header
        ep = self.endpoints[slot.channel]
        assert ep is not None
        body = h.payload_len - TAG_SIZE
        # A landed payload is ours until its credit is posted again: open it where it
        # lies and load from there (no second buffer; nothing to copy with ``none``).
        in_place = self._placements[slot.channel] is not None and h.encoding != Encoding.ZSTD
        out = (memoryview(slot.payload) if in_place else memoryview(slot.plain))[: h.plain_len]
        _check_body(h, body)
        if h.encoding == Encoding.RAW:
            ep.conn.open_data_into(ev, out)
            return [out]
        if h.encoding == Encoding.SPARSE:
            ep.conn.open_data_into(ev, out[:body])
            return self.decoder.sparse_segments(out[:body], h.plain_len)
        if h.encoding == Encoding.ZERO:
            if body:
                raise IntegrityError(f"zero chunk {h.index} carries a payload")
            ep.conn.open_data_into(ev, out[:0])
            return [zero_view(h.plain_len)]
        if h.encoding == Encoding.ZSTD:
            scratch = self._scratch_buf()
            n = ep.conn.open_data_into(ev, scratch[:body])
            self.decoder.decode_into(h.encoding, scratch[:n], out)
            return [out]
        raise IntegrityError(f"chunk {h.index} has unknown encoding {h.encoding}")

    def _open_into_device(self, ev: Data, slot: _RxSlot) -> None:
        """Authenticate and decode one RAW or SPARSE chunk straight into the device's
        memory: each carried run is decrypted where the device keeps it, each zero
        run zero-filled there.  No plaintext buffer, no copy.

        The tag is checked last, so a forged chunk has written bytes nobody vouched
        for.  They stay in a device that is RESUMING: the migration fails and the
        device is reset before it could run them."""
        h = ev.header
        ep = self.endpoints[slot.channel]
        assert ep is not None
        opener = ep.conn.opener(ev)
        assert opener is not None
        payload = memoryview(slot.payload)[: h.payload_len]
        body = payload[:-TAG_SIZE]
        try:
            _check_body(h, len(body))
            if h.encoding == Encoding.RAW:
                self._sink(body, opener)
            else:
                blen = bitmap_len(h.plain_len)
                bitmap = bytearray(blen)
                opener.update_into(body[:blen], memoryview(bitmap))
                pos = blen
                for carried, k in sparse_runs(bitmap, h.plain_len, len(body) - blen):
                    if carried:
                        self._sink(body[pos : pos + k], opener)
                        pos += k
                    else:
                        self._sink(zero_view(k), None)
        except MigdError:
            # A forged chunk reads as garbage to the device or the decoder: say what it is.
            self._authenticate(ev, slot)
            raise
        opener.finish(payload[-TAG_SIZE:])

    def _sink(self, data: memoryview, opener: Opener | None) -> None:
        """Put ``data`` where the device keeps the next bytes, decrypting on the way."""
        dev = self.device
        while data:
            view = dev.sink(len(data))
            k = len(view)
            if opener is None:
                view[:] = data[:k]
            else:
                opener.update_into(data[:k], view)
            dev.sunk(k)
            data = data[k:]

    def _authenticate(self, ev: Data, slot: _RxSlot) -> None:
        """Check a chunk's tag the slow way (error paths only): IntegrityError if forged."""
        ep = self.endpoints[slot.channel]
        assert ep is not None
        ep.conn.open_data_into(ev, self._scratch_buf()[: ev.header.payload_len - TAG_SIZE])

    def _scratch_buf(self) -> memoryview:
        """This thread's chunk-sized scratch (for what cannot be opened in place)."""
        scratch = self._scratch.buf
        if len(scratch) < self._max_chunk:
            scratch = self._scratch.buf = bytearray(self._max_chunk)
        return memoryview(scratch)

    # --- loading, in index order -------------------------------------------------------

    def _load(self, pieces: list[memoryview]) -> None:
        for data in pieces:
            while data:
                n = self.device.write(data)
                if n <= 0:
                    raise DeviceError("device accepted no data")
                data = data[n:]

    def _place(self, ev: Data, slot: _RxSlot, pieces: list[memoryview] | None) -> None:
        """Load the chunk due next (non-blocking devices) and account for it; None:
        it is still sealed, and is opened straight into the device."""
        self._check_place(ev, slot)
        if pieces is None:
            self._open_into_device(ev, slot)
        else:
            self._load(pieces)
        self._loaded(ev.header.plain_len)

    def _check_place(self, ev: Data, slot: _RxSlot) -> None:
        h = ev.header
        if h.offset != self.written:
            raise IntegrityError(f"chunk {h.index} at offset {h.offset}, stream is at {self.written}")
        self.digest.update(ev.raw)
        self.digest.update(memoryview(slot.payload)[h.payload_len - TAG_SIZE : h.payload_len])

    def _loaded(self, n: int) -> None:
        """Bookkeeping after ``n`` more bytes reached the device, in order."""
        self.next_index += 1
        self.written += n
        self.counters.transferred = self.written
        if self.written >= self._next_ack:
            self._next_ack = self.written + ACK_EVERY
            self.control.post_control({"t": "ack", "offset": self.written})
        if self.initial_target is not None and self.written >= self.initial_target:
            self.initial_target = None
            self.control.post_control({"t": "initial-loaded", "offset": self.written})
        self._have.set()  # the chunk after this one may already be waiting
        self.bus.wake.set()

    async def _write_chunks(self) -> None:
        while True:
            while self.next_index not in self._ready:
                self._have.clear()
                await self._have.wait()
            placed = self._ready.pop(self.next_index)
            self._writing = True
            try:
                pieces = await placed.pieces
                if pieces is not None and self.device.blocking_io:
                    self._check_place(placed.ev, placed.slot)
                    await self._loop.run_in_executor(self.workers.io, self._load, pieces)
                    self._loaded(placed.ev.header.plain_len)
                else:
                    self._place(placed.ev, placed.slot, pieces)
            except MigdError as exc:
                self.bus.fail(exc)
            except Exception:
                log.exception("load pipeline failed")
                self.bus.fail(MigdError("internal error in the load pipeline"))
            finally:
                self._writing = False
                self._release(placed.slot)

    def initial_sent(self, msg: dict[str, object]) -> None:
        off = msg.get("offset")
        if not isinstance(off, int) or off < 0 or off > self.announced:
            raise IntegrityError("initial-sent: bad offset")
        if self.written >= off:
            self.initial_target = None
            self.control.post_control({"t": "initial-loaded", "offset": off})
        else:
            self.initial_target = off

    async def finish(self, end: dict[str, object], timeout: float) -> None:
        """Wait for every chunk to arrive and be loaded, then check the end record."""
        total, chunks, digest = end.get("bytes"), end.get("chunks"), end.get("digest")
        if not isinstance(total, int) or not isinstance(chunks, int) or not isinstance(digest, bytes):
            raise IncompleteStream("end-of-stream record is malformed")
        if total > self.announced or chunks < self.arrived_chunks:
            raise IncompleteStream(
                f"end record says {total} bytes in {chunks} chunks; {self.announced} bytes were "
                f"announced and {self.arrived_chunks} chunks arrived"
            )
        # Chunks on other channels may still be in flight behind the end record.
        await self.bus.wait_until(lambda: self.next_index >= chunks, timeout,
                                  f"chunks {self.next_index}..{chunks - 1}")
        if self.written != total or self.arrived_chunks != chunks:
            raise IncompleteStream(
                f"source sent {total} bytes in {chunks} chunks, {self.written} bytes in "
                f"{self.arrived_chunks} chunks arrived"
            )
        if digest != self.digest.digest():
            raise IntegrityError("stream digest mismatch: what arrived is not what was sent")

    async def close(self) -> None:
        while not self._writer.done():
            self._writer.cancel()
            await asyncio.wait([self._writer], timeout=1.0)
        for placed in self._ready.values():
            await asyncio.gather(placed.pieces, return_exceptions=True)
        self.workers.bank.give(self._sizes, self._bufs)
