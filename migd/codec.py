"""Chunk encodings: how one chunk of device data is represented on the wire.

A compression *mode* (``none``, ``zstd[:LEVEL]``) is what the operator picks;
each chunk then takes the cheapest *encoding* that fits it: an all-zero chunk
costs no payload, a chunk that does not shrink goes raw.  Decoding writes into
a buffer the caller owns and must yield exactly the declared length, so a
corrupt or hostile chunk cannot expand past it (no decompression bombs).
"""

from __future__ import annotations

import dataclasses
import enum
import threading

import zstandard

from .errors import ConfigError, DecompressionError, ProtocolError


class Encoding(enum.IntEnum):
    RAW = 0
    ZERO = 1
    ZSTD = 2


@dataclasses.dataclass(frozen=True)
class CompressMode:
    name: str  # "none" | "zstd"
    level: int = 1

    def __str__(self) -> str:
        return self.name if self.name == "none" else f"{self.name}:{self.level}"


COMPRESSIONS = ("none", "zstd")
DEFAULT_COMPRESSION = "zstd:1"


def parse_compress(text: str) -> CompressMode:
    name, _, level = text.partition(":")
    if name == "none" and not level:
        return CompressMode("none", 0)
    if name == "zstd":
        try:
            lvl = int(level) if level else 1
        except ValueError:
            raise ConfigError(f"compress: level {level!r} is not a number") from None
        if not -7 <= lvl <= 22:
            raise ConfigError(f"compress: zstd level {lvl} out of range -7..22")
        return CompressMode("zstd", lvl)
    raise ConfigError(f"compress: {text!r} unknown; supported: none, zstd[:LEVEL]")


# Chunks shrinking by less than this go raw: decompressing costs more than the bytes saved.
_MIN_GAIN = 0.97
_ZEROS = bytes(16 << 20)


def is_zero(data: memoryview) -> bool:
    n = len(data)
    if n <= len(_ZEROS):
        return data == memoryview(_ZEROS)[:n]
    return all(data[o : o + len(_ZEROS)] == memoryview(_ZEROS)[: len(data[o : o + len(_ZEROS)])]
               for o in range(0, n, len(_ZEROS)))


class Encoder:
    """Per-worker-thread compressors (zstd contexts are not thread-safe)."""

    def __init__(self, mode: CompressMode) -> None:
        self.mode = mode
        self._local = threading.local()

    def _zstd(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = zstandard.ZstdCompressor(level=self.mode.level, write_content_size=True)
            self._local.c = c
        return c

    def encode(self, plain: memoryview) -> tuple[Encoding, memoryview | bytes]:
        """The chunk's encoding and payload (``plain`` itself when raw)."""
        if is_zero(plain):
            return Encoding.ZERO, b""
        if self.mode.name == "zstd":
            packed = self._zstd().compress(plain)
            if len(packed) < len(plain) * _MIN_GAIN:
                return Encoding.ZSTD, packed
        return Encoding.RAW, plain


class Decoder:
    def __init__(self) -> None:
        self._local = threading.local()

    def _zstd(self) -> zstandard.ZstdDecompressor:
        d: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if d is None:
            d = zstandard.ZstdDecompressor()
            self._local.d = d
        return d

    def decode_into(self, encoding: int, payload: memoryview, out: memoryview) -> None:
        """Decode into ``out``, which is exactly the declared plain length."""
        n = len(out)
        if encoding == Encoding.ZERO:
            if len(payload):
                raise ProtocolError("zero chunk with a payload")
            out[:] = memoryview(_ZEROS)[:n] if n <= len(_ZEROS) else bytes(n)
        elif encoding == Encoding.RAW:
            if len(payload) != n:
                raise ProtocolError(f"raw chunk of {len(payload)} bytes declared as {n}")
            out[:] = payload
        elif encoding == Encoding.ZSTD:
            self._unzstd(payload, out)
        else:
            raise ProtocolError(f"unknown chunk encoding {encoding}")

    def _unzstd(self, payload: memoryview, out: memoryview) -> None:
        n = len(out)
        try:
            if zstandard.frame_content_size(payload) != n:
                raise DecompressionError(f"compressed chunk does not declare {n} bytes")
            reader = self._zstd().stream_reader(payload)
            got = 0
            while got < n:
                k = reader.readinto(out[got:])
                if not k:
                    break
                got += k
            if got != n or reader.read(1):
                raise DecompressionError(
                    f"compressed chunk decodes to {'more' if got == n else got} bytes, not {n}"
                )
        except zstandard.ZstdError as exc:
            raise DecompressionError(f"corrupt compressed chunk: {exc}") from None
