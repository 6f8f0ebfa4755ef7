"""The endpoint's receive buffers: payloads land only in buffers the pipeline gave
it, one call hands a used buffer back (and a payload that waited for it goes on),
and a channel being replaced takes nothing back.  Real Connections over an
in-memory channel pair."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from migd.codec import Encoding
from migd.endpoint import Endpoint
from migd.errors import ProtocolError
from migd.identity import AuthorizedKeys, Identity
from migd.protocol.connection import Connection, Data, Offer
from migd.protocol.digest import sealed_size
from migd.protocol.frames import HEADER_SIZE
from migd.protocol.migration import Role

from .pipeline.memory_channel import channel_pair

CHUNK = 4096


@contextlib.asynccontextmanager
async def pair() -> AsyncIterator[tuple[Endpoint, Endpoint, list[Data]]]:
    a, b = Identity.generate(), Identity.generate()
    trust = AuthorizedKeys({a.public: "src", b.public: "dst"})
    offer = Offer(max_chunk=CHUNK)
    out, back = channel_pair()
    src = Endpoint(out, Connection(Role.SOURCE, a, trust, offer))
    dst = Endpoint(back, Connection(Role.DESTINATION, b, trust, offer))
    arrived: list[Data] = []
    dst.on_data = arrived.append
    try:
        await asyncio.wait_for(asyncio.gather(src.handshake(5), dst.handshake(5)), 10)
        yield src, dst, arrived
    finally:
        out.close()
        back.close()


async def send_chunk(src: Endpoint, index: int, fill: int) -> None:
    plain = bytes([fill]) * CHUNK
    wire = memoryview(bytearray(HEADER_SIZE + sealed_size(CHUNK)))
    seq = src.next_seq()
    sealed = src.seal_data(seq, index, index * CHUNK, Encoding.RAW, plain, CHUNK,
                           wire[:HEADER_SIZE], wire[HEADER_SIZE:])
    await src.send_data(seq, wire[: HEADER_SIZE + len(sealed)])


async def settle(cond: object, what: str) -> None:
    for _ in range(200):
        if callable(cond) and cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(what)


async def test_data_before_the_pipeline_gave_buffers_is_refused() -> None:
    async with pair() as (src, dst, arrived):
        await send_chunk(src, 0, 1)
        await settle(lambda: dst.error is not None, "the endpoint never failed")
        assert isinstance(dst.error, ProtocolError)
        assert "data before the session accepted it" in str(dst.error)
        assert arrived == []


async def test_a_payload_waits_for_a_buffer_and_goes_on_when_one_is_given_back() -> None:
    async with pair() as (src, dst, arrived):
        (only,) = dst.land_payloads([bytearray(sealed_size(CHUNK))], sealed_size(CHUNK))
        await send_chunk(src, 0, 1)
        await send_chunk(src, 1, 2)
        await settle(lambda: len(arrived) == 1, "the first chunk never arrived")
        await asyncio.sleep(0.05)
        assert len(arrived) == 1  # the second waits: its payload has nowhere to land
        assert arrived[0].buf is only
        first = bytes(arrived[0].sealed)
        dst.give_back(arrived[0].buf)
        await settle(lambda: len(arrived) == 2, "the second chunk never went on")
        assert arrived[1].buf is only and arrived[1].header.index == 1
        assert bytes(arrived[1].sealed) != first
        out = bytearray(CHUNK)
        assert dst.open_data_into(arrived[1], memoryview(out)) == CHUNK
        assert out == bytes([2]) * CHUNK
        assert dst.error is None


async def test_a_channel_that_stopped_landing_takes_no_buffer_back() -> None:
    async with pair() as (src, dst, arrived):
        (only,) = dst.land_payloads([bytearray(sealed_size(CHUNK))], sealed_size(CHUNK))
        await send_chunk(src, 0, 1)
        await send_chunk(src, 1, 2)
        await settle(lambda: len(arrived) == 1, "the first chunk never arrived")
        dst.stop_landing()  # the link is being replaced: its buffers go elsewhere
        dst.give_back(only)
        await asyncio.sleep(0.05)
        assert len(arrived) == 1


@pytest.mark.parametrize("size", [1, CHUNK])
async def test_a_payload_is_opened_from_its_body_and_tag(size: int) -> None:
    async with pair() as (src, dst, arrived):
        dst.land_payloads([bytearray(sealed_size(CHUNK))], sealed_size(CHUNK))
        wire = memoryview(bytearray(HEADER_SIZE + sealed_size(CHUNK)))
        seq = src.next_seq()
        sealed = src.seal_data(seq, 0, 0, Encoding.RAW, b"x" * size, size,
                               wire[:HEADER_SIZE], wire[HEADER_SIZE:])
        await src.send_data(seq, wire[: HEADER_SIZE + len(sealed)])
        await settle(lambda: len(arrived) == 1, "the chunk never arrived")
        ev = arrived[0]
        assert ev.body_len == size and bytes(ev.body) + bytes(ev.tag) == bytes(sealed)
        assert bytes(ev.sealed) == bytes(sealed)
