"""The queue pair's wire: what one side's posted work looks like to the other.

Every message starts with a 24-byte little-endian header
``u8 op | 3 pad | u32 key | u32 imm | u64 offset | u32 length``:

* ``SEND``: ``length`` bytes follow; ``imm`` is the immediate data.
* ``WRITE`` (write with immediate): ``length`` bytes for region ``key`` at
  ``offset``; ``imm`` names the credit it fills.  Over ``tcp`` the bytes follow
  and are received straight into the region; over ``shm`` the sender already
  stored them in the shared region and the message is the doorbell.
* ``CREDIT``: the receiver grants credit ``imm``: ``length`` bytes at ``offset``
  of region ``key``.
* ``REGION`` (``shm`` only): region ``key`` of ``length`` bytes; its memfd
  travels with the message as SCM_RIGHTS.

:class:`WireReader` is sans-I/O: feed it bytes through ``get_buffer`` and
``buffer_updated``, collect :meth:`events`.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable

from migd.errors import ProtocolError

MSG = struct.Struct("<B3xIIQI")
MSG_SIZE = MSG.size
#: Largest SEND; the channel splits bigger stream writes.
MAX_SEND = 4 << 20
#: Largest region a peer may ask us to map, and largest single WRITE.
MAX_REGION = 1 << 30


class Op(enum.IntEnum):
    SEND = 1
    WRITE = 2
    CREDIT = 3
    REGION = 4


def pack(op: Op, key: int = 0, imm: int = 0, offset: int = 0, length: int = 0) -> bytes:
    return MSG.pack(op, key, imm & 0xFFFFFFFF, offset, length)


@dataclasses.dataclass(slots=True)
class Sent:
    imm: int
    data: bytes | bytearray  # the SEND's own fresh buffer, handed over without a copy


@dataclasses.dataclass(slots=True)
class Written:
    rkey: int
    imm: int
    offset: int
    length: int


@dataclasses.dataclass(slots=True)
class Granted:
    rkey: int
    imm: int
    offset: int
    length: int


@dataclasses.dataclass(slots=True)
class Region:
    rkey: int
    length: int


Event = Sent | Written | Granted | Region
#: Where an inline WRITE's bytes land: checked (key, bounds, credit) before any byte is read.
Placer = Callable[[int, int, int, int], memoryview]


class WireReader:
    def __init__(self, place: Placer | None = None) -> None:
        """``place``: writes carry their bytes (``tcp``); None: they are doorbells (``shm``)."""
        self._place = place
        self._hdr = bytearray(MSG_SIZE)
        self._got = 0
        self._body: memoryview | None = None
        self._body_got = 0
        self._cur: tuple[Op, int, int, int, int] | None = None
        self._events: list[Event] = []

    def events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    @property
    def idle(self) -> bool:
        """Between messages (EOF here is clean)."""
        return self._got == 0 and self._cur is None

    def get_buffer(self) -> memoryview:
        if self._cur is None:
            return memoryview(self._hdr)[self._got:]
        assert self._body is not None
        return self._body[self._body_got:]

    def buffer_updated(self, n: int) -> None:
        if self._cur is None:
            self._got += n
            if self._got == MSG_SIZE:
                self._got = 0
                self._header()
        else:
            self._body_got += n
        if self._cur is not None and self._body is not None and self._body_got == len(self._body):
            self._complete()

    def receive(self, data: bytes | memoryview) -> None:
        """Copying input path (tests): feed ``data`` whole."""
        mv = memoryview(data)
        while mv:
            buf = self.get_buffer()
            k = min(len(buf), len(mv))
            buf[:k] = mv[:k]
            mv = mv[k:]
            self.buffer_updated(k)

    def _header(self) -> None:
        op_code, key, imm, offset, length = MSG.unpack(self._hdr)
        try:
            op = Op(op_code)
        except ValueError:
            raise ProtocolError(f"rdma: unknown work request opcode {op_code}") from None
        if op is Op.SEND:
            if length > MAX_SEND:
                raise ProtocolError(f"rdma: SEND of {length} bytes exceeds {MAX_SEND}")
            self._body = memoryview(bytearray(length))
        elif op is Op.WRITE:
            if length > MAX_REGION:
                raise ProtocolError(f"rdma: WRITE of {length} bytes exceeds {MAX_REGION}")
            self._body = self._place(key, imm, offset, length) if self._place else None
        elif op is Op.REGION and not 0 < length <= MAX_REGION:
            raise ProtocolError(f"rdma: region of {length} bytes (limit {MAX_REGION})")
        else:
            self._body = None
        self._cur = (op, key, imm, offset, length)
        self._body_got = 0
        if self._body is None:
            self._complete()

    def _complete(self) -> None:
        assert self._cur is not None
        op, key, imm, offset, length = self._cur
        if op is Op.SEND:
            assert self._body is not None
            assert isinstance(self._body.obj, bytearray)
            self._events.append(Sent(imm, self._body.obj))
        elif op is Op.WRITE:
            self._events.append(Written(key, imm, offset, length))
        elif op is Op.CREDIT:
            self._events.append(Granted(key, imm, offset, length))
        else:
            self._events.append(Region(key, length))
        self._cur = None
        self._body = None
