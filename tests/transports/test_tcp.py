"""Transport conformance: what the pipeline relies on from any Channel.

Parametrized by transport name so the RDMA-like transport (issue 4) runs the
same suite."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

import transports
from migd.errors import ConfigError, TransportError
from transports.base import Channel


class Collector:
    """A Receiver that accepts data into buffers it owns, in odd sizes."""

    def __init__(self, bufsize: int = 7919) -> None:
        self.data = bytearray()
        self.buf = bytearray(bufsize)
        self.eof = asyncio.Event()
        self.lost: BaseException | None = None
        self.fail_after: int | None = None

    def get_buffer(self) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, n: int) -> None:
        self.data += self.buf[:n]
        if self.fail_after is not None and len(self.data) >= self.fail_after:
            raise ValueError("receiver refuses")

    def eof_received(self) -> None:
        self.eof.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc
        self.eof.set()


NAMES = transports.REGISTRY.names()


async def connected(name: str) -> AsyncIterator[tuple[Channel, Channel]]:
    t = transports.REGISTRY.create(name)
    accepted: asyncio.Queue[Channel] = asyncio.Queue()

    async def handler(ch: Channel) -> None:
        await accepted.put(ch)

    listener = await t.listen("127.0.0.1:0", handler)
    client = await t.connect(listener.address, 5)
    server = await asyncio.wait_for(accepted.get(), 5)
    try:
        yield client, server
    finally:
        client.close()
        server.close()
        listener.close()


@pytest.fixture(params=NAMES)
async def chans(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Channel, Channel]]:
    async for pair in connected(request.param):
        yield pair


async def test_bytes_arrive_in_order(chans: tuple[Channel, Channel]) -> None:
    client, server = chans
    rx = Collector()
    server.start(rx)
    frames = [os.urandom(n) for n in (1, 36, 4096, 1 << 20, 3, (1 << 20) + 17)]
    await client.send([memoryview(f) for f in frames])
    await client.send([b"", bytearray(b"tail")])
    client.close()
    await asyncio.wait_for(rx.eof.wait(), 10)
    assert bytes(rx.data) == b"".join(frames) + b"tail"
    assert rx.lost is None


async def test_backpressure_holds_the_sender(chans: tuple[Channel, Channel]) -> None:
    client, server = chans
    rx = Collector()
    server.start(rx)
    server.pause_reading()
    big = os.urandom(64 << 20)
    send = asyncio.create_task(client.send([big]))
    await asyncio.sleep(0.3)
    assert not send.done()  # socket buffers are full: the send waits, memory does not grow
    server.resume_reading()
    await asyncio.wait_for(send, 20)
    while len(rx.data) < len(big):
        await asyncio.sleep(0.01)
    assert rx.data == big


async def test_peer_death_mid_stream(chans: tuple[Channel, Channel]) -> None:
    client, server = chans
    server.start(Collector())
    server.pause_reading()
    send = asyncio.create_task(client.send([os.urandom(64 << 20)]))
    await asyncio.sleep(0.1)
    server.close()
    with pytest.raises(TransportError):
        await asyncio.wait_for(send, 10)


async def test_receiver_refusal_keeps_the_way_back_open(chans: tuple[Channel, Channel]) -> None:
    client, server = chans
    rx = Collector()
    rx.fail_after = 10
    server.start(rx)
    await client.send([b"x" * 100])
    await asyncio.wait_for(rx.eof.wait(), 5)
    assert isinstance(rx.lost, ValueError)
    back = Collector()
    client.start(back)
    await server.send([b"why"])  # the refusing side can still explain itself
    server.close()
    await asyncio.wait_for(back.eof.wait(), 5)
    assert back.data == b"why"


@pytest.mark.parametrize("name", NAMES)
async def test_connect_and_listen_errors(name: str) -> None:
    t = transports.REGISTRY.create(name)
    listener = await t.listen("127.0.0.1:0", lambda ch: asyncio.sleep(0))
    address = listener.address
    listener.close()
    with pytest.raises(TransportError, match="cannot connect"):
        await t.connect(address, 2)
    with pytest.raises(ConfigError, match="port 'x' is not a number"):
        await t.connect("127.0.0.1:x", 2)
    with pytest.raises(ConfigError, match="unknown transport"):
        transports.REGISTRY.create("carrier-pigeon")
