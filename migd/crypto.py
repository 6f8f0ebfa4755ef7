"""Frame protection (a registry with a default) and the session key schedule.

``aes-256-gcm`` and ``chacha20-poly1305`` encrypt and authenticate.  ``none``
is for links that never leave the host (the RDMA-like ``shm`` provider): the
payload travels in the clear but every frame still carries a 16-byte AES-GMAC
tag under the session key over header and payload, so a frame that was not
sealed by the authenticated peer, or changed since, is still refused, and the
stream digest still commits to every byte.  It costs a GHASH pass (~20 GB/s
here) instead of a cipher pass (~10 GB/s).

Nonces are never reused: each direction has its own key, each channel its own
4-byte nonce prefix, and each frame's 8-byte sequence number is the rest of the
nonce.  The receiver only accepts the next sequence number, so a replayed or
reordered frame fails before decryption.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hmac
import struct
from collections.abc import Callable
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import AEADDecryptionContext, Cipher, algorithms, modes
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


class _AuthOnly:
    """``none``: the payload stays as it is; the tag is GCM's over (payload, header).

    GCM with the payload as associated data and the 36-byte header as the
    message: the tag covers both, and checking it means recomputing it."""

    def __init__(self, key: bytes) -> None:
        self._gcm = AESGCM(key)

    def _tag(self, nonce: bytes, data: bytes | memoryview, aad: bytes | memoryview | None
             ) -> bytes:
        return self._gcm.encrypt(nonce, bytes(aad or b""), data)[-TAG_SIZE:]

    def encrypt_into(self, nonce: bytes, data: bytes | memoryview,
                     aad: bytes | memoryview | None, buf: bytearray | memoryview) -> int:
        n = len(data)
        out = memoryview(buf)
        if not _same_memory(data, out[:n]):
            out[:n] = data
        # The tag vouches for what was written, not for ``data`` read a second time: a
        # lent view of device memory may change between the two reads (a running
        # guest writes it during pre-copy), and the peer checks what it received.
        out[n:n + TAG_SIZE] = self._tag(nonce, out[:n], aad)
        return n + TAG_SIZE

    def decrypt_into(self, nonce: bytes, data: bytes | memoryview,
                     aad: bytes | memoryview | None, buf: bytearray | memoryview) -> int:
        body = memoryview(data)[:-TAG_SIZE]
        if len(data) < TAG_SIZE or not hmac.compare_digest(
                self._tag(nonce, body, aad), memoryview(data)[-TAG_SIZE:]):
            raise InvalidTag()
        out = memoryview(buf)
        if not _same_memory(body, out[:len(body)]):
            out[:len(body)] = body
        return len(body)


def _same_memory(a: bytes | memoryview, b: memoryview) -> bool:
    """Whether two views are the same bytes (sealing in place needs no copy)."""
    if (not isinstance(a, memoryview) or a.obj is not b.obj or len(a) != len(b)
            or a.readonly or b.readonly):
        return False
    if not len(a):
        return True
    return _address(a) == _address(b)


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@dataclasses.dataclass(frozen=True)
class CipherSpec:
    name: str
    key_size: int
    factory: Callable[[bytes], _Aead]
    #: False: the payload is in the clear (authenticated only); it can be used where it lies.
    encrypts: bool = True


CIPHERS: dict[str, CipherSpec] = {
    "aes-256-gcm": CipherSpec("aes-256-gcm", 32, AESGCM),
    "chacha20-poly1305": CipherSpec("chacha20-poly1305", 32, ChaCha20Poly1305),
    "none": CipherSpec("none", 32, _AuthOnly, encrypts=False),
}
DEFAULT_CIPHER = "aes-256-gcm"
#: What a destination accepts when its configuration does not say: never the
#: clear text on a link that leaves the host.
ENCRYPTING = tuple(name for name, spec in CIPHERS.items() if spec.encrypts)


def ciphers_for(leaves_host: bool) -> tuple[str, tuple[str, ...]]:
    """The policy: (what a source proposes by default, what a destination accepts by
    default) on a link that does or does not leave the host.  Clear text only where
    it cannot be read on the way (every frame is authenticated either way)."""
    if leaves_host:
        return DEFAULT_CIPHER, ENCRYPTING
    return "none", ("none", *ENCRYPTING)


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
        self.encrypts = spec.encrypts
        #: AES-GCM can seal a payload given in pieces, in one pass without joining them.
        self.takes_pieces = spec.name == "aes-256-gcm"
        self._aes = algorithms.AES(key) if self.takes_pieces else None

    def nonce(self, seq: int) -> bytes:
        return _NONCE.pack(self._channel, seq)

    def seal_into(self, seq: int, aad: bytes | memoryview, plain: bytes | memoryview,
                  out: memoryview) -> int:
        """Write ciphertext||tag of ``plain`` into ``out``; returns its length."""
        return self._aead.encrypt_into(self.nonce(seq), plain, aad, out)

    def seal_pieces_into(self, seq: int, aad: bytes | memoryview, pieces: list[memoryview],
                         out: memoryview) -> int:
        """:meth:`seal_into` of the pieces joined, without joining them (the same
        ciphertext and tag as AES-GCM of the whole)."""
        if self._aes is None:
            joined = b"".join(pieces)
            return self.seal_into(seq, aad, joined, out[:len(joined) + TAG_SIZE])
        enc = Cipher(self._aes, modes.GCM(self.nonce(seq))).encryptor()
        enc.authenticate_additional_data(bytes(aad))
        pos = 0
        for piece in pieces:
            pos += enc.update_into(piece, out[pos:])
        enc.finalize()
        out[pos:pos + TAG_SIZE] = enc.tag
        return pos + TAG_SIZE

    def opener(self, seq: int, aad: bytes | memoryview) -> Opener | None:
        """A streaming :class:`Opener` for frame ``seq`` (AES-GCM), else None."""
        if self._aes is None:
            return None
        dec = Cipher(self._aes, modes.GCM(self.nonce(seq))).decryptor()
        dec.authenticate_additional_data(bytes(aad))
        return Opener(dec, seq)

    def open_into(self, seq: int, aad: bytes | memoryview, sealed: bytes | memoryview,
                  out: memoryview) -> int:
        try:
            return self._aead.decrypt_into(self.nonce(seq), sealed, aad, out)
        except InvalidTag:
            raise IntegrityError(f"authentication failed on frame {seq}") from None


class Opener:
    """Opens one payload piece by piece, each piece decrypted straight to where
    it belongs (device memory), so no plaintext buffer is needed in between.

    Nothing it wrote is authentic until :meth:`finish` accepts the tag: callers
    write only where a failed frame is discarded anyway."""

    __slots__ = ("_dec", "_seq")

    def __init__(self, dec: AEADDecryptionContext, seq: int) -> None:
        self._dec = dec
        self._seq = seq

    def update_into(self, data: memoryview, out: memoryview) -> None:
        self._dec.update_into(data, out)

    def finish(self, tag: bytes | memoryview) -> None:
        try:
            self._dec.finalize_with_tag(bytes(tag))
        except InvalidTag:
            raise IntegrityError(f"authentication failed on frame {self._seq}") from None


def derive_keys(shared: bytes, transcript: bytes, key_size: int) -> tuple[bytes, bytes]:
    """(source->destination key, destination->source key) from the X25519 secret."""
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * key_size, salt=transcript,
               info=b"migd/1 stream keys").derive(shared)
    return okm[:key_size], okm[key_size:]
