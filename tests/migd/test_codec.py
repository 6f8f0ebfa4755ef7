"""Chunk encodings: cheapest fitting encoding, exact decode, no bombs."""

from __future__ import annotations

import os

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.codec import (
    SPARSE_BLOCK,
    CompressMode,
    Decoder,
    Encoder,
    Encoding,
    bitmap_len,
    is_zero,
    parse_compress,
)
from migd.errors import ConfigError, DecompressionError, ProtocolError


def roundtrip(enc: Encoder, plain: bytes) -> tuple[Encoding, bytes]:
    encoding, payload = enc.encode(memoryview(plain))
    assert not isinstance(payload, list)  # pieces only when asked for
    out = bytearray(len(plain))
    Decoder().decode_into(encoding, memoryview(bytes(payload)), memoryview(out))
    return encoding, bytes(out)


@pytest.mark.parametrize("mode", ["none", "zstd:1", "zstd:-3", "zstd:19"])
def test_cheapest_encoding_per_chunk(mode: str) -> None:
    enc = Encoder(parse_compress(mode))
    assert roundtrip(enc, bytes(1 << 20)) == (Encoding.ZERO, bytes(1 << 20))
    noise = os.urandom(1 << 20)
    assert roundtrip(enc, noise) == (Encoding.RAW, noise)  # incompressible goes raw
    holes = bytearray(os.urandom(1 << 20))
    holes[SPARSE_BLOCK : 5 * SPARSE_BLOCK] = bytes(4 * SPARSE_BLOCK)
    # zstd squeezes the holes itself (6 % here); without it, zero blocks are skipped
    expect = Encoding.ZSTD if mode != "none" else Encoding.SPARSE
    assert roundtrip(enc, bytes(holes)) == (expect, bytes(holes))
    text = b"lvl=INFO dev=vf0 op=WRITE status=OK\n" * 30000
    expect = Encoding.ZSTD if mode != "none" else Encoding.RAW
    assert roundtrip(enc, text) == (expect, text)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["zero", "rand", "text"]),
                          st.integers(min_value=1, max_value=3 * SPARSE_BLOCK)),
                min_size=1, max_size=12),
       st.sampled_from(["none", "zstd:1"]))
def test_roundtrip_any_mix(parts: list[tuple[str, int]], mode: str) -> None:
    plain = b"".join(bytes(n) if kind == "zero" else os.urandom(n) if kind == "rand"
                     else (b"abc" * n)[:n] for kind, n in parts)
    assert roundtrip(Encoder(parse_compress(mode)), plain)[1] == plain


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(min_value=1, max_value=4)),
                min_size=1, max_size=10))
def test_sparse_pieces_join_to_the_compacted_payload(blocks: list[tuple[bool, int]]) -> None:
    """A sealer that takes pieces gets exactly the bytes compaction would have made."""
    plain = memoryview(b"".join(bytes(n * SPARSE_BLOCK) if zero else os.urandom(n * SPARSE_BLOCK)
                                for zero, n in blocks) + b"tail")
    enc = Encoder(parse_compress("none"))
    e1, whole = enc.encode(plain)
    e2, pieces = enc.encode(plain, pieces=True)
    assert e1 == e2
    assert not isinstance(whole, list)
    if e1 == Encoding.SPARSE:
        assert isinstance(pieces, list) and b"".join(pieces) == bytes(whole)
    else:
        assert not isinstance(pieces, list)


def reference_sparse(plain: bytes) -> tuple[Encoding, bytes]:
    """The sparse encoding by its definition: a bitmap of the blocks that are not all
    zero, then those blocks."""
    blocks = [plain[o : o + SPARSE_BLOCK] for o in range(0, len(plain), SPARSE_BLOCK)]
    carried = [any(b) for b in blocks]
    if all(carried):
        return Encoding.RAW, plain
    bits = sum(1 << i for i, c in enumerate(carried) if c)
    return Encoding.SPARSE, (bits.to_bytes(bitmap_len(len(plain)), "little")
                             + b"".join(b for b, c in zip(blocks, carried, strict=True) if c))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["zero", "rand", "zero-head", "last-byte", "first-byte"]),
                min_size=1, max_size=9),
       st.integers(min_value=0, max_value=SPARSE_BLOCK - 1))
