"""Placement conformance: what one-sided transports promise the pipeline, on every
provider (``rdma+tcp``, ``rdma+shm``): payloads land in posted buffers in order,
a sender waits for credits, and a write with a wrong key, outside its region or
past the credits is refused by the receiver and fails the connection."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

import transports
from migd.errors import RemoteAccessError, TransportError
from transports.base import Channel, Credit, Placement
from transports.rdma import wire
from transports.rdma.transport import RdmaChannel

from .test_conformance import Collector, connected

PROVIDERS = [n for n in transports.REGISTRY.names() if n.startswith("rdma")]


@pytest.fixture(params=PROVIDERS)
async def chans(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RdmaChannel, RdmaChannel]]:
    """Connected, both reading: the server's stream into ``RX[server]``."""
    async for client, server in connected(request.param):
        assert isinstance(client, RdmaChannel) and isinstance(server, RdmaChannel)
        RX[server], RX[client] = Collector(), Collector()
        server.start(RX[server])
        client.start(RX[client])
        yield client, server
        RX.clear()


RX: dict[Channel, Collector] = {}


def placement(ch: Channel) -> Placement:
    assert ch.placement is not None
    return ch.placement


async def until(cond: object, what: str, timeout: float = 5.0) -> None:
    assert callable(cond)
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def write(tx: Placement, data: bytes) -> None:
    credit = await asyncio.wait_for(tx.credit(), 5)
    view = tx.view(credit)
    if view is not None:  # shared memory: fill in place, then ring the doorbell
        view[:len(data)] = data
        await tx.write(credit, None, len(data))
    else:
        await tx.write(credit, memoryview(data), len(data))


async def test_payloads_land_in_posted_buffers_in_order(
        chans: tuple[RdmaChannel, RdmaChannel]) -> None:
    client, server = chans
    rx = RX[server]
    bufs = placement(server).register(64 << 10, 3)
    for b in bufs:
        placement(server).post(b)
    payloads = [os.urandom(n) for n in (64 << 10, 1, 40000, 17, 64 << 10)]
    for p in payloads[:3]:
        await write(placement(client), p)
    await client.send([b"marker"])  # stream bytes follow the writes: they have landed
    await until(lambda: rx.data == b"marker", "the marker")
    landed = [placement(server).landed(len(p)) for p in payloads[:3]]
    assert [id(b) for b in landed] == [id(b) for b in bufs]  # the very objects posted
    for buf, p in zip(landed, payloads, strict=False):
        assert bytes(buf[:len(p)]) == p
    with pytest.raises(Exception, match="no write landed"):
        placement(server).landed(1)
    # buffers come back as credits, used in order again
    for b in landed[:2]:
        placement(server).post(b)
    for p in payloads[3:]:
        await write(placement(client), p)
    await client.send([b"!"])
    await until(lambda: rx.data == b"marker!", "the second marker")
    again = [placement(server).landed(len(p)) for p in payloads[3:]]
    assert [id(b) for b in again] == [id(b) for b in landed[:2]]
    assert bytes(again[1]) == payloads[4] and bytes(again[0][:17]) == payloads[3]
    assert rx.lost is None
    if not server.qp.shared:  # over tcp the payload bytes went socket -> region directly
        assert server.qp.staged_bytes == 0


async def test_a_sender_waits_for_credits(chans: tuple[RdmaChannel, RdmaChannel]) -> None:
    client, server = chans
    take = asyncio.create_task(placement(client).credit())
    await asyncio.sleep(0.1)
    assert not take.done()  # nothing posted: nothing may be written
    (buf,) = placement(server).register(4096, 1)
    placement(server).post(buf)
    credit = await asyncio.wait_for(take, 5)
    assert credit.length == 4096 and credit.seq == 0
    # a sender refuses to overrun its own credit before anything is sent
    with pytest.raises(RemoteAccessError, match="does not fit credit"):
        placement(client).write(credit, memoryview(bytes(4097)), 4097)
    # an unused credit goes back to the front of the queue
    placement(client).unused(credit)
    assert await asyncio.wait_for(placement(client).credit(), 1) == credit


