"""The ``rdma`` transport: migd's Channel on top of a queue pair.

The byte stream (handshake, control frames, DATA headers) travels as SENDs;
DATA payloads travel as one-sided WRITEs into buffers the receiver registered
and posted as credits (:class:`~transports.base.Placement`).  Providers:

* ``rdma+shm:///path/to.sock``: both daemons on one host.  Regions are memfds
  handed over the Unix socket; the sender stores payloads straight into the
  receiver's buffers and the socket carries only doorbells.
* ``rdma+tcp://host:port`` (or ``rdma://``): software RDMA; every WRITE carries
  key and offset and the receiver ``recv_into``\\ s it at that place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Sequence

from migd.errors import ConfigError, ProtocolError

from .. import sockets
from ..base import (
    REGISTRY,
    Channel,
    ChannelHandler,
    Credit,
    Listener,
    Placement,
    Receiver,
    Transport,
    stalled,
)
from . import wire
from .qp import QueuePair, RecvCompletion
from .verbs import MemoryRegion, Opcode


class RdmaChannel(Channel, Placement):
    def __init__(self, qp: QueuePair, peer: str) -> None:
        self.qp = qp
        self.peer = peer
        self.placement = self
        self.maps_remote = qp.shared
        self.transport = f"rdma+{qp.provider}"
        self._receiver: Receiver | None = None
        self._paused = False
        self._pending = memoryview(b"")  # SEND bytes not yet taken by a paused receiver
        self._landed: collections.deque[tuple[memoryview, int]] = collections.deque()
        #: Registered buffer (by id) -> its region and offset; holding the buffer
        #: itself keeps its id from being reused.
        self._where: dict[int, tuple[MemoryRegion, int, memoryview]] = {}
        self._credit_wait = 0.0
        qp.on_recv = self._dispatch
        qp.on_eof = self._eof
        qp.on_error = self._error

    @property
    def waited(self) -> float:  # type: ignore[override]
        return self.qp.waited + self._credit_wait

    @property
    def stall_timeout(self) -> float | None:
        return self.qp.stall_timeout

    @stall_timeout.setter
    def stall_timeout(self, seconds: float | None) -> None:
        self.qp.stall_timeout = seconds

    # --- Channel ----------------------------------------------------------------------

    async def send(self, frames: Sequence[bytes | bytearray | memoryview]) -> None:
        batch: list[bytes | bytearray | memoryview] = []
        size = 0
        last: asyncio.Future[None] | None = None
        for f in frames:
            view = memoryview(f).cast("B")
            while view:
                k = min(len(view), wire.MAX_SEND - size)
                batch.append(view[:k])
                size += k
                view = view[k:]
                if size == wire.MAX_SEND:
                    last = self.qp.post_send(batch)
                    batch, size = [], 0
        if batch:
            last = self.qp.post_send(batch)
        if last is not None:
            await last  # posts complete in order: the last done means all are

    def start(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self.resume_reading()

    def pause_reading(self) -> None:
        self._paused = True
        self.qp.stop_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self._receiver is not None:
            self._dispatch()
            if not self._paused:
                self.qp.start_reading()

    def close(self) -> None:
        self.qp.close()

    # --- receive completions -> the receiver ------------------------------------------------

    def _dispatch(self) -> None:
        rx = self._receiver
        if rx is None:
            return
        while not self._paused:
            if self._pending:
                try:
                    buf = rx.get_buffer()
                    k = min(len(buf), len(self._pending))
                    buf[:k] = self._pending[:k]
                    self._pending = self._pending[k:]
                    rx.buffer_updated(k)
                except Exception as exc:
                    # Refused what arrived: stop, but keep the way back open (as TCP does).
                    self.pause_reading()
                    rx.connection_lost(exc)
                    return
                continue
            wcs = self.qp.recv_cq.poll(1)
            if not wcs:
                return
            wc = wcs[0]
            assert isinstance(wc, RecvCompletion)
            if wc.opcode is Opcode.RECV_RDMA_WITH_IMM:
                assert wc.buf is not None
                self._landed.append((wc.buf, wc.byte_len))
            else:
                self._pending = memoryview(wc.data)

    def _eof(self) -> None:
        self._dispatch()
        if self._receiver is not None:
            try:
                self._receiver.eof_received()
            except Exception as exc:
                self._error(exc)

    def _error(self, exc: BaseException) -> None:
        self.pause_reading()
        if self._receiver is not None:
            self._receiver.connection_lost(exc)

    # --- Placement ----------------------------------------------------------------------

    def register(self, size: int, count: int) -> list[memoryview]:
        mr = self.qp.register(size * count)
        out = []
        for i in range(count):
            buf = mr.buf[i * size:(i + 1) * size]
            self._where[id(buf)] = (mr, i * size, buf)
            out.append(buf)
        return out

    def post(self, buf: memoryview) -> None:
        mr, offset, _ = self._where[id(buf)]
        self.qp.post_credit(mr, offset, buf)

    def landed(self, length: int) -> memoryview:
        if not self._landed:
            raise ProtocolError(f"a DATA header for {length} bytes, but no write landed for it")
        buf, n = self._landed.popleft()
        if n != length:
            raise ProtocolError(f"a DATA header for {length} bytes, but its write carried {n}")
        return buf

    async def credit(self) -> Credit:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            return await self.qp.credits.take(self.stall_timeout,
                                              lambda: stalled(self, "posted no credit"))
        finally:
            self._credit_wait += loop.time() - t0

    def unused(self, credit: Credit) -> None:
        self.qp.credits.give_back(credit)

    def view(self, credit: Credit) -> memoryview | None:
        return self.qp.remote_view(credit)

    def write(self, credit: Credit, data: memoryview | None, length: int
              ) -> asyncio.Future[None]:
        return self.qp.post_write(credit, data, length)


class RdmaTransport(Transport):
    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.name = f"rdma+{provider}"
        # Over shared memory both ends are on this host, behind a root-only socket.
        self.leaves_host = provider != "shm"

    def _path(self, address: str) -> str:
        path = address if address.startswith("/") else ""
        if not path or "\0" in path:
            raise ConfigError(f"rdma+shm address {address!r}: give an absolute socket path "
                              "(rdma+shm:///run/migd/rdma.sock)")
        return path

    async def connect(self, address: str, timeout: float) -> Channel:
        shm = self.provider == "shm"
        where = self._path(address) if shm else address
        sock = await sockets.connect(where, timeout, f"{self.name}://{address}", unix=shm)
        return self._channel(sock, where)

    def _channel(self, sock: socket.socket, peer: str) -> RdmaChannel:
        local = ""
        if self.provider == "tcp":
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                local = sock.getsockname()[0]
        channel = RdmaChannel(QueuePair(sock, asyncio.get_running_loop(), self.provider), peer)
        channel.local = local
        return channel

    async def listen(self, address: str, handler: ChannelHandler) -> Listener:
        shm = self.provider == "shm"
        where = self._path(address) if shm else address
        sock, bound = sockets.bind(where, f"{self.name}://{address}", unix=shm)
        return sockets.SocketListener(sock, bound, where if shm else "", self._channel, handler)


REGISTRY.register("rdma+tcp", lambda: RdmaTransport("tcp"), "rdma")
REGISTRY.register("rdma+shm", lambda: RdmaTransport("shm"))
