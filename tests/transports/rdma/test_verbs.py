"""Verbs objects: key and bounds checks, credits in order, completion queues, and
the shared regions a writer agrees to map."""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import resource
import socket
from typing import Any

import pytest

from migd.errors import ProtocolError, RemoteAccessError, TransportError
from transports.base import Credit
from transports.rdma import wire
from transports.rdma.qp import QueuePair
from transports.rdma.verbs import (
    SHM_SEALS,
    Access,
    CompletionQueue,
    CreditLedger,
    CreditQueue,
    Opcode,
    ProtectionDomain,
    WorkCompletion,
    anonymous_memory,
    shared_memory,
)


@pytest.mark.parametrize("allocate", [shared_memory, anonymous_memory])
def test_regions_are_faulted_in_when_made(allocate: Any) -> None:
    """A store into a fresh region mid-stream costs no page fault: it was populated."""
    mem, fd = allocate(4 << 20)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for offset in range(0, len(mem), 4096):
            mem[offset] = 1
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        assert faults < 16, f"{faults} page faults storing into 1024 populated pages"
    finally:
        mem.close()
        if fd >= 0:
            os.close(fd)


def test_protection_domain_checks_key_access_and_bounds() -> None:
    pd = ProtectionDomain()
    mr = pd.alloc_mr(8192, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
    local = pd.alloc_mr(4096, Access.LOCAL_WRITE)
    assert mr.rkey != local.rkey and len(mr) == 8192
    assert pd.check(mr.rkey, 4096, 4096) is mr
    with pytest.raises(RemoteAccessError, match="names no region"):
        pd.check(mr.rkey ^ 1, 0, 1)
    with pytest.raises(RemoteAccessError, match="names no region"):
        pd.check(local.rkey, 0, 1)  # registered, but not for remote write
    with pytest.raises(RemoteAccessError, match="outside region"):
        pd.check(mr.rkey, 8000, 193)
    pd.dereg_mr(mr)
    with pytest.raises(RemoteAccessError, match="names no region"):
        pd.check(mr.rkey, 0, 1)
    pd.close()


def test_ledger_consumes_credits_in_order_and_exactly() -> None:
    pd = ProtectionDomain()
    mr = pd.alloc_mr(4096 * 3, Access.REMOTE_WRITE)
    ledger = CreditLedger(pd)
    bufs = [mr.buf[i * 4096:(i + 1) * 4096] for i in range(3)]
    c0, c1 = (ledger.grant(mr, i * 4096, bufs[i]) for i in range(2))
    assert (c0.seq, c1.seq) == (0, 1) and len(ledger) == 2
    with pytest.raises(RemoteAccessError, match="does not fill credit #0"):
        ledger.consume(c1.seq, mr.rkey, c1.offset, 10)  # out of order
    with pytest.raises(RemoteAccessError, match="does not fill credit #0"):
        ledger.consume(c0.seq, mr.rkey, c0.offset, 4097)  # longer than the credit
    buf, n = ledger.consume(c0.seq, mr.rkey, c0.offset, 100)
    assert buf is bufs[0] and n == 100
    ledger.consume(c1.seq, mr.rkey, c1.offset, 4096)
    with pytest.raises(RemoteAccessError, match="no credit posted"):
        ledger.consume(2, mr.rkey, 8192, 1)  # inside the region, never posted
    pd.close()


async def test_credit_queue_order_give_back_and_failure() -> None:
    q = CreditQueue()
    with pytest.raises(RemoteAccessError, match="#1 granted where #0 was due"):
        q.add(Credit(1, 5, 0, 10))
    waiting = asyncio.create_task(q.take())
    await asyncio.sleep(0)
    assert not waiting.done()
    c0 = Credit(0, 5, 0, 10)
    q.add(c0)
    assert await asyncio.wait_for(waiting, 1) == c0
    q.add(Credit(1, 5, 10, 10))
    q.give_back(c0)
    assert await q.take() == c0
    later = asyncio.create_task(q.take())
    assert (await later).seq == 1
    stuck = asyncio.create_task(q.take())
    await asyncio.sleep(0)
    q.fail(TransportError("gone"))
    with pytest.raises(TransportError, match="gone"):
        await asyncio.wait_for(stuck, 1)


async def test_completion_queue_poll_wait_and_overrun() -> None:
    cq = CompletionQueue(depth=2)
    assert cq.poll() == []
    waiter = asyncio.create_task(cq.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    cq.push(WorkCompletion(1, Opcode.SEND, 10))
    cq.push(WorkCompletion(2, Opcode.RDMA_WRITE, 20, imm=3))
    got = await asyncio.wait_for(waiter, 1)
    assert [(w.wr_id, w.opcode, w.imm, w.ok) for w in got] == [
        (1, Opcode.SEND, 0, True), (2, Opcode.RDMA_WRITE, 3, True)]
    cq.push(WorkCompletion(3, Opcode.RECV, 1))
    cq.push(WorkCompletion(4, Opcode.RECV, 1))
    with pytest.raises(TransportError, match="overrun"):
        cq.push(WorkCompletion(5, Opcode.RECV, 1))


async def test_posts_complete_on_the_send_queue() -> None:
    a, b = socket.socketpair()
    loop = asyncio.get_running_loop()
    qa, qb = QueuePair(a, loop, "tcp"), QueuePair(b, loop, "tcp")
    try:
        qb.start_reading()
        await qa.post_send([b"ping"], imm=42, signaled=True)
        (wc,) = await asyncio.wait_for(qa.send_cq.wait(), 2)
        assert wc.opcode is Opcode.SEND and wc.byte_len == 4 and wc.imm == 42
        (rc,) = await asyncio.wait_for(qb.recv_cq.wait(), 2)
        assert rc.opcode is Opcode.RECV and rc.imm == 42 and rc.byte_len == 4
    finally:
        qa.close()
        qb.close()


def memfd(size: int, seals: int) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.mark.parametrize("seals, size, announced, why", [
    (0, 8192, 8192, "not a sealed memfd"),  # could be shrunk under us: SIGBUS
    (SHM_SEALS, 8192, 16384, "not a sealed memfd of the announced size"),
    (SHM_SEALS, 257 << 20, 257 << 20, "past 64 regions or 256 MiB"),  # no memory bomb
])
async def test_a_writer_maps_only_sealed_regions_of_the_announced_size(
        seals: int, size: int, announced: int, why: str) -> None:
    a, b = socket.socketpair()
    qp = QueuePair(a, asyncio.get_running_loop(), "shm")
    errors: list[BaseException] = []
    qp.on_error = errors.append
    qp.start_reading()
    fd = memfd(size, seals)
    try:
        b.sendmsg([wire.pack(wire.Op.REGION, 0x1234, 0, 0, announced)],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        for _ in range(200):
            if errors:
                break
            await asyncio.sleep(0.01)
        assert len(errors) == 1 and isinstance(errors[0], ProtocolError)
        assert why in str(errors[0])
    finally:
        os.close(fd)
        qp.close()
        b.close()


async def test_credits_must_lie_in_a_shared_region() -> None:
    a, b = socket.socketpair()
    qp = QueuePair(a, asyncio.get_running_loop(), "shm")
    errors: list[BaseException] = []
    qp.on_error = errors.append
    qp.start_reading()
    mem, fd = shared_memory(8192)
    try:
        b.sendmsg([wire.pack(wire.Op.REGION, 0x1234, 0, 0, 8192)],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        b.send(wire.pack(wire.Op.CREDIT, 0x1234, 0, 0, 4096))
        credit = await asyncio.wait_for(qp.credits.take(), 2)
        view = qp.remote_view(credit)
        assert view is not None and len(view) == 4096
        view[:3] = b"abc"
        assert mem[:3] == b"abc"  # the same memory, seen from both sides
        b.send(wire.pack(wire.Op.CREDIT, 0x1234, 1, 6000, 4096))  # runs past the region
        for _ in range(200):
            if errors:
                break
            await asyncio.sleep(0.01)
        assert isinstance(errors[0], RemoteAccessError)
        assert "outside every region the peer shared" in str(errors[0])
    finally:
        del view
        os.close(fd)
        qp.close()
        b.close()


async def test_unsignaled_posts_leave_the_send_queue_alone() -> None:
    """The channel awaits its posts and never polls the send queue: posts are unsignaled
    (as with verbs' IBV_SEND_SIGNALED unset), or a long migration would overrun it."""
    a, b = socket.socketpair()
    loop = asyncio.get_running_loop()
    qa, qb = QueuePair(a, loop, "tcp"), QueuePair(b, loop, "tcp")
    try:
        qb.start_reading()
        def drain() -> None:
            qb.recv_cq.poll(1 << 16)
        qb.on_recv = drain
        for _ in range(qa.send_cq.depth + 10):
            await qa.post_send([b"x"])
        assert qa.send_cq.poll() == []
        await qa.post_send([b"y"], signaled=True)
        (wc,) = qa.send_cq.poll()
        assert wc.opcode is Opcode.SEND and wc.byte_len == 1
    finally:
        qa.close()
        qb.close()
