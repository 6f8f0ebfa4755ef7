"""The asyncio edge of a protocol connection: a Channel driving a Connection.

Everything protocol-shaped happens in :class:`~migd.protocol.connection.Connection`;
this class only moves its bytes, turns its events into awaitables, and applies
receive back-pressure when the data pipeline runs out of buffers.

The channels of one migration share a :class:`Bus`: the first failure on any
of them fails the migration, and silence is measured across all of them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from transports import sockets
from transports.base import Channel, Credit

from .crypto import Opener
from .errors import (
    IncompleteStream,
    LinkLost,
    MigdError,
    MigrationTimeout,
    ProtocolError,
    RemoteError,
    TransportError,
)
from .protocol.connection import Closed, Connection, Control, Data, Established, PeerFailed
from .protocol.messages import Message

M = TypeVar("M", bound=Message)


def is_link_failure(err: BaseException) -> bool:
    """A failure of the connection itself (it broke, or the peer fell silent), as
    opposed to something the peer said or sent: the former may be resumed or
    resolved over a new connection, the latter ends the migration."""
    return isinstance(err, TransportError | MigrationTimeout)


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait up to ``timeout`` s for ``event``.  Not ``asyncio.wait_for``: on 3.11 a
    cancel landing as its timeout fires comes out as TimeoutError, and a migration
    the operator cancelled would carry on."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter], timeout=timeout)
    finally:
        waiter.cancel()


class Bus:
    """What the channels of one migration share."""

    def __init__(self) -> None:
        self.error: MigdError | None = None
        self.wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        #: Loop time of the last received bytes on any channel: waits time out on
        #: silence, not on how long a migration takes.
        self.last_rx = self._loop.time()
        #: Called once when the first failure arrives (e.g. to close the other channels,
        #: so that a send blocked on one of them does not wait out its stall timeout).
        self.on_fail: Callable[[MigdError], None] | None = None

    def fail(self, err: MigdError) -> None:
        first = self.error is None
        # The peer's own reason beats what its closing did to our socket.
        if self.error is None or (isinstance(err, RemoteError)
                                  and isinstance(self.error, TransportError | IncompleteStream)):
            self.error = err
        self.wake.set()
        if first and self.on_fail is not None:
            self.on_fail(err)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    async def wait_until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for ``cond``; fail on any channel's error or after ``timeout`` s of silence."""
        start = self._loop.time()
        while not cond():
            self.check()
            self.wake.clear()
            remaining = max(start, self.last_rx) + timeout - self._loop.time()
            if remaining <= 0:
                raise MigrationTimeout(f"peer silent for {timeout:.0f}s while waiting for {what}")
            await wait_event(self.wake, remaining)


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """The receiver's buffer that the next payload on a one-sided channel goes to:
    its ``credit``, and the buffer itself (``view``) when it is mapped here."""

    credit: Credit
    view: memoryview | None


@dataclasses.dataclass(frozen=True, slots=True)
class PlacedWrite:
    """A payload written one-sided into ``target`` (RDMA-like transports):
    ``payload`` None means it was filled in place already."""

    target: Target
    payload: memoryview | None
    length: int


PayloadBuffer = bytearray | memoryview


class _Landing:
    """Where one channel's DATA payloads land, and where a used buffer goes back:
    to the free list (reading resumes if a payload waited for it), or, one-sided,
    to the peer as a credit again."""

    def __init__(self, ep: Endpoint, bufs: list[PayloadBuffer], size: int) -> None:
        self._ep = ep
        self._placement = ep.channel.placement
        self._free: collections.deque[PayloadBuffer] = collections.deque()
        self.bufs: list[PayloadBuffer]
        if self._placement is None:
            self.bufs = list(bufs)
            self._free.extend(self.bufs)
        else:
            # The payload buffers become registered memory the peer writes into; each
            # free one is a credit at the peer.
            regions = self._placement.register(size, len(bufs))
            for region in regions:
                self._placement.post(region)
            self.bufs = list(regions)

    def take(self, size: int) -> PayloadBuffer | None:
        if self._placement is not None:
            return self._placement.landed(size)
        return self._free.popleft() if self._free else None

    def give_back(self, buf: PayloadBuffer) -> None:
        if self._placement is not None:
            assert isinstance(buf, memoryview)
            self._placement.post(buf)
            return
        self._free.append(buf)
        self._ep.resume_payloads()


