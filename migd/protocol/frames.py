"""Frame layout: a fixed 36-byte little-endian header, then the payload.

``magic 'MG' | u8 type | u8 encoding | u32 payload_len | u64 seq | u64 index |
u64 offset | u32 plain_len``

Sealed frames (CONTROL, DATA) authenticate the whole header as AEAD associated
data, so index, offset, encoding and lengths cannot be altered in flight; their
payload is ciphertext followed by the 16-byte tag.  ``index`` and ``offset``
place a DATA chunk in the device stream whatever channel carried it.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

HEADER = struct.Struct("<2sBBIQQQI")
HEADER_SIZE = HEADER.size
MAGIC = b"MG"

#: Handshake and plain error frames are small msgpack maps.
MAX_PLAIN_PAYLOAD = 64 << 10
#: Sealed control messages.
MAX_CONTROL_PAYLOAD = 1 << 20
#: Hard ceiling on a data chunk, whatever is negotiated.
MAX_CHUNK_LIMIT = 16 << 20
DEFAULT_CHUNK = 1 << 20


class FrameType(enum.IntEnum):
    HELLO = 1
    HELLO_REPLY = 2
    AUTH = 3
    PLAIN_ERROR = 4
    CONTROL = 8
    DATA = 9


@dataclasses.dataclass(slots=True)
class Header:
    type: int
    encoding: int
    payload_len: int
    seq: int
    index: int
    offset: int
    plain_len: int

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.type, self.encoding, self.payload_len, self.seq,
                           self.index, self.offset, self.plain_len)

