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
from transports.base import Credit, Placement

from .codec import Decoder, Encoder, Encoding, bitmap_len, sparse_runs, zero_view
from .crypto import TAG_SIZE, Opener
from .endpoint import Bus, Endpoint
from .errors import (
    DecompressionError,
    DeviceError,
    IntegrityError,
    MigdError,
    NegotiationError,
    NoDataNow,
    ProtocolError,
)
from .pacing import AutoPolicy, TokenBucket, Window
from .protocol.connection import Data
from .protocol.frames import HEADER_SIZE, Header
from .protocol.messages import Ack, Announce, Announced, End, InitialLoaded, InitialSent
from .protocol.migration import Allowance, check_complete, check_end

log = logging.getLogger("migd.stream")

DEFAULT_INFLIGHT = 8
_DIRECT = (Encoding.RAW, Encoding.SPARSE)
#: The destination acknowledges its loaded position every this many chunks (the
#: source asks; a resumed stream starts there).  A source that keeps its chunks in a
#: pool of buffers asks often; one whose device lends its memory keeps views, which
#: cost nothing, and asks rarely: each acknowledgement costs both sides a control
#: message.
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
        self.bank = BufferBank(bank_limit)

    def shutdown(self) -> None:
        self.io.shutdown(wait=True, cancel_futures=True)
        self.codec.shutdown(wait=True, cancel_futures=True)


def tx_sizes(chunk: int, inflight: int) -> tuple[int, ...]:
    return (chunk, HEADER_SIZE + chunk + TAG_SIZE) * inflight


def rx_sizes(chunk: int, inflight: int) -> tuple[int, ...]:
    return (chunk + TAG_SIZE, chunk) * inflight


