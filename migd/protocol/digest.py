"""The stream digest: what proves that the destination loaded exactly the stream sent.

Each DATA frame's authenticated header and AEAD tag are folded into a running
SHA-256 in chunk order; the end record carries the source's value, and the
destination commits only if its own matches.  A tag already covers its chunk's
bytes and header, so hashing header and tag binds every byte of the stream and
its order without hashing the bytes a second time.  Both sides fold through
this class: neither pipeline knows what a frame's tag is or where it sits."""

from __future__ import annotations

import hashlib

from ..crypto import TAG_SIZE


def sealed_size(plain: int) -> int:
    """The largest sealed payload of a chunk of ``plain`` bytes (its buffer size)."""
    return plain + TAG_SIZE


def body_size(sealed: int) -> int:
    """The ciphertext bytes of a sealed payload of ``sealed`` bytes (tag excluded)."""
    return sealed - TAG_SIZE


class StreamDigest:
    """The running digest of one stream, folded one DATA frame at a time."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    @staticmethod
    def part(header: bytes | memoryview, payload: bytes | bytearray | memoryview) -> bytes:
        """What frame (``header``, sealed ``payload``) adds to the digest: kept by a
        sender that folds it in only once the destination acknowledges the chunk."""
        return bytes(header) + bytes(memoryview(payload)[len(payload) - TAG_SIZE:])

    def fold(self, part: bytes) -> None:
        self._hash.update(part)

    def fold_frame(self, header: bytes | memoryview,
                   payload: bytes | bytearray | memoryview) -> None:
        """Fold in one frame: its header and the tag ending its sealed ``payload``."""
        self._hash.update(header)
        self._hash.update(memoryview(payload)[len(payload) - TAG_SIZE:])

    def value(self, pending: list[bytes] | tuple[bytes, ...] = ()) -> bytes:
        """The digest so far, with the ``pending`` parts after it (left unfolded)."""
        h = self._hash.copy()
        for part in pending:
            h.update(part)
        return h.digest()