def test_zero_blocks_are_found_exactly(kinds: list[str], tail: int) -> None:
    """Blocks that are zero only at their start (the scan's first filter), or only
    at their end, and tails shorter than a word, encode as the definition says."""
    def block(kind: str, n: int) -> bytes:
        b = bytearray(n) if kind != "rand" else bytearray(os.urandom(n))
        if not n:
            pass
        elif kind == "zero-head" and n > 8:
            b[min(n - 1, 8 + n // 3)] = 1
        elif kind == "last-byte":
            b[-1] = 7
        elif kind == "first-byte":
            b[0] = 9
        return bytes(b)
    plain = b"".join(block(k, SPARSE_BLOCK) for k in kinds) + block(kinds[-1], tail)
    if not any(plain):
        return  # an all-zero chunk is ZERO, not sparse
    enc = Encoder(parse_compress("none"))
    encoding, payload = enc.encode(memoryview(plain))
    assert not isinstance(payload, list)
    assert (encoding, bytes(payload)) == reference_sparse(plain)
    out = bytearray(len(plain))
    Decoder().decode_into(encoding, memoryview(bytes(payload)), memoryview(out))
    assert out == plain


def test_is_zero() -> None:
    assert is_zero(memoryview(bytes(5)))
    assert not is_zero(memoryview(bytes(4) + b"\x01"))
    assert is_zero(memoryview(bytes(20 << 20)))
    assert not is_zero(memoryview(bytes((20 << 20) - 1) + b"\x01"))


def test_decompression_bomb_is_refused() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # tiny, expands to 64 MiB
    out = bytearray(1 << 20)
    with pytest.raises(DecompressionError, match="does not declare"):
        Decoder().decode_into(Encoding.ZSTD, memoryview(bomb), memoryview(out))
    # A frame that hides its size still cannot write past the buffer.
    sneaky = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(8 << 20))
    with pytest.raises(DecompressionError):
        Decoder().decode_into(Encoding.ZSTD, memoryview(sneaky), memoryview(out))


def test_corrupt_and_short_chunks() -> None:
    d = Decoder()
    good = zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 4096)
    bad = bytearray(good)
    bad[-5] ^= 0xFF
    with pytest.raises(DecompressionError):
        d.decode_into(Encoding.ZSTD, memoryview(bytes(bad)), memoryview(bytearray(4096)))
    with pytest.raises(ProtocolError, match="raw chunk"):
        d.decode_into(Encoding.RAW, memoryview(b"abc"), memoryview(bytearray(4)))
    with pytest.raises(ProtocolError, match="zero chunk"):
        d.decode_into(Encoding.ZERO, memoryview(b"a"), memoryview(bytearray(4)))
    with pytest.raises(ProtocolError, match="unknown"):
        d.decode_into(99, memoryview(b""), memoryview(bytearray(4)))


def test_sparse_bitmap_lies_are_caught() -> None:
    n = 4 * SPARSE_BLOCK
    out = memoryview(bytearray(n))
    with pytest.raises(DecompressionError, match="shorter"):
        Decoder().decode_into(Encoding.SPARSE, memoryview(b""), out)
    with pytest.raises(DecompressionError, match="past the chunk"):
        Decoder().decode_into(Encoding.SPARSE, memoryview(b"\xf0"), out)
    with pytest.raises(DecompressionError, match="shorter than its bitmap says"):
        Decoder().decode_into(Encoding.SPARSE, memoryview(b"\x01" + b"x" * 10), out)
    with pytest.raises(DecompressionError, match="longer"):
        Decoder().decode_into(Encoding.SPARSE,
                              memoryview(b"\x01" + b"x" * (SPARSE_BLOCK + 1)), out)


def test_parse_compress() -> None:
    assert parse_compress("none") == CompressMode("none", 0)
    assert parse_compress("zstd") == CompressMode("zstd", 1)
    assert str(parse_compress("zstd:7")) == "zstd:7"
    for bad, msg in [("lz4", "unknown"), ("zstd:x", "not a number"), ("zstd:99", "range"),
                     ("none:1", "unknown")]:
        with pytest.raises(ConfigError, match=msg):
            parse_compress(bad)
