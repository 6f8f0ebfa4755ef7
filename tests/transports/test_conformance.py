"""Transport conformance: what the pipeline relies on from any Channel, run on
every registered transport (``tcp``, ``rdma+tcp``, ``rdma+shm``).  What only
one-sided transports promise (credits, keys, bounds) is in ``test_placement``."""

from __future__ import annotations

import asyncio
import os
import tempfile
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


def local_address(name: str, directory: str) -> str:
    """Where a test listens for ``name``: loopback, or a socket path for ``shm``."""
    return os.path.join(directory, "rdma.sock") if name.endswith("shm") else "127.0.0.1:0"


async def connected(name: str) -> AsyncIterator[tuple[Channel, Channel]]:
    t = transports.REGISTRY.create(name)
    accepted: asyncio.Queue[Channel] = asyncio.Queue()

    async def handler(ch: Channel) -> None:
        await accepted.put(ch)

    with tempfile.TemporaryDirectory(prefix="migd-transport-") as wd:
        listener = await t.listen(local_address(name, wd), handler)
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


async def test_a_peer_that_stops_reading_fails_the_sender_after_the_stall_timeout(
        chans: tuple[Channel, Channel]) -> None:
    """Not a hang: a source in stop-copy must not wait forever on a wedged peer."""
    client, server = chans
    server.start(Collector())
    server.pause_reading()  # connected, alive, not reading
    client.stall_timeout = 0.3
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(TransportError, match=r"took no data for 0\.3s"):
        await asyncio.wait_for(client.send([os.urandom(64 << 20)]), 10)
    assert asyncio.get_running_loop().time() - t0 < 5


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
async def test_connect_and_listen_errors(name: str, tmp_path: pytest.TempPathFactory) -> None:
    t = transports.REGISTRY.create(name)
    listener = await t.listen(local_address(name, str(tmp_path)), lambda ch: asyncio.sleep(0))
    address = listener.address
    listener.close()
    with pytest.raises(TransportError, match="cannot connect"):
        await t.connect(address, 2)
    bad, why = (("run/x.sock", "absolute socket path") if name.endswith("shm")
                else ("127.0.0.1:x", "port 'x' is not a number"))
    with pytest.raises(ConfigError, match=why):
        await t.connect(bad, 2)
    with pytest.raises(ConfigError, match="unknown transport"):
        transports.REGISTRY.create("carrier-pigeon")


def test_addresses_name_their_transport() -> None:
    reg = transports.REGISTRY
    assert reg.split("10.0.0.1:7707") == ("tcp", "10.0.0.1:7707")
    assert reg.split("10.0.0.1:7707", "rdma") == ("rdma+tcp", "10.0.0.1:7707")
    assert reg.split("rdma://h:1") == ("rdma+tcp", "h:1")
    assert reg.split("rdma+shm:///run/migd/r.sock") == ("rdma+shm", "/run/migd/r.sock")
    assert reg.url("rdma+shm", "/r.sock") == "rdma+shm:///r.sock"
    assert reg.url("tcp", "h:1") == "tcp://h:1"  # bare only means "the default" to a reader
    assert reg.split(reg.url("tcp", "h:1"), "rdma+tcp") == ("tcp", "h:1")
    with pytest.raises(ConfigError, match="transport 'udp' unknown"):
        reg.split("udp://h:1")
    with pytest.raises(ConfigError, match="nothing after rdma://"):
        reg.split("rdma://")
