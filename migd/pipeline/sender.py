"""The sending half of the pipeline: device -> encode -> seal -> wire.

A fixed set of pooled slots (``inflight``) keeps memory flat whatever the state
size; device reads happen on one ordered I/O thread, compression and AEAD on the
worker pool (zstandard and cryptography release the GIL), and frames go out in
sequence order.  Every data frame's authenticated header and tag go into a
running SHA-256, the *stream digest*, which the end record carries with the total
length and chunk count.  Chunks the destination has not acknowledged are kept, so
a resumed link sends them again; ``--compress auto`` decides per window here."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
from dataclasses import dataclass

from backends.base import Device, Lease, gather

from ..codec import CompressMode, Encoder, Encoding
from ..endpoint import Endpoint, PlacedWrite, Target
from ..errors import (
    LentOut,
    MigdError,
    NegotiationError,
    NoDataNow,
    ProtocolError,
)
from ..pacing import AutoPolicy, TokenBucket, Window
from ..protocol.digest import StreamDigest
from ..protocol.frames import HEADER_SIZE
from ..protocol.messages import Ack, Announce, Announced, End
from .buffers import (
    ACK_AUTO,
    ACK_OFTEN,
    ACK_RARELY,
    DEFAULT_INFLIGHT,
    Counters,
    Workers,
    tx_sizes,
)
from .sharing import SharedLink

log = logging.getLogger("migd.pipeline")


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
    target: Target | None  # one-sided: the destination buffer it goes to
    in_place: bool  # the payload already lies in that buffer
    index: int
    offset: int
    again: bool  # sent before: a resumed stream sends it again
    frame: memoryview | None = None  # header and payload contiguous (stream transports)


@dataclass(eq=False, slots=True)
class _OpenWindow:
    """``auto``: one window of chunks as it is sent, until its delivery measures it."""

    compressed: bool
    first_sent: float
    state: int = 0
    wire: int = 0
    end: int = 0  # the chunk index after its last


@dataclass(eq=False, slots=True)
class _Kept:
    """A chunk sent and not yet acknowledged as loaded: what a resumed stream sends
    again.  ``plain`` is device memory the device lent (no copy), or a buffer of
    the keep pool that the device was read into (``pooled``); ``lease`` gives lent
    memory back."""

    index: int
    offset: int
    plain: list[memoryview]
    pooled: bytearray | None
    lease: Lease | None = None
    #: What the stream digest folds in for it once it is acknowledged (header and tag).
    contrib: bytes = b""


#: What sealing one chunk takes: endpoint, slot, plain bytes, sequence, index, offset,
#: target (one-sided), and whether it is sent again after a resume.
_SealArgs = tuple[Endpoint, _TxSlot, memoryview, int, int, int, Target | None, bool]


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
    def judges(mode: CompressMode, max_bandwidth: int, local: bool) -> bool:
        """Whether ``auto`` decides anything: not over shared memory without a cap
        (compressing to save a memory copy is never faster, so it does not even
        sample, nor ask for the acknowledgements that time its windows)."""
        return mode.name == "auto" and (bool(max_bandwidth) or not local)

    @staticmethod
    def ack_every(device: Device, keep: bool, auto: bool = False) -> int:
        """How often the destination should acknowledge: often when kept chunks hold
        pool buffers (the pool must not run dry) and more often still for ``auto``
        (acknowledgements time its windows), rarely otherwise."""
        if auto:
            return ACK_AUTO
        # A device that lends its memory for good (sim) holds nothing for kept chunks.
        return ACK_OFTEN if keep and not device.lends_memory else ACK_RARELY

    def __init__(self, channels: list[Endpoint], device: Device, encoder: Encoder,
                 workers: Workers, counters: Counters, inflight: int = DEFAULT_INFLIGHT,
                 max_bandwidth: int = 0, timeout: float = 30.0, keep: bool = False,
                 shared: SharedLink | None = None) -> None:
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
        self.digest = StreamDigest()
        self.keep = keep
        self._keep_n = inflight + 2 * ACK_OFTEN  # as sender_buffers() reserves
        #: How far frames went out (were handed to a channel): acks cannot go past it.
        self._out_index = self._out_offset = 0
        self._kept: collections.deque[_Kept] = collections.deque()
        self._resend: collections.deque[_Kept] = collections.deque()
        self._pool: list[bytearray] = []
        self._pool_bufs: list[bytearray] = []
        #: Leases of chunks not kept, by index: given back once the chunk is sealed.
        self._leases: dict[int, Lease] = {}
        #: Leases given back and chunks sealed so far: a read the device refused for
        #: want of memory tries again once either moved.
        self._returned = self._seals = 0
        self._await_seal = False
        self._loop = asyncio.get_running_loop()
        self._bind(channels)
        self.chunk = self.control.max_chunk
        self._sizes = tx_sizes(self.chunk, inflight)
        self._bufs = workers.bank.take(self._sizes)
        self._slots: asyncio.Queue[_TxSlot] = asyncio.Queue()
        self._queue: asyncio.Queue[tuple[Endpoint, int, asyncio.Future[_Sealed], _TxSlot]] = (
            asyncio.Queue())
        self._queued = 0  # frames handed to the writer and not yet sent
        self._start_writer()
        self.downtime_phase = False
        self.auto = (AutoPolicy(threads=compressor_threads(workers), cap=max_bandwidth or None)
                     if self.judges(encoder.mode, max_bandwidth, self.local) else None)
        self.bucket = TokenBucket(max_bandwidth, self._loop.time()) if max_bandwidth else None
        #: The host's ``max_bandwidth_total``, shared with the other migrations.
        self.shared = shared
        #: ``auto``: the mode of the window being read (windows are chunk index ranges
        #: of ``WINDOW``), what the window being sent has added up so far, and windows
        #: sent and waiting for the acknowledgement that measures them.
        self._win_mode = False
        self._win: _OpenWindow | None = None
        self._sent_windows: collections.deque[_OpenWindow] = collections.deque()
        self._delivered_at = 0.0
        self._measured_from: int | None = None

    def _bind(self, channels: list[Endpoint]) -> None:
        self.channels = channels
        self.control = channels[0]
        #: Every payload is a store into the destination's memory: a copy, not link time.
        self.local = all(e.writes_peer_memory for e in channels)
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
        if self.auto is not None:
            self._delivered(msg.index)

    def _forget(self, below: int) -> None:
        """The destination loaded every chunk below ``below``: fold them into the
        digest and let their buffers go."""
        kept = self._kept
        while kept and kept[0].index < below and kept[0].contrib:
            k = kept.popleft()
            self.digest.fold(k.contrib)
            if k.pooled is not None:
                self._pool.append(k.pooled)
            if k.lease is not None:
                self._give_back(k.lease)
                k.lease = None
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
            e.close()

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
        if any(e.max_chunk < self.chunk for e in channels):
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
            if self.device.lends_saved:
                lease = await self._lend(len(buf))
                views = lease.views
                held = lease if lease.held else None
                keep = (_Kept(self.index, self.offset, views, None, held) if self.keep and views
                        else None)
                if lend and len(views) == 1:
                    if keep is None and held is not None:
                        self._leases[self.index] = held
                    return views[0], keep
                # A record boundary (the encoder wants one buffer), or into ``buf``.
                n = gather(views, buf)
                if keep is None:
                    lease.release()
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

    async def _lend(self, n: int) -> Lease:
        """The device's next saving data, lent.  When all its memory is lent out, what
        kept chunks hold is copied into the keep pool and given back, or (nothing
        kept that is sealed yet) the next sealed chunk gives its lease back."""
        while True:
            # Taken before asking: a lease may come back while the device says no.
            before = (self._returned, self._seals)
            try:
                if self.device.blocking_io:
                    return await self._loop.run_in_executor(self.workers.io, self.device.lend, n)
                return self.device.lend(n)
            except LentOut:
                if await self._copy_kept():
                    continue
                self._await_seal = True
                await self.control.bus.wait_until(functools.partial(self._moved_since, before),
                                                  self.timeout, "lent chunks to come back")

    def _moved_since(self, before: tuple[int, int]) -> bool:
        return (self._returned, self._seals) != before

    async def _copy_kept(self) -> bool:
        """Copy kept chunks that are sealed (a resume may need them, the seal does
        not) out of the device's lent memory into the keep pool; False: none was."""
        copied = False
        for k in list(self._kept):
            if k.lease is None or not k.contrib:
                continue
            pooled = await self._pooled()
            if k.lease is None:  # acknowledged meanwhile: nothing to keep any more
                self._pool.append(pooled)
                continue
            n = gather(k.plain, memoryview(pooled))
            k.plain, k.pooled = [memoryview(pooled)[:n]], pooled
            self._give_back(k.lease)
            k.lease = None
            copied = True
        return copied

    def _give_back(self, lease: Lease) -> None:
        lease.release()
        self._returned += 1

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
        if self.index % self.WINDOW == 0:
            if self.auto.cap is not None:  # decided from the cap and samples, right now
                self.auto.sampled(*self.encoder.take_stats())
                self.auto.compress = self.auto.under_cap()
            self._win_mode = self.auto.compress  # a window is read in one mode
        if self._win_mode:
            return True
        # One probe chunk now and then keeps the compressor's speed and ratio measured,
        # while they matter.
        return self.index % (self.WINDOW * self.PROBE_EVERY) == 0 and self.auto.wants_probe()

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
            if self.index % self.WINDOW == 0:
                # A socket that always takes more never suspends this loop: let what
                # arrived (acknowledgements, a peer's error) be read now and then.
                await asyncio.sleep(0)
            slot = await self._slots.get()
            self.control.check()
            index = self.index if again is None else again.index
            ep = self.channels[index % len(self.channels)]
            # (No coroutine per chunk on a stream channel: it has no targets.)
            target = await self._target(ep, slot) if ep.one_sided else None
            compress = self._compress_next()
            # Over shared memory the device's bytes go straight into the destination's
            # buffer; otherwise they are sealed from wherever the device keeps them.
            mapped = None if target is None else target.view
            into = mapped if mapped is not None and not compress else memoryview(slot.plain)
            if again is None:
                want = self.chunk if budget is None else min(self.chunk, budget - sent)
                if budget is None and self.offset + want > self.announced:
                    await self.announce(max(want, self.device.stop_copy_size()))
                plain, keep = await self._read(into[:want], lend=into is not mapped)
            else:
                plain, keep = _join(again.plain, into), None
            n = len(plain)
            if n == 0:
                if target is not None:
                    ep.untarget(target)
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
            seq = ep.next_seq()
            await self._dispatch(compress, slot, (ep, slot, plain, seq, index, offset, target,
                                                  again is not None))
        await self._queue.join()
        self.control.check()
        return sent

    async def _target(self, ep: Endpoint, slot: _TxSlot) -> Target:
        """A one-sided channel's destination buffer for the next payload (the slot goes
        back if the wait for it fails)."""
        try:
            return await ep.target()
        except BaseException:
            self._slots.put_nowait(slot)
            raise

    async def _dispatch(self, compress: bool, slot: _TxSlot, args: _SealArgs) -> None:
        """Seal a chunk and send it: compressed ones on the worker pool, through the
        writer; others right here when nothing is ahead of them."""
        ep, seq = args[0], args[3]
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

    def _hand_to_writer(self, ep: Endpoint, seq: int, fut: asyncio.Future[_Sealed],
                        slot: _TxSlot) -> None:
        self._queued += 1
        self._queue.put_nowait((ep, seq, fut, slot))

    def _seal(self, ep: Endpoint, slot: _TxSlot, plain: memoryview, seq: int, index: int,
              offset: int, target: Target | None, again: bool, compress: bool) -> _Sealed:
        mapped = None if target is None else target.view
        # Pieces only into our own buffer: it has room past the payload for the cipher.
        encoding, payload = self.encoder.encode(plain, compress,
                                                pieces=mapped is None and ep.seals_pieces)
        wire = memoryview(slot.wire)
        header = wire[:HEADER_SIZE]
        sealed = ep.seal_data(seq, index, offset, encoding, payload, len(plain), header,
                              mapped if mapped is not None else wire[HEADER_SIZE:])
        if target is None:  # header and payload side by side: one buffer on the stream
            return _Sealed(header, sealed, encoding, len(plain), None, False, index, offset, again,
                           wire[:HEADER_SIZE + len(sealed)])
        return _Sealed(header, sealed, encoding, len(plain), target, mapped is not None, index,
                       offset, again)

    async def _emit(self, ep: Endpoint, seq: int, sealed: _Sealed) -> None:
        """Pace, send (in sequence order) and account for one sealed frame."""
        wire = HEADER_SIZE + len(sealed.payload)
        if self.bucket is not None:
            delay = self.bucket.delay(wire, self._loop.time())
            if delay:
                await asyncio.sleep(delay)
        if self.shared is not None:
            await self.shared.take(self, wire)
        # Taken before the frame goes: a payload written one-sided lies in the
        # destination's buffer, which may hold the next chunk once this one is loaded.
        if self.keep:
            # Folded into the digest once acknowledged; a resume seals it anew.
            self._find_kept(sealed.index).contrib = StreamDigest.part(sealed.header, sealed.payload)
        else:
            self.digest.fold_frame(sealed.header, sealed.payload)
        self._out_index = max(self._out_index, sealed.index + 1)
        self._out_offset = max(self._out_offset, sealed.offset + sealed.plain_len)
        if sealed.frame is not None:
            await ep.send_data(seq, sealed.frame)
        else:
            assert sealed.target is not None
            # The payload lands before the header that points the receiver at it.
            await ep.send_data(seq, sealed.header, PlacedWrite(
                sealed.target, None if sealed.in_place else sealed.payload, len(sealed.payload)))
        self._count(sealed)

    def _count(self, sealed: _Sealed) -> None:
        if self._leases:
            lease = self._leases.pop(sealed.index, None)
            if lease is not None:
                self._give_back(lease)
        self._seals += 1
        if self._await_seal:
            self._await_seal = False
            self.control.bus.wake.set()
        payload = sealed.payload
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
        if self.auto is not None and not sealed.again:
            self._window(sealed.index, plain_len, HEADER_SIZE + len(payload))

    def _find_kept(self, index: int) -> _Kept:
        kept = self._kept
        pos = index - kept[0].index  # kept chunks are consecutive
        k = kept[pos]
        assert k.index == index
        return k

    def _window(self, index: int, state: int, wire: int) -> None:
        """``auto``: a new chunk of window ``index // WINDOW`` went out; a full window
        waits for the acknowledgement of its last chunk, which measures it."""
        win = self._win
        if win is None:
            win = self._win = _OpenWindow(self._win_mode, self._loop.time())
            if not self._sent_windows and self._delivered_at < win.first_sent:
                self._delivered_at = win.first_sent  # the link was idle until now
        win.state += state
        win.wire += wire
        if (index + 1) % self.WINDOW == 0:
            win.end = index + 1
            self._sent_windows.append(win)
            self._win = None

    def _delivered(self, acked: int) -> None:
        """Windows whose every chunk the destination acknowledged are measured: from
        when the previous one was delivered (or this one started, if later) to now."""
        assert self.auto is not None
        now = self._loop.time()
        if self._measured_from is None:
            # The first acknowledgement ends the start-up (connections ramping up, the
            # first chunks' latency): the first window is measured from here, for the
            # part of it still to come, so that the first decision is not a window late.
            self._measured_from, self._delivered_at = acked, now
            return
        done: list[_OpenWindow] = []
        while self._sent_windows and self._sent_windows[0].end <= acked:
            done.append(self._sent_windows.popleft())
        if not done:
            return
        self.auto.sampled(*self.encoder.take_stats())
        start = max(self._delivered_at, done[0].first_sent)
        self._delivered_at = now
        # Windows one acknowledgement delivered together are measured together.
        state = wire = 0.0
        for win in done:
            share = max(0.0, min(1.0, (win.end - self._measured_from) / self.WINDOW))
            state += win.state * share
            wire += win.wire * share
        mode = done[-1].compressed
        if state <= 0 or now <= start or any(w.compressed != mode for w in done):
            return
        decided = self.auto.record(Window(compressed=mode, state_bytes=int(state),
                                          wire_bytes=int(wire), seconds=now - start))
        self.counters.auto_windows += len(done)
        self.counters.auto_compressed_windows += len(done) * mode
        log.debug("auto: windows to chunk %d (%s) delivered %.0f MB/s; reading chunk %d; "
                  "next: %s", done[-1].end, "zstd" if mode else "raw",
                  state / (now - start) / 1e6, self.index, "zstd" if decided else "raw")

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
        return End(length=self.offset, chunks=self.index,
                   digest=self.digest.value([k.contrib for k in self._kept]))

    async def close(self) -> None:
        await self._stop_writer()
        if self.shared is not None:
            self.shared.leave(self)
        self.workers.bank.give(self._sizes, self._bufs)
        for k in self._kept:
            if k.lease is not None:
                k.lease.release()
        for lease in self._leases.values():
            lease.release()
        self._leases.clear()
        self._kept.clear()
        self._resend.clear()
        self._pool.clear()
        for buf in self._pool_bufs:
            self.workers.bank.give((self.chunk,), [buf])
        self._pool_bufs = []


def compressor_threads(workers: Workers) -> int:
    """The compressor threads ``auto`` may count on: the codec pool's, at most one per
    core."""
    return max(1, min(workers.codec_threads, os.cpu_count() or 1))


def _join(pieces: list[memoryview], into: memoryview) -> memoryview:
    """A kept chunk as one buffer for the encoder: itself, or its pieces copied into ``into``."""
    if len(pieces) == 1 and pieces[0].obj is not into.obj:
        return pieces[0]
    return into[: gather(pieces, into)]