class Endpoint:
    def __init__(self, channel: Channel, conn: Connection, bus: Bus | None = None) -> None:
        self.channel = channel
        self.conn = conn
        self.bus = bus or Bus()
        self.established: Established | None = None
        self.on_data: Callable[[Data], None] | None = None
        #: Controls handled as they arrive (e.g. progress acks), by message type.
        self.handlers: dict[type[Message], Callable[[Any], None]] = {}
        self._controls: asyncio.Queue[Message] = asyncio.Queue()
        self._send_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._flush_pending = False
        self.peer_closed = False
        self._landing: _Landing | None = None
        conn.data_buffers = self._take_payload
        channel.start(self)

    @property
    def error(self) -> MigdError | None:
        return self.bus.error

    # --- Receiver protocol -----------------------------------------------------

    def get_buffer(self) -> memoryview:
        return self.conn.get_buffer()

    def buffer_updated(self, n: int) -> None:
        self.bus.last_rx = self._loop.time()
        self.conn.buffer_updated(n)
        self._dispatch()
        if self.established is None and self.conn.claimed:
            self.poke()  # (the handshake's first step: see migd.destination)
        if self.conn.blocked:
            self.channel.pause_reading()

    def eof_received(self) -> None:
        self.conn.receive_eof()
        self._dispatch()

    def connection_lost(self, exc: BaseException | None) -> None:
        if isinstance(exc, MigdError):
            self.fail(exc)
        elif isinstance(exc, OSError):
            self.fail(sockets.lost(self.channel.peer, "receive from", exc))
        else:
            self.fail(LinkLost(f"connection to {self.channel.peer} lost: {exc}"))

    # --- event plumbing ----------------------------------------------------------

    def fail(self, err: MigdError) -> None:
        self.bus.fail(err)

    def check(self) -> None:
        self.bus.check()

    def poke(self) -> None:
        self.bus.wake.set()

    def _dispatch(self) -> None:
        # Waiters (controls, the handshake) are woken for anything but data, which
        # wakes its own (chunks loaded): not one task switch per chunk received.
        wake = False
        for ev in self.conn.events():
            wake = wake or not isinstance(ev, Data)
            if isinstance(ev, Data):
                if self.on_data is None:
                    self.fail(ProtocolError("data before the session accepted it"))
                else:
                    try:
                        self.on_data(ev)
                    except MigdError as exc:
                        self.channel.pause_reading()
                        self.fail(exc)
            elif isinstance(ev, Control):
                handler = self.handlers.get(type(ev.msg))
                if handler is not None:
                    try:
                        handler(ev.msg)
                    except MigdError as exc:
                        self.fail(exc)
                else:
                    self._controls.put_nowait(ev.msg)
            elif isinstance(ev, Established):
                self.established = ev
            elif isinstance(ev, PeerFailed):
                self.fail(ev.error)
            elif isinstance(ev, Closed):
                self.peer_closed = True
                self.fail(LinkLost(f"peer {self.channel.peer} closed the connection"))
        if wake:
            self.poke()
        if self.conn.has_output():
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._start_flush)

    def _start_flush(self) -> None:
        self._flush_pending = False
        task = self._loop.create_task(self.flush())
        task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.fail(exc if isinstance(exc, MigdError) else TransportError(str(exc)))

    async def flush(self) -> None:
        async with self._send_lock:
            frames = self.conn.pop_ready()
            if frames:
                await self.channel.send(frames)

    # --- the data path: all the pipeline asks of a channel (never its Connection) ------------

    def land_payloads(self, bufs: list[PayloadBuffer], size: int) -> list[PayloadBuffer]:
        """Receive DATA payloads (of up to ``size`` bytes) into these buffers from now
        on; returns the buffers they will land in (registered memory replaces them
        on a one-sided channel).  Each goes back with :meth:`give_back` once used."""
        self._landing = _Landing(self, bufs, size)
        return self._landing.bufs

    def give_back(self, buf: PayloadBuffer) -> None:
        """A payload's buffer is free again (its chunk is loaded or dropped).  A
        no-op once the channel stopped landing payloads (:meth:`stop_landing`)."""
        if self._landing is not None:
            self._landing.give_back(buf)

    def stop_landing(self) -> None:
        """Land no more payloads here, and take no buffer back: the link is being
        replaced, its buffers go to the new one."""
        self._landing = None

    def _take_payload(self, size: int) -> PayloadBuffer | None:
        if self._landing is None:
            raise ProtocolError("data before the session accepted it")
        return self._landing.take(size)

    def resume_payloads(self) -> None:
        """A payload buffer came free: a payload waiting for one continues."""
        if self.conn.blocked and self.conn.unblock() and self.error is None:
            self.channel.resume_reading()

    @property
    def one_sided(self) -> bool:
        """Payloads are written into buffers this side registered (not stream bytes):
        a landed payload is ours until given back, and may be opened where it lies."""
        return self.channel.placement is not None

    @property
    def waited(self) -> float:
        """Seconds sends on this channel spent waiting for the link to take more."""
        return self.channel.waited

    def close(self) -> None:
        self.channel.close()

    @property
    def writes_peer_memory(self) -> bool:
        """Payloads are stores into the receiver's memory mapped here: moving a byte
        costs a memory copy, not link time."""
        placement = self.channel.placement
        return placement is not None and placement.maps_remote

    async def target(self) -> Target:
        """The receiver's buffer for the next payload, waiting for its credit (only on
        a channel that is :attr:`one_sided`)."""
        placement = self.channel.placement
        assert placement is not None
        credit = await placement.credit()
        return Target(credit, placement.view(credit))

    def untarget(self, target: Target) -> None:
        """Give back a target that was not written: it is the next one again."""
        placement = self.channel.placement
        assert placement is not None
        placement.unused(target.credit)

    @property
    def max_chunk(self) -> int:
        return self.conn.max_chunk

    @property
    def seals_pieces(self) -> bool:
        return self.conn.seals_pieces

    @property
    def opens_pieces(self) -> bool:
        return self.conn.opens_pieces

    def next_seq(self) -> int:
        """The sequence number of the next sealed frame: frames leave in this order."""
        return self.conn.reserve_seq()

    def seal_data(self, seq: int, index: int, offset: int, encoding: int,
                  payload: bytes | memoryview | list[memoryview], plain_len: int,
                  header_out: memoryview, payload_out: memoryview) -> memoryview:
        """Seal one chunk (any thread): its header into ``header_out``, ciphertext and
        tag into ``payload_out``; returns the sealed payload."""
        return self.conn.seal_data_into(seq, index, offset, encoding, payload, plain_len,
                                        header_out, payload_out)

    def send_data(self, seq: int, frame: memoryview, placed: PlacedWrite | None = None
                  ) -> Awaitable[None]:
        """Send sealed frame ``seq`` in sequence order.  With ``placed``, ``frame`` is its
        header only: the payload is written one-sided into the receiver's credited
        buffer first, and this is done once that write is.  (Not a coroutine of its
        own: on the stream path it is the flush itself, no extra step per chunk.)"""
        if placed is None:
            self.conn.submit(seq, frame)
            return self.flush()
        return self._send_placed(seq, frame, placed)

    async def _send_placed(self, seq: int, frame: memoryview, placed: PlacedWrite) -> None:
        placement = self.channel.placement
        assert placement is not None
        written = placement.write(placed.target.credit, placed.payload, placed.length)
        self.conn.submit(seq, frame)
        try:
            await self.flush()
        finally:
            if not written.done():  # (a done one costs no trip through the loop)
                await asyncio.wait([written])
        written.result()

    def open_data_into(self, ev: Data, out: memoryview) -> int:
        """Authenticate and decrypt a DATA payload into ``out`` (any thread)."""
        return self.conn.open_data_into(ev, out)

    def opener(self, ev: Data) -> Opener | None:
        """A piecewise opener for a DATA payload, when the cipher has one (AES-GCM)."""
        return self.conn.opener(ev)

    async def handshake(self, timeout: float) -> Established:
        await self.flush()
        await self.bus.wait_until(lambda: self.established is not None, timeout, "the handshake")
        await self.flush()
        assert self.established is not None
        return self.established

    def post_control(self, msg: Message) -> None:
        """Queue a control message from synchronous code; it goes out on the next flush."""
        if self.error is None:
            self.conn.send_control(msg)
            self._schedule_flush()

    async def send_control(self, msg: Message) -> None:
        self.check()
        self.conn.send_control(msg)
        await self.flush()

    async def expect(self, kind: type[M], timeout: float) -> M:
        await self.bus.wait_until(lambda: not self._controls.empty(), timeout,
                                  f"'{kind.T}' from the peer")
        msg = self._controls.get_nowait()
        if not isinstance(msg, kind):
            raise ProtocolError(f"expected '{kind.T}', peer sent '{msg.T}'")
        return msg

    def has_control(self) -> bool:
        return not self._controls.empty()

    def pending_control(self) -> Message | None:
        """A control message that arrived and was not handled, if any."""
        return None if self._controls.empty() else self._controls.get_nowait()

    async def next_control(self, timeout: float) -> Message:
        await self.bus.wait_until(lambda: not self._controls.empty(), timeout,
                                  "a message from the peer")
        return self._controls.get_nowait()

    async def peer_reason(self, err: MigdError, timeout: float = 1.0) -> MigdError:
        """After a connection-level failure, give the peer's error frame (often
        already in our receive buffer) a moment to arrive: it says why."""
        if isinstance(err, TransportError | IncompleteStream) and not self.peer_closed:
            deadline = self._loop.time() + timeout
            while not self.peer_closed and not isinstance(self.error, RemoteError):
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    break
                self.bus.wake.clear()
                await wait_event(self.bus.wake, remaining)
        return self.error if isinstance(self.error, RemoteError) else err

    async def abort(self, err: BaseException | None) -> None:
        """Tell the peer (best effort, bounded) and close."""
        if err is not None and not isinstance(err, TransportError | RemoteError) and not self.peer_closed:
            with contextlib.suppress(Exception):
                self.conn.send_error(err)
                await asyncio.wait_for(self.flush(), 2.0)
        self.channel.close()
