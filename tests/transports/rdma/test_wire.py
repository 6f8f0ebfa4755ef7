"""The queue pair's wire parser, sans I/O: fed whole, a byte at a time, and with
trailing garbage."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from migd.errors import ProtocolError, RemoteAccessError
from transports.rdma import wire

Feeder = Callable[[wire.WireReader, bytes], list[wire.Event]]


def whole(r: wire.WireReader, data: bytes) -> list[wire.Event]:
    r.receive(data)
    return r.events()


def bytewise(r: wire.WireReader, data: bytes) -> list[wire.Event]:
    out: list[wire.Event] = []
    for i in range(len(data)):
        r.receive(data[i:i + 1])
        out += r.events()
    return out


FEEDERS = [whole, bytewise]
STREAM = (wire.pack(wire.Op.SEND, imm=7, length=5) + b"hello"
          + wire.pack(wire.Op.CREDIT, 0xABC, 3, 4096, 1024)
          + wire.pack(wire.Op.WRITE, 0xABC, 3, 4096, 6) + b"world!"
          + wire.pack(wire.Op.SEND, length=0)
          + wire.pack(wire.Op.REGION, 0xABC, 0, 0, 8192))


class Region:
    """A receive region the parser places inline WRITEs into."""

    def __init__(self) -> None:
        self.mem = bytearray(8192)
        self.asked: list[tuple[int, int, int, int]] = []

    def place(self, rkey: int, imm: int, offset: int, length: int) -> memoryview:
        self.asked.append((rkey, imm, offset, length))
        if rkey != 0xABC:
            raise RemoteAccessError("bad key")
        return memoryview(self.mem)[offset:offset + length]


@pytest.mark.parametrize("feed", FEEDERS)
def test_messages_and_inline_writes(feed: Feeder) -> None:
    region = Region()
    r = wire.WireReader(region.place)
    events = feed(r, STREAM)
    assert events == [wire.Sent(7, b"hello"), wire.Granted(0xABC, 3, 4096, 1024),
                      wire.Written(0xABC, 3, 4096, 6), wire.Sent(0, b""),
                      wire.Region(0xABC, 8192)]
    assert bytes(region.mem[4096:4102]) == b"world!" and region.asked == [(0xABC, 3, 4096, 6)]
    assert r.idle


@pytest.mark.parametrize("feed", FEEDERS)
def test_doorbell_writes_carry_no_bytes(feed: Feeder) -> None:
    r = wire.WireReader(None)  # shm: the bytes are already in shared memory
    stream = wire.pack(wire.Op.WRITE, 0xABC, 3, 4096, 6) + wire.pack(wire.Op.SEND, length=1) + b"x"
    assert feed(r, stream) == [wire.Written(0xABC, 3, 4096, 6), wire.Sent(0, b"x")]


@pytest.mark.parametrize("feed", FEEDERS)
def test_trailing_garbage_is_refused(feed: Feeder) -> None:
    r = wire.WireReader(Region().place)
    with pytest.raises(ProtocolError, match="unknown work request opcode 77"):
        feed(r, STREAM + bytes([77]) + bytes(30))


def test_a_message_cut_short_is_not_idle() -> None:
    r = wire.WireReader(None)
    r.receive(wire.pack(wire.Op.SEND, length=10) + b"abc")
    assert not r.idle and r.events() == []


def test_limits() -> None:
    with pytest.raises(ProtocolError, match=r"SEND of \d+ bytes exceeds"):
        wire.WireReader(None).receive(wire.pack(wire.Op.SEND, length=wire.MAX_SEND + 1))
    with pytest.raises(ProtocolError, match="region of 0 bytes"):
        wire.WireReader(None).receive(wire.pack(wire.Op.REGION, 1, 0, 0, 0))
    # a write the placer refuses is refused before any of its bytes is read
    region = Region()
    r = wire.WireReader(region.place)
    with pytest.raises(RemoteAccessError):
        r.receive(wire.pack(wire.Op.WRITE, 0xBAD, 0, 0, 4))
