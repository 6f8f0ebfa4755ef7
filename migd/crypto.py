"""AEAD ciphers (a registry with a default) and the session key schedule.

Nonces are never reused: each direction has its own key, each channel its own
4-byte nonce prefix, and each frame's 8-byte sequence number is the rest of the
nonce.  The receiver only accepts the next sequence number, so a replayed or
reordered frame fails before decryption.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigError, IntegrityError

TAG_SIZE = 16
_NONCE = struct.Struct(">IQ")


class _Aead(Protocol):
    def encrypt_into(self, nonce: bytes, data: bytes | memoryview, aad: bytes | memoryview | None,
                     buf: bytearray | memoryview) -> int: ...
    def decrypt_into(self, nonce: bytes, data: bytes | memoryview, aad: bytes | memoryview | None,
                     buf: bytearray | memoryview) -> int: ...


@dataclasses.dataclass(frozen=True)
class CipherSpec:
    name: str
    key_size: int
    factory: Callable[[bytes], _Aead]


CIPHERS: dict[str, CipherSpec] = {
    "aes-256-gcm": CipherSpec("aes-256-gcm", 32, AESGCM),
    "chacha20-poly1305": CipherSpec("chacha20-poly1305", 32, ChaCha20Poly1305),
}
DEFAULT_CIPHER = "aes-256-gcm"


def cipher_spec(name: str) -> CipherSpec:
    try:
        return CIPHERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown cipher {name!r}; supported: {', '.join(CIPHERS)}"
        ) from None


class Sealer:
    """One direction of one channel: seals or opens frames in sequence order."""

    def __init__(self, spec: CipherSpec, key: bytes, channel: int) -> None:
        self._aead = spec.factory(key)
        self._channel = channel

    def nonce(self, seq: int) -> bytes:
        return _NONCE.pack(self._channel, seq)

    def seal_into(self, seq: int, aad: bytes | memoryview, plain: bytes | memoryview,
                  out: memoryview) -> int:
        """Write ciphertext||tag of ``plain`` into ``out``; returns its length."""
        return self._aead.encrypt_into(self.nonce(seq), plain, aad, out)

    def open_into(self, seq: int, aad: bytes | memoryview, sealed: bytes | memoryview,
                  out: memoryview) -> int:
        try:
            return self._aead.decrypt_into(self.nonce(seq), sealed, aad, out)
        except InvalidTag:
            raise IntegrityError(f"authentication failed on frame {seq}") from None


def derive_keys(shared: bytes, transcript: bytes, key_size: int) -> tuple[bytes, bytes]:
    """(source->destination key, destination->source key) from the X25519 secret."""
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * key_size, salt=transcript,
               info=b"migd/1 stream keys").derive(shared)
    return okm[:key_size], okm[key_size:]