async def test_a_receiver_that_posts_no_credit_fails_the_sender_in_time(
        chans: tuple[RdmaChannel, RdmaChannel]) -> None:
    client, _ = chans
    client.stall_timeout = 0.2
    with pytest.raises(TransportError, match=r"posted no credit for 0\.2s"):
        await asyncio.wait_for(placement(client).credit(), 5)


async def refused(client: RdmaChannel, server: RdmaChannel, header: bytes,
                  body: bytes = b"") -> BaseException | None:
    """Post a hand-made WRITE; what the receiver made of it."""
    rx = RX[server]
    client.qp._post(header, [body] if body and not client.qp.shared else [])
    await asyncio.wait_for(rx.eof.wait(), 5)
    return rx.lost


async def first_credit(client: RdmaChannel, server: RdmaChannel, buffers: int = 1
                       ) -> tuple[list[memoryview], Credit]:
    """``buffers`` registered 4 KiB buffers, only the first posted; its credit."""
    bufs = placement(server).register(4096, buffers)
    placement(server).post(bufs[0])
    return bufs, await asyncio.wait_for(placement(client).credit(), 5)


async def test_write_with_an_unknown_key_is_refused(
        chans: tuple[RdmaChannel, RdmaChannel]) -> None:
    client, server = chans
    (buf,), credit = await first_credit(client, server)
    bad = credit.rkey ^ 0x1
    lost = await refused(client, server, wire.pack(wire.Op.WRITE, bad, 0, 0, 100), b"x" * 100)
    assert isinstance(lost, RemoteAccessError)
    assert f"{bad:#010x}" in lost.message and "names no region" in lost.message
    assert bytes(buf[:100]) == bytes(100)  # nothing landed


async def test_write_outside_its_region_is_refused(
        chans: tuple[RdmaChannel, RdmaChannel]) -> None:
    client, server = chans
    _, credit = await first_credit(client, server)
    lost = await refused(client, server, wire.pack(wire.Op.WRITE, credit.rkey, 0, 4000, 200),
                         b"y" * 200)
    assert isinstance(lost, RemoteAccessError) and "outside region" in lost.message


async def test_write_beyond_the_posted_credits_is_refused(
        chans: tuple[RdmaChannel, RdmaChannel]) -> None:
    client, server = chans
    (_, b), credit = await first_credit(client, server, buffers=2)
    # inside the region, right key, but into the buffer that was never posted
    lost = await refused(client, server, wire.pack(wire.Op.WRITE, credit.rkey, 1, 4096, 10),
                         b"z" * 10)
    assert isinstance(lost, RemoteAccessError) and "beyond the posted credits" in lost.message
    assert bytes(b[:10]) == bytes(10)


async def test_a_second_write_into_one_credit_is_refused(
        chans: tuple[RdmaChannel, RdmaChannel]) -> None:
    client, server = chans
    rx = RX[server]
    tx = placement(client)
    _, credit = await first_credit(client, server)
    view = tx.view(credit)
    if view is not None:
        view[:5] = b"first"
    await asyncio.wait_for(tx.write(credit, None if view is not None else memoryview(b"first"), 5),
                           5)
    # replaying the same credit: the receiver has no credit left for it
    body = [b"again"] if not client.qp.shared else []
    client.qp._post(wire.pack(wire.Op.WRITE, credit.rkey, credit.seq, credit.offset, 5), body)
    await asyncio.wait_for(rx.eof.wait(), 5)
    assert isinstance(rx.lost, RemoteAccessError) and "no credit posted" in rx.lost.message


async def test_peer_death_fails_a_waiting_sender(chans: tuple[RdmaChannel, RdmaChannel]) -> None:
    client, server = chans
    lost = RX[client]
    take = asyncio.create_task(placement(client).credit())
    await asyncio.sleep(0.05)
    server.close()
    with pytest.raises(TransportError):
        await asyncio.wait_for(take, 5)
    await asyncio.wait_for(lost.eof.wait(), 5)  # and the stream side heard of it
