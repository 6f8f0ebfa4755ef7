"""The pipeline's two halves alone: a StreamSender and a StreamReceiver over an
in-memory channel pair (real Connections and Endpoints, no sockets, no daemons,
no session), moving a simulated VF's state byte-exact, with every compression
mode and cipher, and refusing what the end record does not vouch for."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

import backends
from backends.base import Device
from backends.states import DeviceState
from migd.codec import Encoder, parse_compress
from migd.endpoint import Endpoint
from migd.errors import IncompleteStream, IntegrityError
from migd.identity import AuthorizedKeys, Identity
from migd.pipeline import Counters, StreamReceiver, StreamSender, Workers
from migd.protocol.connection import Connection, Offer
from migd.protocol.messages import End
from migd.protocol.migration import Role

from .memory_channel import MemoryChannel, channel_pair

S = DeviceState


@dataclass
class Rig:
    src: Device
    dst: Device
    sender: StreamSender
    receiver: StreamReceiver
    src_ep: Endpoint
    dst_ep: Endpoint
    wire: MemoryChannel


def sim(name: str, content: str, size: str = "3M") -> Device:
    return backends.REGISTRY.create("sim", name, {"size": size, "content": content})


@contextlib.asynccontextmanager
async def rig(compress: str = "none", cipher: str = "aes-256-gcm",
              chunk: int = 256 << 10) -> AsyncIterator[Rig]:
    a, b = Identity.generate(), Identity.generate()
    trust = AuthorizedKeys({a.public: "src", b.public: "dst"})
    workers = Workers()
    src, dst = sim("src", "mixed"), sim("dst", "zero")
    out, back = channel_pair()
    offer = Offer(ciphers=(cipher,), max_chunk=chunk)
    src_ep = Endpoint(out, Connection(Role.SOURCE, a, trust, offer))
    dst_ep = Endpoint(back, Connection(Role.DESTINATION, b, trust, offer))
    sender: StreamSender | None = None
    receiver: StreamReceiver | None = None
    try:
        await asyncio.wait_for(asyncio.gather(src_ep.handshake(5), dst_ep.handshake(5)), 10)
        receiver = StreamReceiver(dst_ep.bus, dst, workers, Counters(),
                                                 dst_ep.conn.max_chunk, 64 << 20)
        receiver.attach(0, dst_ep)
        sender = StreamSender([src_ep], src, Encoder(parse_compress(compress)), workers,
                              Counters(), timeout=10)
        src.set_state(S.STOP_COPY)
        dst.set_state(S.RESUMING)
        yield Rig(src, dst, sender, receiver, src_ep, dst_ep, out)
    finally:
        for part in (sender, receiver):
            if part is not None:
                await part.close()
        out.close()
        back.close()
        src.close()
        dst.close()
        workers.shutdown()


async def move(r: Rig) -> End:
    await asyncio.wait_for(r.sender.send(None), 30)
    return r.sender.end_record()


@pytest.mark.parametrize("compress", ["none", "zstd:1", "auto"])
@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305", "none"])
async def test_a_device_moves_byte_exact(compress: str, cipher: str) -> None:
    async with rig(compress, cipher) as r:
        end = await move(r)
        assert end.length >= r.src.state_size() // 2  # (compression may shrink it)
        assert await asyncio.wait_for(r.receiver.finish(end, 10), 20)
        r.dst.set_state(S.RUNNING)
        assert r.dst.digest() == r.src.digest()
        assert r.receiver.next_index == end.chunks > 1  # several chunks, in order


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "none"])
async def test_the_wire_carries_ciphertext_only(cipher: str) -> None:
    async with rig("none", cipher) as r:
        memory = bytes(r.src.mem.mv)  # type: ignore[attr-defined]
        samples = [memory[o : o + 64] for o in range(0, len(memory), 4096)
                   if len(set(memory[o : o + 64])) > 32][:16]  # pages of random bytes
        await move(r)
        wire = bytes(r.wire.sent)
    assert len(samples) == 16
    seen = sum(s in wire for s in samples)
    # Device bytes never in the clear; with "none" (host-local links only) they are.
    assert seen == (16 if cipher == "none" else 0)


async def test_an_end_record_that_does_not_match_is_refused() -> None:
    async with rig() as r:
        end = await move(r)
        lie = End(length=end.length, chunks=end.chunks, digest=bytes(32))
        with pytest.raises(IntegrityError):
            await asyncio.wait_for(r.receiver.finish(lie, 10), 20)
        short = End(length=end.length + 4096, chunks=end.chunks, digest=end.digest)
        with pytest.raises((IncompleteStream, IntegrityError)):
            await asyncio.wait_for(r.receiver.finish(short, 10), 20)
        assert r.dst.state == S.RESUMING  # the receiver never starts a device


async def test_once_stopped_nothing_lands_in_the_device() -> None:
    """Before a failed destination's device is reset, the receiver stops: a chunk
    still on its way must not land after the wipe (a reset VF holds nothing)."""
    import hashlib

    async with rig() as r:
        sending = asyncio.create_task(r.sender.send(None))
        while r.receiver.next_index < 2:
            await asyncio.sleep(0.001)
        await r.receiver.stop()
        r.dst.reset()
        await asyncio.wait_for(sending, 30)  # the rest arrives, and is dropped
        await asyncio.sleep(0.05)
        assert r.receiver.next_index < r.sender.index
        assert r.dst.digest() == hashlib.sha256(bytes(r.dst.state_size())).hexdigest()
