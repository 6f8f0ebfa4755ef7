"""Verbs-like objects: protection domain, memory regions, credits, completion queues.

Modelled on ibverbs (``ibv_pd``, ``ibv_mr`` with an rkey and access flags,
``ibv_cq``) so that the pipeline is written against one-sided semantics and a
real verbs provider can replace the model without touching it.  Everything
here is plain code: no sockets, no clock; the queue pair in :mod:`.qp` is the
asyncio edge.

Every remote access is checked on the side that owns the memory, in the order
a NIC checks it: the key must name a region registered for remote write, the
bytes must lie inside it, and the write must fill the credit granted next,
within its length.  A sender also checks its own writes before posting them,
so a correct peer never trips the remote check.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import fcntl
import mmap
import os
import secrets
from collections.abc import Callable

from migd.errors import RemoteAccessError, TransportError

from ..base import Credit, wait_stalled


class Access(enum.IntFlag):
    LOCAL_WRITE = 1
    REMOTE_WRITE = 2


#: Fault mappings in when they are made, not page by page mid-stream.
POPULATE = getattr(mmap, "MAP_POPULATE", 0)
#: Seals a shared region carries, so the peer can neither shrink it under our
#: mapping (a SIGBUS) nor grow it.
SHM_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@dataclasses.dataclass(eq=False)
class MemoryRegion:
    rkey: int
    buf: memoryview
    access: Access
    #: The memfd that backs it when the region is shared with the peer (shm), else -1.
    fd: int = -1

    def __len__(self) -> int:
        return len(self.buf)


Allocator = Callable[[int], tuple[mmap.mmap, int]]


def anonymous_memory(length: int) -> tuple[mmap.mmap, int]:
    """Private memory, faulted in now (fresh pages cost more on first touch mid-stream)."""
    return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | POPULATE), -1


def shared_memory(length: int) -> tuple[mmap.mmap, int]:
    """A sealed memfd, mapped here; its descriptor goes to the peer."""
    fd = os.memfd_create("migd-rdma-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, length)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SHM_SEALS)
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED | POPULATE), fd
    except BaseException:
        os.close(fd)
        raise


class ProtectionDomain:
    """This side's registered regions.  Keys are random, so a peer cannot guess
    its way into a region it was never told about."""

    MAX_REGIONS = 64

    def __init__(self, allocator: Allocator = anonymous_memory) -> None:
        self._allocate = allocator
        self._regions: dict[int, MemoryRegion] = {}
        self._maps: list[mmap.mmap] = []

    def alloc_mr(self, length: int, access: Access) -> MemoryRegion:
        if length <= 0:
            raise ValueError("a memory region needs at least one byte")
        if len(self._regions) >= self.MAX_REGIONS:
            raise TransportError(f"more than {self.MAX_REGIONS} registered regions")
        mem, fd = self._allocate(length)
        self._maps.append(mem)
        rkey = self._fresh_key()
        mr = MemoryRegion(rkey=rkey, buf=memoryview(mem), access=access, fd=fd)
        self._regions[rkey] = mr
        return mr

    def _fresh_key(self) -> int:
        while True:
            key = secrets.randbits(32)
            if key and key not in self._regions:
                return key

    def dereg_mr(self, mr: MemoryRegion) -> None:
        if self._regions.pop(mr.rkey, None) is not None and mr.fd >= 0:
            os.close(mr.fd)
            mr.fd = -1

    def check(self, rkey: int, offset: int, length: int) -> MemoryRegion:
        """The region a remote write of ``length`` bytes at ``offset`` may land in."""
        mr = self._regions.get(rkey)
        if mr is None or not mr.access & Access.REMOTE_WRITE:
            raise RemoteAccessError(f"remote write with key {rkey:#010x}, which names no region "
                                    "registered for remote write")
        if offset < 0 or length < 0 or offset + length > len(mr):
            raise RemoteAccessError(f"remote write of {length} bytes at offset {offset} is "
                                    f"outside region {rkey:#010x} ({len(mr)} bytes)")
        return mr

    def close(self) -> None:
        for mr in list(self._regions.values()):
            self.dereg_mr(mr)
        self._regions.clear()
        for mem in self._maps:
            # A buffer still referenced keeps its mapping until its last user lets go.
            with contextlib.suppress(BufferError):
                mem.close()
        self._maps.clear()


class CreditLedger:
    """The receiving side's credits: granted in order, each consumed by one write.

    ``grant`` returns the credit to announce; ``consume`` checks an arriving
    write against the oldest outstanding credit and returns the buffer it filled."""

    def __init__(self, pd: ProtectionDomain) -> None:
        self._pd = pd
        self._next = 0
        self._posted: collections.deque[tuple[Credit, memoryview]] = collections.deque()

    def __len__(self) -> int:
        return len(self._posted)

    def grant(self, mr: MemoryRegion, offset: int, buf: memoryview) -> Credit:
        credit = Credit(self._next, mr.rkey, offset, len(buf))
        self._next += 1
        self._posted.append((credit, buf))
        return credit

    def consume(self, seq: int, rkey: int, offset: int, length: int) -> tuple[memoryview, int]:
        self._pd.check(rkey, offset, length)
        if not self._posted:
            raise RemoteAccessError(f"remote write of {length} bytes with no credit posted "
                                    "(beyond the posted credits)")
        credit, buf = self._posted[0]
        if ((seq, rkey, offset) != (credit.seq & 0xFFFFFFFF, credit.rkey, credit.offset)
                or length > credit.length):
            raise RemoteAccessError(
                f"remote write #{seq} of {length} bytes at {rkey:#010x}+{offset} does not fill "
                f"credit #{credit.seq} ({credit.length} bytes at {credit.rkey:#010x}+"
                f"{credit.offset}): beyond the posted credits")
        self._posted.popleft()
        return buf, length


class CreditQueue:
    """The sending side's credits, in the order granted; :meth:`take` waits for one."""

    def __init__(self) -> None:
        self._granted: collections.deque[Credit] = collections.deque()
        self._expect = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._granted)

    def add(self, credit: Credit) -> None:
        if credit.seq != self._expect & 0xFFFFFFFF:
            raise RemoteAccessError(f"credit #{credit.seq} granted where #{self._expect} was due")
        self._expect += 1
        self._granted.append(credit)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def give_back(self, credit: Credit) -> None:
        self._granted.appendleft(credit)

    async def take(self, timeout: float | None = None,
                   stalled: Callable[[], BaseException] | None = None) -> Credit:
        """The next credit; past ``timeout`` seconds without one, ``stalled()``."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while not self._granted:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            left = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
            await wait_stalled(self._waiter, left,
                               stalled or (lambda: TransportError("no credit posted in time")))
        return self._granted.popleft()


class Opcode(enum.Enum):
    SEND = "send"
    RDMA_WRITE = "rdma-write"
    RECV = "recv"
    RECV_RDMA_WITH_IMM = "recv-rdma-with-imm"


@dataclasses.dataclass(slots=True)
class WorkCompletion:
    wr_id: int
    opcode: Opcode
    byte_len: int
    imm: int = 0
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class CompletionQueue:
    """Completions in the order the work finished; poll without waiting, or await."""

    def __init__(self, depth: int = 4096) -> None:
        self.depth = depth
        self._q: collections.deque[WorkCompletion] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def push(self, wc: WorkCompletion) -> None:
        if len(self._q) >= self.depth:
            raise TransportError(f"completion queue overrun ({self.depth} entries unpolled)")
        self._q.append(wc)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def poll(self, max_entries: int = 64) -> list[WorkCompletion]:
        out: list[WorkCompletion] = []
        while self._q and len(out) < max_entries:
            out.append(self._q.popleft())
        return out

    async def wait(self, max_entries: int = 64) -> list[WorkCompletion]:
        while not self._q:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.poll(max_entries)
