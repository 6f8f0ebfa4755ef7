"""The queue pair: the asyncio edge of the verbs model, over a stream socket.

Posting is non-blocking and ordered: each post queues one wire message and
returns a future; completions also go to the send completion queue.  The
reader places incoming WRITE bytes straight into the registered region
(``tcp`` provider, ``recv_into`` at the checked offset) or checks the doorbell
of bytes the peer already stored in shared memory (``shm`` provider), and
reports both, and SENDs, on the receive completion queue.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import mmap
import os
import socket
from collections.abc import Callable, Sequence

from migd.errors import LinkLost, MigdError, ProtocolError, RemoteAccessError, TransportError

from .. import sockets
from ..base import Credit, wait_stalled
from . import wire
from .verbs import (
    POPULATE,
    SHM_SEALS,
    Access,
    CompletionQueue,
    CreditLedger,
    CreditQueue,
    MemoryRegion,
    Opcode,
    ProtectionDomain,
    WorkCompletion,
    anonymous_memory,
    shared_memory,
)

_MAX_FDS = 4
_IOV_MAX = 512
_STAGE = 64 << 10
#: Message bodies at least this big are received in place, not through the stage.
_DIRECT_READ = 16 << 10  # (over shm only SENDs have bodies)
_MSGS_PER_WAKEUP = 64
#: Peer regions a writer maps at most, and their total size: a peer (authenticated
#: or not yet) must not make this daemon map and populate unbounded memory.
MAX_REMOTE_REGIONS = 64
MAX_REMOTE_BYTES = 256 << 20

Buffer = bytes | bytearray | memoryview


@dataclasses.dataclass(eq=False)
class _Post:
    parts: list[memoryview]
    fut: asyncio.Future[None]
    wc: WorkCompletion | None = None
    fd: int = -1


@dataclasses.dataclass(eq=False)
class RecvCompletion(WorkCompletion):
    """A receive completion with where its bytes are: SEND data, or the landed buffer."""

    data: bytes | bytearray = b""
    buf: memoryview | None = None


class QueuePair:
    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, provider: str
                 ) -> None:
        if provider not in ("shm", "tcp"):
            raise ValueError(f"unknown rdma provider {provider!r}")
        sock.setblocking(False)
        self.provider = provider
        self.shared = provider == "shm"
        self.pd = ProtectionDomain(shared_memory if self.shared else anonymous_memory)
        self.send_cq = CompletionQueue()
        self.recv_cq = CompletionQueue()
        self.ledger = CreditLedger(self.pd)  # credits we granted: the peer writes to us
        self.credits = CreditQueue()  # credits granted to us: we write to the peer
        self.on_recv: Callable[[], None] | None = None
        self.on_eof: Callable[[], None] | None = None
        self.on_error: Callable[[BaseException], None] | None = None
        self.waited = 0.0
        #: Seconds a post may wait for the socket to take more before the pair fails.
        self.stall_timeout: float | None = None
        self._sock = sock
        self._fd = sock.fileno()
        try:
            name = sock.getpeername()
            self.peer = f"{name[0]}:{name[1]}" if isinstance(name, tuple) else name or "local"
        except OSError:
            self.peer = "?"
        self._loop = loop
        self._reader = wire.WireReader(None if self.shared else self._place)
        self._stage = memoryview(bytearray(_STAGE))
        #: Received bytes copied out of the stage (never a WRITE's over tcp).
        self.staged_bytes = 0
        self._staged = memoryview(b"")  # received, not yet parsed
        self._placing: tuple[memoryview, int] | None = None
        self._remote: dict[int, mmap.mmap] = {}
        self._fds: collections.deque[int] = collections.deque()
        self._out: collections.deque[_Post] = collections.deque()
        #: The batch being sent: its posts, the bytes still to go, a descriptor to pass.
        self._sending: tuple[list[_Post], list[memoryview], int] | None = None
        self._flushing = False
        self._reading = False
        self._closed = False
        self._error: BaseException | None = None
        self._wr_id = 0

    # --- posting ------------------------------------------------------------------

    def _next_wr(self) -> int:
        self._wr_id += 1
        return self._wr_id

    def _post(self, header: bytes, body: Sequence[Buffer] = (), opcode: Opcode | None = None,
              length: int = 0, fd: int = -1, imm: int = 0, eager: bool = True
              ) -> asyncio.Future[None]:
        """Queue one message.  ``eager``: send what the socket takes right now, so a
        post usually completes without an event-loop round trip; otherwise it waits
        to go out with the next eager post (a doorbell with the header after it).
        ``opcode``: a signaled post, completed on the send queue as well as on the
        returned future (which is all the channel awaits; nothing polls for it)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._closed:
            fut.set_exception(self._error or TransportError("queue pair closed"))
            fut.add_done_callback(_consume)
            return fut
        wc = WorkCompletion(self._next_wr(), opcode, length, imm) if opcode else None
        parts = [memoryview(header)] + [memoryview(b).cast("B") for b in body if len(b)]
        self._out.append(_Post(parts, fut, wc, fd))
        if not self._flushing:
            if eager:
                try:
                    if self._drain():
                        return fut
                except MigdError as exc:
                    self._fail(exc)
                    return fut
            self._flushing = True
            self._loop.create_task(self._flush())
        return fut

    def post_send(self, body: Sequence[Buffer], imm: int = 0, signaled: bool = False
                  ) -> asyncio.Future[None]:
        """SEND ``body`` (at most wire.MAX_SEND bytes) with immediate data ``imm``;
        ``signaled``: also complete it on the send queue (like IBV_SEND_SIGNALED)."""
        n = sum(len(b) for b in body)
        if n > wire.MAX_SEND:
            raise ValueError(f"SEND of {n} bytes exceeds {wire.MAX_SEND}")
        return self._post(wire.pack(wire.Op.SEND, imm=imm, length=n), body,
                          Opcode.SEND if signaled else None, n, imm=imm)

    def post_write(self, credit: Credit, data: memoryview | None, length: int,
                   signaled: bool = False) -> asyncio.Future[None]:
        """WRITE ``length`` bytes into ``credit``, with the credit number as immediate data.

        ``data`` None: the bytes were stored in place through :meth:`remote_view`."""
        if length > credit.length or (data is not None and len(data) != length):
            raise RemoteAccessError(f"write of {length} bytes does not fit credit #{credit.seq} "
                                    f"of {credit.length} bytes")
        body: list[Buffer] = []
        if self.shared:
            if data is not None:
                target = self.remote_view(credit)
                assert target is not None
                target[:length] = data
        else:
            if data is None:
                raise RemoteAccessError("tcp provider: nothing to write (no shared memory)")
            body = [data]
        header = wire.pack(wire.Op.WRITE, credit.rkey, credit.seq, credit.offset, length)
        return self._post(header, body, Opcode.RDMA_WRITE if signaled else None, length,
                          imm=credit.seq, eager=False)

    def post_credit(self, mr: MemoryRegion, offset: int, buf: memoryview) -> Credit:
        """Grant the peer one write of up to ``len(buf)`` bytes into ``buf``."""
        credit = self.ledger.grant(mr, offset, buf)
        fut = self._post(wire.pack(wire.Op.CREDIT, mr.rkey, credit.seq, offset, len(buf)))
        fut.add_done_callback(_consume)
        return credit

    def register(self, length: int) -> MemoryRegion:
        """A region the peer may write into; over ``shm`` it is shared with the peer now."""
        mr = self.pd.alloc_mr(length, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        if self.shared:
            fut = self._post(wire.pack(wire.Op.REGION, mr.rkey, 0, 0, length), fd=mr.fd)
            fut.add_done_callback(_consume)
        return mr

    def remote_view(self, credit: Credit) -> memoryview | None:
        """The credited bytes of the peer's region, mapped here (``shm``), else None."""
        if not self.shared:
            return None
        mem = self._remote.get(credit.rkey)
        if mem is None:
            raise RemoteAccessError(f"credit #{credit.seq} names region {credit.rkey:#010x}, "
                                    "which the peer never shared")
        return memoryview(mem)[credit.offset:credit.offset + credit.length]

    async def _flush(self) -> None:
        try:
            while not self._closed and not self._drain():
                await self._writable()
        except BaseException as exc:
            self._fail(exc if isinstance(exc, MigdError) else TransportError(str(exc)))
        finally:
            self._flushing = False

    def _drain(self) -> bool:
        """Send queued posts in order, as many per ``sendmsg`` as fit, until the socket
        is full (False) or nothing is left (True); completes the posts sent."""
        while True:
            if self._sending is None:
                if not self._out:
                    return True
                batch: list[_Post] = []
                parts: list[memoryview] = []
                for post in self._out:
                    if batch and (post.fd >= 0 or len(parts) + len(post.parts) > _IOV_MAX):
                        break  # a descriptor rides on the first byte of its own call
                    batch.append(post)
                    parts.extend(post.parts)
                self._sending = (batch, parts, batch[0].fd)
            batch, views, fd = self._sending
            while views:
                if self._closed:
                    raise self._error or TransportError("queue pair closed")
                anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                       if fd >= 0 else [])
                try:
                    n = self._sock.sendmsg(views[:_IOV_MAX], anc)
                except (BlockingIOError, InterruptedError):
                    self._sending = (batch, views, fd)
                    return False
                except OSError as exc:
                    raise sockets.lost(self.peer, "rdma send to", exc) from None
                fd = -1  # the descriptor went with the first byte
                while n:
                    if n >= len(views[0]):
                        n -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0
            self._sending = None
            for post in batch:
                self._out.popleft()
                if not post.fut.done():
                    post.fut.set_result(None)
                if post.wc is not None:  # after the future: an overrun fails the pair,
                    self.send_cq.push(post.wc)  # never leaves a post unanswered

    async def _writable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_writer(self._fd, _wake, fut)
        t0 = self._loop.time()
        try:
            await wait_stalled(fut, self.stall_timeout, lambda: TransportError(
                f"rdma peer took no data for {self.stall_timeout:g}s"))
        finally:
            self.waited += self._loop.time() - t0
            if not self._closed:
                self._loop.remove_writer(self._fd)

    # --- receiving ------------------------------------------------------------------

    def start_reading(self) -> None:
        if not self._reading and not self._closed:
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True
            if self._staged:
                self._loop.call_soon(self._readable)

    def stop_reading(self) -> None:
        if self._reading and not self._closed:
            self._loop.remove_reader(self._fd)
        self._reading = False

    def _place(self, rkey: int, imm: int, offset: int, length: int) -> memoryview:
        buf, n = self.ledger.consume(imm, rkey, offset, length)
        self._placing = (buf, n)
        return buf[:n]

    def _recv(self, buf: memoryview) -> int:
        if self.shared:
            n, anc, _, _ = self._sock.recvmsg_into([buf], socket.CMSG_SPACE(_MAX_FDS * 4))
            self._take_fds(anc)
            return n
        return self._sock.recv_into(buf)

    def _readable(self) -> None:
        """``shm``: messages (all small) come through a staging buffer, many per
        system call.  ``tcp``: every read lands where the parser wants it, so a
        WRITE's bytes go straight from the socket into the region."""
        for _ in range(_MSGS_PER_WAKEUP):
            if self._closed:
                return
            try:
                if not self._staged:
                    if not self._reading:
                        return
                    buf = self._reader.get_buffer()
                    # Over tcp every read goes where the parser wants it, so a WRITE's
                    # bytes land in the region whole; over shm all messages are small.
                    direct = not self.shared or len(buf) >= _DIRECT_READ
                    n = self._recv(buf if direct else self._stage)
                    if n == 0:
                        self._eof()
                        return
                    if direct:
                        self._reader.buffer_updated(n)
                    else:
                        self._staged = self._stage[:n]
                while self._staged:
                    buf = self._reader.get_buffer()
                    k = min(len(buf), len(self._staged))
                    self.staged_bytes += k
                    buf[:k] = self._staged[:k]
                    self._staged = self._staged[k:]
                    self._reader.buffer_updated(k)
                    for ev in self._reader.events():
                        self._event(ev)
                for ev in self._reader.events():
                    self._event(ev)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(sockets.lost(self.peer, "rdma receive from", exc))
                return
            except MigdError as exc:
                self._staged = memoryview(b"")
                self.stop_reading()
                self.credits.fail(exc)
                if self.on_error is not None:
                    self.on_error(exc)
                return
            finally:
                if self.on_recv is not None and not self._closed:
                    self.on_recv()

    def _eof(self) -> None:
        self.stop_reading()
        # No credit can come any more: a writer waiting for one must not wait forever.
        self.credits.fail(TransportError("peer closed the connection"))
        if not self._reader.idle:
            # A link that broke (as a TCP stream cut mid-frame): resumable, not a lie.
            self._fail(LinkLost("rdma: connection closed in the middle of a message"))
        elif self.on_eof is not None:
            self.on_eof()

    def _take_fds(self, anc: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)

    def _event(self, ev: wire.Event) -> None:
        if isinstance(ev, wire.Sent):
            self.recv_cq.push(RecvCompletion(0, Opcode.RECV, len(ev.data), ev.imm, data=ev.data))
        elif isinstance(ev, wire.Written):
            if self.shared:
                buf, n = self.ledger.consume(ev.imm, ev.rkey, ev.offset, ev.length)
            else:
                assert self._placing is not None
                (buf, n), self._placing = self._placing, None
            self.recv_cq.push(RecvCompletion(0, Opcode.RECV_RDMA_WITH_IMM, n, ev.imm, buf=buf))
        elif isinstance(ev, wire.Granted):
            mem = self._remote.get(ev.rkey)
            if self.shared and (mem is None or ev.offset + ev.length > len(mem)):
                raise RemoteAccessError(f"credit #{ev.imm} for {ev.length} bytes at "
                                        f"{ev.rkey:#010x}+{ev.offset} is outside every region "
                                        "the peer shared")
            self.credits.add(Credit(ev.imm, ev.rkey, ev.offset, ev.length))
        elif isinstance(ev, wire.Region):
            self._map_region(ev)

    def _map_region(self, ev: wire.Region) -> None:
        if not self.shared:
            raise ProtocolError("rdma: the tcp provider shares no regions")
        if not self._fds:
            raise ProtocolError("rdma: region announced without its descriptor")
        fd = self._fds.popleft()
        try:
            mapped = sum(len(m) for m in self._remote.values())
            if (len(self._remote) >= MAX_REMOTE_REGIONS or ev.rkey in self._remote
                    or mapped + ev.length > MAX_REMOTE_BYTES):
                raise ProtocolError(f"rdma: region {ev.rkey:#010x} of {ev.length} bytes refused "
                                    f"(duplicate, or past {MAX_REMOTE_REGIONS} regions or "
                                    f"{MAX_REMOTE_BYTES >> 20} MiB)")
            # Without these seals the peer could shrink the file under our mapping
            # and a store into it would kill this daemon with SIGBUS.
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & SHM_SEALS != SHM_SEALS or os.fstat(fd).st_size != ev.length:
                raise ProtocolError("rdma: shared region is not a sealed memfd of the "
                                    "announced size")
            # Page tables filled in one call, not one fault per page mid-stream.
            self._remote[ev.rkey] = mmap.mmap(fd, ev.length,
                                              flags=mmap.MAP_SHARED | POPULATE)
        except OSError as exc:
            raise ProtocolError(f"rdma: cannot map the shared region: {exc.strerror}") from None
        finally:
            os.close(fd)

    # --- teardown ---------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        on_error = self.on_error
        self.close()
        if on_error is not None:
            on_error(exc)

    def close(self) -> None:
        if self._closed:
            return
        self.stop_reading()
        self._closed = True
        err = self._error or TransportError("connection closed")
        self.credits.fail(err)
        while self._out:
            post = self._out.popleft()
            if not post.fut.done():
                post.fut.set_exception(err)
                post.fut.add_done_callback(_consume)
        with contextlib.suppress(Exception):
            self._loop.remove_writer(self._fd)
        self._sock.close()
        while self._fds:
            os.close(self._fds.popleft())
        self.pd.close()
        for mem in self._remote.values():
            with contextlib.suppress(BufferError):
                mem.close()
        self._remote.clear()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _consume(fut: asyncio.Future[None]) -> None:
    """Posts nobody awaits: their failure surfaces through the connection, not the loop."""
    if not fut.cancelled():
        fut.exception()
