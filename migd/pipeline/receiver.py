"""The receiving half of the pipeline: wire -> open -> decode -> device.

Frames are opened on the worker pool (with AES-GCM straight into device memory
where the device lends it), and chunks are loaded in index order; the running
stream digest is checked against the end record, and the destination commits
only if length, count and digest all match.  Loaded positions are acknowledged
(where a resumed stream starts)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.base import Device

from ..codec import Decoder, Encoding, bitmap_len, sparse_runs, zero_view
from ..crypto import Opener
from ..endpoint import Bus, Endpoint
from ..errors import (
    DecompressionError,
    DeviceError,
    IntegrityError,
    MigdError,
)
from ..protocol.connection import Data
from ..protocol.digest import StreamDigest, sealed_size
from ..protocol.frames import HEADER_SIZE, Header
from ..protocol.messages import Ack, Announce, Announced, End, InitialLoaded, InitialSent
from ..protocol.migration import Allowance, check_complete, check_end
from .buffers import (
    ACK_RARELY,
    DEFAULT_INFLIGHT,
    Counters,
    Workers,
    rx_sizes,
    rx_slots,
)

log = logging.getLogger("migd.pipeline")
#: Encodings a device that lends its memory is opened into directly.
_DIRECT = (Encoding.RAW, Encoding.SPARSE)


@dataclass(eq=False)
class _RxSlot:
    """A payload buffer (where a channel lands a sealed chunk) paired with a plain
    buffer (what it is decoded into when it cannot be opened in place)."""

    payload: bytearray | memoryview
    plain: bytearray
    channel: int = 0
    #: The endpoint whose payloads land in it: where it goes back once used.
    ep: Endpoint | None = None


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
        self._stopped = False
        self.device = device
        self.workers = workers
        self.counters = counters
        self.allowance = Allowance(limit_bytes)
        self.decoder = Decoder()
        self.arrived_chunks = 0
        self.next_index = 0  # next chunk to load
        self.written = 0
        self.digest = StreamDigest()
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
        self._slots: list[list[_RxSlot]] = [[] for _ in range(channels)]
        for i in range(0, len(self._bufs), 2):
            ch = (i // 2) // per_channel
            self._slots[ch].append(_RxSlot(self._bufs[i], self._bufs[i + 1], ch))
        #: The slot of each payload buffer a channel lands in (filled by :meth:`attach`).
        self._by_payload: dict[int, _RxSlot] = {}
        #: Channels whose payloads the source writes one-sided: opened where they landed.
        self._one_sided = [False] * channels
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
                                 and ep.opens_pieces)
        self._one_sided[channel] = ep.one_sided
        slots = self._slots[channel]
        landing = ep.land_payloads([s.payload for s in slots], sealed_size(self._max_chunk))
        for slot, buf in zip(slots, landing, strict=True):
            slot.payload, slot.ep = buf, ep
            self._by_payload[id(buf)] = slot

    def _release(self, slot: _RxSlot) -> None:
        """A chunk is loaded or dropped: its payload buffer goes back to its channel."""
        if slot.ep is not None and not self._detached:
            slot.ep.give_back(slot.payload)

    def announce(self, msg: Announce) -> None:
        self.control.post_control(Announced(total=self.allowance.announce(msg.more)))

    def on_data(self, channel: int, ev: Data) -> None:
        h = ev.header
        slot = self._by_payload[id(ev.buf)]
        if self._stopped:  # the device is being (or was) reset: nothing more goes in
            self._release(slot)
            return
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
        body = ev.body_len
        # A landed payload is ours until its credit is posted again: open it where it
        # lies and load from there (no second buffer; nothing to copy with ``none``).
        in_place = self._one_sided[slot.channel] and h.encoding != Encoding.ZSTD
        out = (memoryview(slot.payload) if in_place else memoryview(slot.plain))[: h.plain_len]
        _check_body(h, body)
        if h.encoding == Encoding.RAW:
            ep.open_data_into(ev, out)
            return [out]
        if h.encoding == Encoding.SPARSE:
            ep.open_data_into(ev, out[:body])
            return self.decoder.sparse_segments(out[:body], h.plain_len)
        if h.encoding == Encoding.ZERO:
            if body:
                raise IntegrityError(f"zero chunk {h.index} carries a payload")
            ep.open_data_into(ev, out[:0])
            return [zero_view(h.plain_len)]
        if h.encoding == Encoding.ZSTD:
            scratch = self._scratch_buf()
            n = ep.open_data_into(ev, scratch[:body])
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
        opener = ep.opener(ev)
        assert opener is not None
        body = ev.body
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
        opener.finish(ev.tag)

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
        ep.open_data_into(ev, self._scratch_buf()[: ev.body_len])

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
        self.digest.fold_frame(ev.raw, ev.sealed)

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
        check_complete(end, self.written, self.next_index, self.digest.value())
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
                ep.stop_landing()
                ep.close()
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

    async def stop(self) -> None:
        """Load nothing more: chunks still arriving are dropped, and what is being
        loaded is finished first.  Before a device is reset, so that no chunk lands
        in it after the wipe."""
        await self._quiesce()
        # A load the writer handed to the I/O thread is done when that thread gets to a
        # later job: it runs jobs in order.
        await self._loop.run_in_executor(self.workers.io, lambda: None)

    async def _quiesce(self) -> None:
        self._stopped = True
        while not self._writer.done():
            self._writer.cancel()
            await asyncio.wait([self._writer], timeout=1.0)
        for placed in self._ready.values():
            await asyncio.gather(placed.pieces, return_exceptions=True)

    async def close(self) -> None:
        await self._quiesce()
        self.workers.bank.give(self._sizes, self._bufs)
        self._bufs = []