def rx_slots(inflight: int, channels: int) -> int:
    """Receive slots per channel: every channel keeps at least two in flight."""
    return max(2, inflight // channels)


def sender_buffers(chunk: int, inflight: int = DEFAULT_INFLIGHT, keep: bool = True) -> int:
    """The most bytes of the bank one device's sender holds (``keep``: with the
    chunks kept for a resume), what admission reserves for it."""
    return sum(tx_sizes(chunk, inflight)) + ((inflight + 2 * ACK_OFTEN) * chunk if keep else 0)


def receiver_buffers(chunk: int, channels: int, inflight: int = DEFAULT_INFLIGHT) -> int:
    return sum(rx_sizes(chunk, rx_slots(inflight, channels) * channels))


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
    index: int
    offset: int
    again: bool  # sent before: a resumed stream sends it again
    frame: memoryview | None = None  # header and payload contiguous (stream transports)


@dataclass(eq=False, slots=True)
class _Kept:
    """A chunk sent and not yet acknowledged as loaded: what a resumed stream sends
    again.  ``plain`` is device memory the device lent (no copy), or a buffer of
    the keep pool that the device was read into (``pooled``)."""

    index: int
    offset: int
    plain: list[memoryview]
    pooled: bytearray | None
    #: What the stream digest folds in for it once it is acknowledged (header and tag).
    contrib: bytes = b""


class StreamSender:
    """Source side.  Chunk ``i`` travels on channel ``i mod N``, so the destination
    can check each channel's indices exactly.

    AEAD alone costs ~0.1 ms per MiB, less than a thread hop, so a chunk that is
    not compressed is sealed inline (when nothing is queued ahead of it); zstd
    goes to the codec pool and an ordered writer sends its frames.  With
    ``auto`` compression an :class:`~migd.pacing.AutoPolicy` decides per window
    of chunks; ``max_bandwidth`` paces wire bytes with a token bucket.

    With ``keep`` the sender keeps every chunk until the destination acknowledges
    it as loaded, so that a broken stream can be resumed (:meth:`rebind`) from
    the destination's position.  A device that lends its memory costs nothing to
    keep (views); others are read into a pool of chunk buffers, and the sender
    waits for acknowledgements when it runs out.  The pool holds what may be in
    flight (``inflight``) plus two acknowledgement intervals, so that it never
    runs dry for want of an acknowledgement that cannot come."""

    WINDOW = 16  # chunks per auto-compression decision
    PROBE_EVERY = 4  # raw windows compress one chunk every this many, to keep measuring

    @staticmethod
    def ack_every(device: Device, keep: bool) -> int:
        """How often the destination should acknowledge: often when kept chunks hold
        pool buffers (the pool must not run dry), rarely otherwise."""
        return ACK_OFTEN if keep and not device.lends_memory else ACK_RARELY

    def __init__(self, channels: list[Endpoint], device: Device, encoder: Encoder,
                 workers: Workers, counters: Counters, inflight: int = DEFAULT_INFLIGHT,
                 max_bandwidth: int = 0, timeout: float = 30.0, keep: bool = False) -> None:
        self.device = device
        self.encoder = encoder
        self.workers = workers
        self.counters = counters
        #: Seconds of peer silence after which a wait fails (the migration's timeout).
        self.timeout = timeout
        self.index = 0
        self.offset = 0
        self.announced = 0
        self.acked_announced = 0
        #: The stream digest over every chunk up to the last acknowledged one (the
        #: rest is folded in from ``_kept`` at the end).
        self.digest = hashlib.sha256()
        self.keep = keep
        self._keep_n = inflight + 2 * ACK_OFTEN  # as sender_buffers() reserves
        #: How far frames went out (were handed to a channel): acks cannot go past it.
        self._out_index = self._out_offset = 0
        self._kept: collections.deque[_Kept] = collections.deque()
        self._resend: collections.deque[_Kept] = collections.deque()
        self._pool: list[bytearray] = []
        self._pool_bufs: list[bytearray] = []
        self._loop = asyncio.get_running_loop()
        self._bind(channels)
        self.chunk = self.control.conn.max_chunk
        self._sizes = tx_sizes(self.chunk, inflight)
        self._bufs = workers.bank.take(self._sizes)
        self._slots: asyncio.Queue[_TxSlot] = asyncio.Queue()
        self._queue: asyncio.Queue[tuple[Endpoint, int, asyncio.Future[_Sealed], _TxSlot]] = (
            asyncio.Queue())
        self._queued = 0  # frames handed to the writer and not yet sent
        self._start_writer()
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

    def _bind(self, channels: list[Endpoint]) -> None:
        self.channels = channels
        self.control = channels[0]
        #: Every payload is a store into the destination's memory: a copy, not link time.
        self.local = all(e.channel.placement is not None and e.channel.placement.maps_remote
                         for e in channels)
        self.encoder.sparse = not self.local
        self.control.handlers[Announced] = self._on_announced
        self.control.handlers[Ack] = self._on_ack

    def _start_writer(self) -> None:
        while not self._slots.empty():
            self._slots.get_nowait()
        for i in range(0, len(self._bufs), 2):
            self._slots.put_nowait(_TxSlot(self._bufs[i], self._bufs[i + 1]))
        self._writer = self._loop.create_task(self._write_frames())

    def _on_announced(self, msg: Announced) -> None:
        self.acked_announced = max(self.acked_announced, msg.total)

    def _on_ack(self, msg: Ack) -> None:
        self.counters.acked = max(self.counters.acked, msg.offset)
        if msg.index > self._out_index or msg.offset > self._out_offset:
            raise ProtocolError(f"ack: chunk {msg.index} / offset {msg.offset} was never sent")
        self._forget(msg.index)

    def _forget(self, below: int) -> None:
        """The destination loaded every chunk below ``below``: fold them into the
        digest and let their buffers go."""
        kept = self._kept
        while kept and kept[0].index < below and kept[0].contrib:
            k = kept.popleft()
            self.digest.update(k.contrib)
            if k.pooled is not None:
                self._pool.append(k.pooled)
        self.control.bus.wake.set()

    @property
    def position(self) -> tuple[int, int]:
        """(chunk, offset) the destination acknowledged last: where a resume may start."""
        if self._kept:
            return self._kept[0].index, self._kept[0].offset
        return self.index, self.offset

    async def reserve(self, nbytes: int) -> None:
        """Announce ahead what the stream will need (the stop-copy estimate before the
        VF stops), so that no announcement round trip falls into the downtime."""
        more = self.offset + nbytes - self.announced
        if more > 0:
            await self.announce(more)

    async def announce(self, nbytes: int) -> None:
        """Raise what the destination will accept, and wait until it has: data on
        other channels may overtake the announcement otherwise."""
        self.announced += nbytes
        await self.control.send_control(Announce(more=nbytes))
        target = self.announced
        await self.control.bus.wait_until(lambda: self.acked_announced >= target, self.timeout,
                                          "the destination to accept the announcement")

    # --- a resumed stream ------------------------------------------------------------------

    async def resend(self) -> None:
        """After a resume: send again, now, what the destination had not loaded.  The
        phase the source goes back to may only wait (for the initial bytes to load,
        for the operator), and the destination waits for these very chunks."""
        if self._resend:
            await self.send(0)

    async def stop(self) -> None:
        """No more frames: the migration rolls back (its peer is told next)."""
        await self._stop_writer()

    async def suspend(self) -> None:
        """The link broke: stop the writer and close every channel of it."""
        await self._stop_writer()
        for e in self.channels:
            e.channel.close()

    def rebind(self, channels: list[Endpoint], index: int, offset: int, announced: int) -> None:
        """Continue on new ``channels`` from the destination's position: chunk
        ``index`` at stream ``offset``, with ``announced`` bytes announced."""
        first = self._kept[0].index if self._kept else self.index
        if not first <= index <= self.index:
            raise ProtocolError(f"resumed: the destination is at chunk {index}; this source "
                                f"keeps chunks {first}..{self.index - 1}")
        kept = [k for k in self._kept if k.index >= index]
        if (kept[0].offset if kept else self.offset) != offset:
            raise ProtocolError(f"resumed: chunk {index} is not at stream offset {offset}")
        self._kept = collections.deque(k for k in self._kept if k.index < index)
        for k in self._kept:
            if not k.contrib:
                raise ProtocolError(f"resumed past chunk {k.index}, which never went out")
        self._forget(index)
        for k in kept:
            k.contrib = b""
        self._resend = collections.deque(kept)
        self._kept.extend(kept)
        self.announced = self.acked_announced = announced
        if any(e.conn.max_chunk < self.chunk for e in channels):
            raise NegotiationError("resumed with a smaller chunk size than the stream uses")
        self._bind(channels)
        self._start_writer()

    async def _stop_writer(self) -> None:
        # Until it is done: a cancel can be absorbed by what the writer awaits.
        while not self._writer.done():
            self._writer.cancel()
            await asyncio.wait([self._writer], timeout=1.0)
        # Frames still being sealed by a worker must not write into buffers
        # that another migration (or the resumed stream) already took.
        while not self._queue.empty():
            _, _, pending, _ = self._queue.get_nowait()
            self._queue.task_done()
            await asyncio.gather(pending, return_exceptions=True)
        self._queued = 0

    # --- reading the device -------------------------------------------------------------------

    async def _read(self, buf: memoryview, lend: bool) -> tuple[memoryview, _Kept | None]:
        """The next up to ``len(buf)`` bytes of the device's stream: lent by the
        device when ``lend`` and it can (no copy), else read into ``buf``; and what
        to keep of them for a resume.  Empty: nothing for now, or the end."""
        pooled: bytearray | None = None
        try:
            if self.device.lends_memory:
                views = self.device.read_views(len(buf))
                assert views is not None
                keep = _Kept(self.index, self.offset, views, None) if self.keep else None
                if lend and len(views) == 1:
                    return views[0], keep
                n = 0  # a record boundary (the encoder wants one buffer), or into ``buf``
                for v in views:
                    buf[n : n + len(v)] = v
                    n += len(v)
                return buf[:n], keep
            if self.keep:
                pooled = await self._pooled()
                if lend:  # read straight into the kept buffer: no copy for keeping it
                    buf = memoryview(pooled)[: len(buf)]
            if self.device.blocking_io:
                n = await self._loop.run_in_executor(self.workers.io, self.device.read_into, buf)
            else:
                n = self.device.read_into(buf)
            keep = None
            if pooled is not None:
                if n == 0:
                    self._pool.append(pooled)  # nothing read into it: free again
                else:
                    if not lend:
                        pooled[:n] = buf[:n]
                    keep = _Kept(self.index, self.offset, [memoryview(pooled)[:n]], pooled)
            return buf[:n], keep
        except NoDataNow:
            if pooled is not None:
                self._pool.append(pooled)
            return buf[:0], None

    async def _pooled(self) -> bytearray:
        """A chunk buffer to read into and keep; waits for acknowledgements if none is free.
        Buffers come from the daemon's bank (pre-faulted, reused) as they are needed: a
        176-byte device never takes more than one."""
        if not self._pool and len(self._pool_bufs) < self._keep_n:
            (buf,) = self.workers.bank.take((self.chunk,))
            self._pool_bufs.append(buf)
            return buf
        await self.control.bus.wait_until(lambda: bool(self._pool), self.timeout,
                                          "the destination to acknowledge loaded chunks")
        return self._pool.pop()

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
        Chunks a resume must send again go first (they do not count).

        Returns the bytes sent; stops early on "no data for now".
        """
        if budget:
            await self.announce(budget)
        sent = 0
        while True:
            again = self._resend.popleft() if self._resend else None
            if again is None and budget is not None and sent >= budget:
                break
            slot = await self._slots.get()
            self.control.check()
            index = self.index if again is None else again.index
            ep = self.channels[index % len(self.channels)]
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
            if again is None:
                want = self.chunk if budget is None else min(self.chunk, budget - sent)
                if budget is None and self.offset + want > self.announced:
                    await self.announce(max(want, self.device.stop_copy_size()))
                plain, keep = await self._read(into[:want], lend=into is not target)
            else:
                plain, keep = _join(again.plain, into), None
            n = len(plain)
            if n == 0:
                if placement is not None and credit is not None:
                    placement.unused(credit)
                self._slots.put_nowait(slot)
                break
            if again is None:
                # Read from the device: it is part of the stream now, whatever happens to
                # the frame (a resume sends it again from ``_kept``).
                if keep is not None:
                    self._kept.append(keep)
                offset = self.offset
                self.index += 1
                self.offset += n
                sent += n
            else:
                offset = again.offset
            seq = ep.conn.reserve_seq()
            args = (ep, slot, plain, seq, index, offset, credit, target, again is not None)
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
        await self._queue.join()
        self.control.check()
        return sent

    def _hand_to_writer(self, ep: Endpoint, seq: int, fut: asyncio.Future[_Sealed],
                        slot: _TxSlot) -> None:
        self._queued += 1
        self._queue.put_nowait((ep, seq, fut, slot))

    def _seal(self, ep: Endpoint, slot: _TxSlot, plain: memoryview, seq: int, index: int,
              offset: int, credit: Credit | None, target: memoryview | None, again: bool,
              compress: bool) -> _Sealed:
        # Pieces only into our own buffer: it has room past the payload for the cipher.
        encoding, payload = self.encoder.encode(plain, compress,
                                                pieces=target is None and ep.conn.seals_pieces)
        wire = memoryview(slot.wire)
        header = wire[:HEADER_SIZE]
        sealed = ep.conn.seal_data_into(seq, index, offset, encoding, payload, len(plain), header,
                                        target if target is not None else wire[HEADER_SIZE:])
        if credit is None:  # header and payload side by side: one buffer on the stream
            return _Sealed(header, sealed, encoding, len(plain), None, False, index, offset, again,
                           wire[:HEADER_SIZE + len(sealed)])
        return _Sealed(header, sealed, encoding, len(plain), credit, target is not None, index,
                       offset, again)

    def _waited(self) -> float:
        return sum(e.channel.waited for e in self.channels) + self._paced

    async def _emit(self, ep: Endpoint, seq: int, sealed: _Sealed) -> None:
        """Pace, send (in sequence order) and account for one sealed frame."""
        if self.bucket is not None:
            delay = self.bucket.delay(HEADER_SIZE + len(sealed.payload), self._loop.time())
            if delay:
                self._paced += delay
                await asyncio.sleep(delay)
        if self.keep:
            # Folded into the digest once acknowledged; a resume seals it anew.
            self._find_kept(sealed.index).contrib = (bytes(sealed.header)
                                                     + bytes(sealed.payload[-TAG_SIZE:]))
        self._out_index = max(self._out_index, sealed.index + 1)
        self._out_offset = max(self._out_offset, sealed.offset + sealed.plain_len)
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
        if not self.keep:
            self.digest.update(header)
            self.digest.update(payload[-TAG_SIZE:])
        c = self.counters
        encoding, plain_len = sealed.encoding, sealed.plain_len
        if sealed.again:
            c.resent_bytes += plain_len
        else:
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

    def _find_kept(self, index: int) -> _Kept:
        kept = self._kept
        pos = index - kept[0].index  # kept chunks are consecutive
        k = kept[pos]
        assert k.index == index
        return k

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

    def end_record(self) -> End:
        digest = self.digest.copy()
        for k in self._kept:
            digest.update(k.contrib)
        return End(length=self.offset, chunks=self.index, digest=digest.digest())

    async def close(self) -> None:
        await self._stop_writer()
        self.workers.bank.give(self._sizes, self._bufs)
        self._kept.clear()
        self._resend.clear()
        self._pool.clear()
        for buf in self._pool_bufs:
            self.workers.bank.give((self.chunk,), [buf])
        self._pool_bufs = []


def _join(pieces: list[memoryview], into: memoryview) -> memoryview:
    """A kept chunk as one buffer for the encoder: itself, or its pieces copied into ``into``."""
    if len(pieces) == 1 and pieces[0].obj is not into.obj:
        return pieces[0]
    n = 0
    for p in pieces:
        into[n : n + len(p)] = p
        n += len(p)
    return into[:n]


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

    The stream outlives its channels: when the link breaks, :meth:`detach` drops
    whatever arrived and is not loaded yet, and :meth:`rebind` takes a new set of
    channels that continues at the loaded position (``next_index``, ``written``).
    """

    def __init__(self, bus: Bus, device: Device, workers: Workers, counters: Counters,
                 max_chunk: int, limit_bytes: int, channels: int = 1,
                 inflight: int = DEFAULT_INFLIGHT) -> None:
        self.device = device
        self.workers = workers
        self.counters = counters
        self.allowance = Allowance(limit_bytes)
        self.decoder = Decoder()
        self.arrived_chunks = 0
        self.next_index = 0  # next chunk to load
        self.written = 0
        self.digest = hashlib.sha256()
        self.initial_target: int | None = None
        self._inflight = inflight
        self._scratch = _Scratch()
        self._max_chunk = max_chunk
        self._loop = asyncio.get_running_loop()
        self._writing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._acked = 0  # the chunk index last acknowledged
        #: Chunks between acknowledgements of the loaded position (the source's ask).
        self.ack_every = ACK_RARELY
        self._bufs: list[bytearray] = []
        self._sizes: tuple[int, ...] = ()
        self._detached = False
        self._have = asyncio.Event()
        self._rebind(bus, channels)
        self._writer = self._loop.create_task(self._write_chunks())

    def _rebind(self, bus: Bus, channels: int) -> None:
        self.bus = bus
        self.nchannels = channels
        self.endpoints: list[Endpoint | None] = [None] * channels
        if self._bufs:
            self.workers.bank.give(self._sizes, self._bufs)
        per_channel = rx_slots(self._inflight, channels)
        self._sizes = rx_sizes(self._max_chunk, per_channel * channels)
        self._bufs = self.workers.bank.take(self._sizes)
        self._free: list[collections.deque[_RxSlot]] = [collections.deque() for _ in range(channels)]
        for i in range(0, len(self._bufs), 2):
            ch = (i // 2) // per_channel
            self._free[ch].append(_RxSlot(self._bufs[i], self._bufs[i + 1], ch))
        self._by_payload: dict[int, _RxSlot] = {
            id(s.payload): s for q in self._free for s in q}
        #: Channels whose payloads the source writes one-sided into posted buffers.
        self._placements: list[Placement | None] = [None] * channels
        # Chunk i travels on channel i mod N, from the first one not loaded yet.
        k = self.next_index
        self._chan_next = [k + (ch - k) % channels for ch in range(channels)]
        self._ready: dict[int, _Placed] = {}
        self.arrived_chunks = self.next_index
        #: Per channel: open RAW and SPARSE chunks straight into device memory (with
        #: AES-GCM: the other ciphers have no streaming opener).
        self._direct = [False] * channels

    @property
    def control(self) -> Endpoint:
        ep = self.endpoints[0]
        assert ep is not None
        return ep

    @property
    def announced(self) -> int:
        return self.allowance.announced

    # --- hooks for Connection and Endpoint -----------------------------------------

    def attach(self, channel: int, ep: Endpoint) -> None:
        self.endpoints[channel] = ep
        ep.on_data = lambda ev: self.on_data(channel, ev)
        if channel == 0:
            ep.handlers[Announce] = self.announce
            ep.handlers[InitialSent] = self.initial_sent
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
        if self._detached:
            return
        if slot.channel >= self.nchannels or self._by_payload.get(id(slot.payload)) is not slot:
            return  # a buffer of channels that are gone
        placement = self._placements[slot.channel]
        if placement is not None:
            assert isinstance(slot.payload, memoryview)
            placement.post(slot.payload)  # a credit again
            return
        self._free[slot.channel].append(slot)
        ep = self.endpoints[slot.channel]
        if ep is not None:
            ep.unblock()

    def announce(self, msg: Announce) -> None:
        self.control.post_control(Announced(total=self.allowance.announce(msg.more)))

    def on_data(self, channel: int, ev: Data) -> None:
        h = ev.header
        slot = self._by_payload[id(ev.buf)]
        try:
            if h.index != self._chan_next[channel]:
                raise IntegrityError(f"chunk {h.index} on channel {channel} where chunk "
                                     f"{self._chan_next[channel]} was due")
            # Every byte is announced (and acknowledged) before it is sent, on any channel.
            self.allowance.admit(h.index, h.offset, h.plain_len)
        except MigdError:
            self._release(slot)
            raise
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
        if self.next_index >= self._acked + self.ack_every:
            # Also what a resumed stream starts from: the source keeps chunks until then.
            self._acked = self.next_index
            self.control.post_control(Ack(index=self.next_index, offset=self.written))
        if self.initial_target is not None and self.written >= self.initial_target:
            self.initial_target = None
            self.control.post_control(InitialLoaded(offset=self.written))
        self._have.set()  # the chunk after this one may already be waiting
        self.bus.wake.set()

    async def _write_chunks(self) -> None:
        while True:
            while self._detached or self.next_index not in self._ready:
                self._have.clear()
                await self._have.wait()
            placed = self._ready.pop(self.next_index)
            self._writing = True
            self._idle.clear()
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
                self._idle.set()
                self._release(placed.slot)

    def initial_sent(self, msg: InitialSent) -> None:
        if msg.offset > self.announced:
            raise IntegrityError("initial-sent: offset past what was announced")
        if self.written >= msg.offset:
            self.initial_target = None
            self.control.post_control(InitialLoaded(offset=msg.offset))
        else:
            self.initial_target = msg.offset

    async def finish(self, end: End, timeout: float,
                     stop: Callable[[], bool] = lambda: False) -> bool:
        """Wait for every chunk to arrive and be loaded, then check the end record.
        False: ``stop`` said to give up waiting first."""
        check_end(end, self.announced, self.arrived_chunks)
        # Chunks on other channels may still be in flight behind the end record.
        await self.bus.wait_until(lambda: self.next_index >= end.chunks or stop(), timeout,
                                  f"chunks {self.next_index}..{end.chunks - 1}")
        if self.next_index < end.chunks:
            return False
        check_complete(end, self.written, self.next_index, self.digest.digest())
        return True

    # --- a broken link and a resumed stream -------------------------------------------

    async def detach(self) -> None:
        """The link broke: close its channels and drop every chunk that arrived but
        is not loaded (the source sends them again).  A chunk being loaded finishes
        first: the position it leaves is where a resumed stream starts."""
        self._detached = True  # the writer takes nothing new; nothing is reposted
        for ep in self.endpoints:
            if ep is not None:
                ep.on_data = None
                ep.channel.close()
        while self._writing:
            await self._idle.wait()
        dropped = list(self._ready.values())
        self._ready.clear()
        for placed in dropped:
            await asyncio.gather(placed.pieces, return_exceptions=True)

    def rebind(self, bus: Bus, channels: int) -> None:
        """Take a new set of ``channels`` (attach each) that continues at the loaded position."""
        self._detached = False
        self._rebind(bus, channels)
        self._acked = self.next_index
        self._have.set()

    async def close(self) -> None:
        while not self._writer.done():
            self._writer.cancel()
            await asyncio.wait([self._writer], timeout=1.0)
        for placed in self._ready.values():
            await asyncio.gather(placed.pieces, return_exceptions=True)
        self.workers.bank.give(self._sizes, self._bufs)
        self._bufs = []
