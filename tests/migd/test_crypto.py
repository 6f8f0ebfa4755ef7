"""migd's sealer and opener against published test vectors: AES-256-GCM from the
GCM specification (McGrew and Viega, test cases 13, 14 and 16; also in NIST's
CAVP sets) and ChaCha20-Poly1305 from RFC 8439, section 2.8.2.

A frame's nonce is (channel: 4 bytes, sequence: 8 bytes), big-endian, so each
vector's 96-bit IV is a channel and a sequence number, and the vectors run
through the same code the stream uses: whole, in pieces, and piecewise opened."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from migd.crypto import TAG_SIZE, Sealer, cipher_spec
from migd.errors import IntegrityError


@dataclass
class Vector:
    name: str
    cipher: str
    key: str
    iv: str
    aad: str
    plain: str
    sealed: str  # ciphertext || tag

    def b(self, field: str) -> bytes:
        return bytes.fromhex(getattr(self, field))


RFC8439_PLAIN = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one "
                 b"tip for the future, sunscreen would be it.").hex()

VECTORS = [
    Vector("gcm-spec-13", "aes-256-gcm", "00" * 32, "00" * 12, "", "",
           "530f8afbc74536b9a963b4f1c4cb738b"),
    Vector("gcm-spec-14", "aes-256-gcm", "00" * 32, "00" * 12, "", "00" * 16,
           "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"),
    Vector("gcm-spec-16", "aes-256-gcm",
           "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
           "cafebabefacedbaddecaf888", "feedfacedeadbeeffeedfacedeadbeefabaddad2",
           "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
           "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
           "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
           "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
           "76fc6ece0f4e1768cddf8853bb2d551b"),
    Vector("rfc8439-2.8.2", "chacha20-poly1305", bytes(range(0x80, 0xA0)).hex(),
           "070000004041424344454647", "50515253c0c1c2c3c4c5c6c7", RFC8439_PLAIN,
           "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
           "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
           "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
           "3ff4def08e4b7a9de576d26586cec64b6116"
           "1ae10b594f09e26a7e902ecbd0600691"),
]


def sealer(v: Vector) -> tuple[Sealer, int]:
    iv = v.b("iv")
    channel, seq = int.from_bytes(iv[:4], "big"), int.from_bytes(iv[4:], "big")
    s = Sealer(cipher_spec(v.cipher), v.b("key"), channel)
    assert s.nonce(seq) == iv
    return s, seq


@pytest.mark.parametrize("v", VECTORS, ids=[v.name for v in VECTORS])
def test_seal_and_open_match_the_published_vector(v: Vector) -> None:
    s, seq = sealer(v)
    plain, sealed = v.b("plain"), v.b("sealed")
    out = bytearray(len(plain) + TAG_SIZE)
    assert s.seal_into(seq, v.b("aad"), plain, memoryview(out)) == len(sealed)
    assert bytes(out) == sealed
    back = bytearray(len(plain))
    assert s.open_into(seq, v.b("aad"), sealed, memoryview(back)) == len(plain)
    assert bytes(back) == plain


@pytest.mark.parametrize("v", VECTORS, ids=[v.name for v in VECTORS])
@pytest.mark.parametrize("cut", [1, 7, 16, 33])
def test_pieces_give_the_same_bytes(v: Vector, cut: int) -> None:
    s, seq = sealer(v)
    plain, sealed = v.b("plain"), v.b("sealed")
    pieces = [memoryview(plain[i : i + cut]) for i in range(0, len(plain), cut)]
    out = bytearray(len(plain) + TAG_SIZE)
    assert s.seal_pieces_into(seq, v.b("aad"), pieces, memoryview(out)) == len(sealed)
    assert bytes(out) == sealed
    opener = s.opener(seq, v.b("aad"))
    if opener is None:  # only AES-GCM opens piecewise
        assert v.cipher != "aes-256-gcm"
        return
    back = bytearray(len(plain))
    body = sealed[: len(plain)]
    for i in range(0, len(body), cut):
        opener.update_into(memoryview(body[i : i + cut]), memoryview(back)[i : i + cut])
    opener.finish(sealed[len(plain):])
    assert bytes(back) == plain


@pytest.mark.parametrize("v", VECTORS, ids=[v.name for v in VECTORS])
def test_any_changed_bit_is_refused(v: Vector) -> None:
    s, seq = sealer(v)
    sealed = bytearray(v.b("sealed"))
    for pos in {0, len(sealed) // 2, len(sealed) - 1}:
        bad = bytearray(sealed)
        bad[pos] ^= 1
        with pytest.raises(IntegrityError, match=f"frame {seq}"):
            s.open_into(seq, v.b("aad"), bytes(bad), memoryview(bytearray(len(bad) - TAG_SIZE)))
    with pytest.raises(IntegrityError):  # the same bytes under another sequence number
        s.open_into(seq + 1, v.b("aad"), bytes(sealed),
                    memoryview(bytearray(len(sealed) - TAG_SIZE)))
    opener = s.opener(seq, v.b("aad"))
    if opener is not None:
        body = bytes(sealed[: -TAG_SIZE])
        opener.update_into(memoryview(body), memoryview(bytearray(len(body))))
        with pytest.raises(IntegrityError):
            opener.finish(bytes(TAG_SIZE))


def test_clear_text_only_where_the_link_stays_on_the_host() -> None:
    """The policy is the daemon's; a transport only says whether it leaves the host."""
    import transports
    from migd.crypto import ciphers_for

    assert ciphers_for(True) == ("aes-256-gcm", ("aes-256-gcm", "chacha20-poly1305"))
    assert ciphers_for(False)[0] == "none" and "none" in ciphers_for(False)[1]
    leaves = {n: transports.REGISTRY.create(n).leaves_host for n in ("tcp", "rdma+tcp",
                                                                      "rdma+shm")}
    assert leaves == {"tcp": True, "rdma+tcp": True, "rdma+shm": False}


def test_a_clear_text_tag_vouches_for_what_was_written_while_the_source_changes() -> None:
    """``none`` copies the payload, then tags it: a lent view of device memory that a
    running guest writes between the two must not give a tag for other bytes than
    those sent (seen as a rare 'authentication failed' over rdma+shm)."""
    key = bytes(range(32))
    sealer, opener = Sealer(cipher_spec("none"), key, 0), Sealer(cipher_spec("none"), key, 0)
    device = bytearray(b"a" * 4096)
    aead: Any = sealer._aead
    real = aead._gcm.encrypt

    def guest_writes_first(nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        device[100] ^= 0xFF  # between the copy and the tag
        return bytes(real(nonce, data, aad))

    aead._gcm = SimpleNamespace(encrypt=guest_writes_first)
    out = bytearray(4096 + TAG_SIZE)
    assert sealer.seal_into(0, b"header", memoryview(device), memoryview(out)) == len(out)
    back = bytearray(4096)
    assert opener.open_into(0, b"header", bytes(out), memoryview(back)) == 4096
    assert back == b"a" * 4096  # what was copied, vouched for
