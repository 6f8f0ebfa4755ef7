"""TCP transport: non-blocking sockets driven by the event loop's readiness callbacks.

Sending is ``sendmsg`` of the caller's buffers (header and payload without
joining them); receiving is ``recv_into`` the buffer the protocol asked for, so
a chunk's payload lands straight in a pooled buffer.  No per-chunk allocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence

from migd.errors import TransportError

from . import sockets
from .base import (
    REGISTRY,
    Channel,
    ChannelHandler,
    Listener,
    Receiver,
    Transport,
    stalled,
    wait_stalled,
)

_IOV_MAX = 512
_READS_PER_WAKEUP = 64


class TcpChannel(Channel):
    transport = "tcp"

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = loop
        self._receiver: Receiver | None = None
        self._reading = False
        self._paused = False
        self._closed = False
        self._write_waiter: asyncio.Future[None] | None = None
        try:
            host, port = sock.getpeername()[:2]
            self.peer = f"{host}:{port}"
            self.local = sock.getsockname()[0]
        except OSError:
            self.peer = "?"

    async def send(self, frames: Sequence[bytes | bytearray | memoryview]) -> None:
        views = [memoryview(f).cast("B") for f in frames if len(f)]
        while views:
            if self._closed:
                raise TransportError("connection closed")
            try:
                n = self._sock.sendmsg(views[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                await self._wait_writable()
                continue
            except OSError as exc:
                raise sockets.lost(self.peer, "send to", exc) from None
            while n:
                first = len(views[0])
                if n >= first:
                    n -= first
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0

    async def _wait_writable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._write_waiter = fut
        self._loop.add_writer(self._fd, self._writable)
        t0 = self._loop.time()
        try:
            await wait_stalled(fut, self.stall_timeout, lambda: stalled(self, "took no data"))
        finally:
            self.waited += self._loop.time() - t0
            self._write_waiter = None
            if not self._closed:
                self._loop.remove_writer(self._fd)

    def _writable(self) -> None:
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)

    def start(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self.resume_reading()

    def pause_reading(self) -> None:
        self._paused = True
        if self._reading and not self._closed:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        self._paused = False
        if not self._reading and not self._closed and self._receiver is not None:
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True

    def _readable(self) -> None:
        rx = self._receiver
        assert rx is not None
        for _ in range(_READS_PER_WAKEUP):
            if self._paused or self._closed:
                return
            try:
                buf = rx.get_buffer()
                n = self._sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lose(exc)
                return
            except Exception as exc:
                self._lose(exc)
                return
            if n == 0:
                self.pause_reading()
                try:
                    rx.eof_received()
                except Exception as exc:
                    self._lose(exc)
                return
            try:
                rx.buffer_updated(n)
            except Exception as exc:
                # The protocol rejected what arrived: stop reading but keep the
                # socket, so the receiver can still tell the peer why.
                self.pause_reading()
                rx.connection_lost(exc)
                return

    def _lose(self, exc: BaseException) -> None:
        rx = self._receiver
        self.close()
        if rx is not None:
            rx.connection_lost(exc)

    def close(self) -> None:
        if self._closed:
            return
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        self._closed = True
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_exception(TransportError("connection closed"))
        self._loop.remove_writer(self._fd)
        self._sock.close()


class TcpTransport(Transport):
    name = "tcp"

    async def connect(self, address: str, timeout: float) -> Channel:
        sock = await sockets.connect(address, timeout, address)
        return TcpChannel(sock, asyncio.get_running_loop())

    async def listen(self, address: str, handler: ChannelHandler) -> Listener:
        sock, bound = sockets.bind(address, address)
        loop = asyncio.get_running_loop()
        return sockets.SocketListener(sock, bound, "", lambda s, _: TcpChannel(s, loop), handler)


REGISTRY.register("tcp", TcpTransport)
