"""The pipeline's two halves alone: a StreamSender and a StreamReceiver over an
in-memory channel pair (real Connections and Endpoints, no sockets, no daemons,
no session), moving a simulated VF's state byte-exact, with every compression
mode and cipher, and refusing what the end record does not vouch for."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

import backends
from backends import mlx5
from backends.base import Device, Lease
from backends.states import DeviceState, MigCap
from migd.codec import Encoder, parse_compress
from migd.endpoint import Endpoint
from migd.errors import IncompleteStream, IntegrityError, LentOut
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
              chunk: int = 256 << 10, devices: tuple[Device, Device] | None = None,
              keep: bool = False) -> AsyncIterator[Rig]:
    a, b = Identity.generate(), Identity.generate()
    trust = AuthorizedKeys({a.public: "src", b.public: "dst"})
    workers = Workers()
    src, dst = devices or (sim("src", "mixed"), sim("dst", "zero"))
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
        receiver.ack_every = StreamSender.ack_every(src, keep)  # as the source asks
        sender = StreamSender([src_ep], src, Encoder(parse_compress(compress)), workers,
                              Counters(), timeout=10, keep=keep)
        src.set_state(S.STOP if src.caps & MigCap.P2P else S.STOP_COPY)
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


@pytest.mark.parametrize("keep", [False, True])
async def test_lent_host_buffers_come_back_whatever_holds_them(
        keep: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An mlx5 source with its two read-ahead buffers only, of 1 MiB (four chunks each):
    the chunks the pipeline holds pin both, so the device is lent out again and again.  Kept chunks (for a
    resume) are then copied into the keep pool and given back; chunks not kept come
    back once sealed.  The stream arrives whole either way."""
    monkeypatch.setattr(mlx5, "LENT_BUFFERS", 0)
    monkeypatch.setattr(mlx5, "CHUNK", 1 << 20)
    pf = f"pf-{id(monkeypatch)}-{keep}"
    src = backends.REGISTRY.create("mlx5", "src", {"pf": pf, "vhca-id": "1", "size": "24M"})
    dst = backends.REGISTRY.create("mlx5", "dst", {"pf": pf, "vhca-id": "2", "size": "24M"})
    assert isinstance(src, mlx5.Mlx5Device)
    lent_out = 0
    lend = src.lend

    def counting(limit: int) -> Lease:
        nonlocal lent_out
        try:
            return lend(limit)
        except LentOut:
            lent_out += 1
            raise
    monkeypatch.setattr(src, "lend", counting)
    encode = Encoder.encode

    def slowly(self: Encoder, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.005)  # a slow compressor: the reader runs ahead of the sealing
        return encode(self, *args, **kwargs)
    monkeypatch.setattr(Encoder, "encode", slowly)
    # zstd seals on the worker pool: chunks in flight at once hold leases.
    async with rig("zstd:1", devices=(src, dst), keep=keep) as r:
        end = await move(r)
        assert await asyncio.wait_for(r.receiver.finish(end, 10), 20)
        r.dst.set_state(S.RUNNING)
        assert r.dst.digest() == r.src.digest()
        assert lent_out > 0
        if keep:  # sealed kept chunks were copied out to free their buffers
            assert r.sender._pool_bufs
        else:  # nothing copied; every lease came back as its chunk was sealed
            assert not r.sender._pool_bufs and sum(src._lent) == 0
