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
import time

import zstandard

from .errors import ConfigError, DecompressionError, ProtocolError


class Encoding(enum.IntEnum):
    RAW = 0
    ZERO = 1
    ZSTD = 2
    SPARSE = 3  # bitmap of non-zero 16 KiB blocks, then those blocks


#: Granularity of zero skipping: on the benchmark image 16 KiB blocks catch 33
#: of the 35 % zero bytes, at 64 checks per MiB.
SPARSE_BLOCK = 16 << 10
_BLOCK_WORDS = SPARSE_BLOCK // 8


@dataclasses.dataclass(frozen=True)
class CompressMode:
    name: str  # "none" | "zstd" | "auto" (zstd when measurements say it pays)
    level: int = 1

    def __str__(self) -> str:
        return self.name if self.name == "none" else f"{self.name}:{self.level}"


COMPRESSIONS = ("none", "zstd", "auto")
#: Measured per window: compresses where the link, not the CPU, is what limits.
DEFAULT_COMPRESSION = "auto"


def parse_compress(text: str) -> CompressMode:
    name, _, level = text.partition(":")
    if name == "none" and not level:
        return CompressMode("none", 0)
    if name in ("zstd", "auto"):
        try:
            lvl = int(level) if level else 1
        except ValueError:
            raise ConfigError(f"compress: level {level!r} is not a number") from None
        if not -7 <= lvl <= 22:
            raise ConfigError(f"compress: zstd level {lvl} out of range -7..22")
        return CompressMode(name, lvl)
    raise ConfigError(f"compress: {text!r} unknown; supported: none, zstd[:LEVEL], auto[:LEVEL]")


# Chunks shrinking by less than this go raw: decompressing costs more than the bytes saved.
_MIN_GAIN = 0.97
_ZEROS = bytes(16 << 20)


def zero_view(n: int) -> memoryview:
    """``n`` zero bytes (at most 16 MiB) without allocating."""
    return memoryview(_ZEROS)[:n]


def is_zero(data: memoryview) -> bool:
    # bytes.startswith is a memcmp (~45 GB/s here); memoryview == compares per element.
    if len(data) <= len(_ZEROS):
        return _ZEROS.startswith(data)
    return all(_ZEROS.startswith(data[o : o + len(_ZEROS)]) for o in range(0, len(data), len(_ZEROS)))


def bitmap_len(n: int) -> int:
    """Bytes of a sparse chunk's bitmap for ``n`` plain bytes."""
    return (-(-n // SPARSE_BLOCK) + 7) // 8


def sparse_runs(bitmap: bytes | bytearray | memoryview, n: int, carried: int
                ) -> list[tuple[bool, int]]:
    """A sparse chunk's ``n`` plain bytes as runs of (carried, length): carried runs
    follow the bitmap in the payload, the others are zero.  ``carried``: the payload
    bytes after the bitmap, which must be exactly the carried runs."""
    nbits = -(-n // SPARSE_BLOCK)
    bits = int.from_bytes(bitmap, "little")
    if bits >> nbits:
        raise DecompressionError("sparse chunk bitmap names blocks past the chunk")
    runs: list[tuple[bool, int]] = []
    total = 0
    i = 0
    full = (1 << nbits) - 1
    while i < nbits:
        rest = bits >> i
        bit = rest & 1
        if not bit:
            rest = ~rest & (full >> i)
        # The run's length is the count of trailing ones of ``rest``: one step per run.
        ones = ~rest
        j = min(i + (ones & -ones).bit_length() - 1, nbits)
        k = min(j * SPARSE_BLOCK, n) - i * SPARSE_BLOCK
        runs.append((bool(bit), k))
        total += k if bit else 0
        i = j
    if total > carried:
        raise DecompressionError("sparse chunk is shorter than its bitmap says")
    if total < carried:
        raise DecompressionError("sparse chunk is longer than its bitmap says")
    return runs


class Encoder:
    """Per-thread state: zstd contexts are not thread-safe, and the compaction
    scratch must not be shared between chunks in flight."""

    def __init__(self, mode: CompressMode) -> None:
        self.mode = mode
        #: Skip zero blocks inside chunks.  Off where the "link" is a memory copy
        #: (rdma+shm): scanning and compacting then cost more than the bytes saved.
        self.sparse = True
        self._local = threading.local()
        self._stats_lock = threading.Lock()
        #: Compressor measurements since the last take_stats(): CPU s, bytes in, out.
        self._stats = [0.0, 0, 0]

    def take_stats(self) -> tuple[float, int, int]:
        with self._stats_lock:
            cpu, n_in, n_out = self._stats
            self._stats = [0.0, 0, 0]
        return float(cpu), int(n_in), int(n_out)

    def _scratch(self, n: int) -> bytearray:
        buf: bytearray | None = getattr(self._local, "scratch", None)
        if buf is None or len(buf) < n:
            buf = self._local.scratch = bytearray(n)
        return buf

    def _sparse(self, plain: memoryview, pieces: bool) -> list[memoryview] | memoryview | None:
        """The non-zero blocks behind a bitmap, or None if no block is zero: as
        pieces (bitmap, then views of ``plain``) for a sealer that takes them, else
        compacted into one buffer."""
        n = len(plain)
        nbits = -(-n // SPARSE_BLOCK)
        # Only a block whose first word is zero can be: every first word in one C call.
        whole = n - n % 8
        firsts = plain[:whole].cast("Q")[::_BLOCK_WORDS].tolist() if whole else []
        firsts += [0] * (nbits - len(firsts))  # a tail block shorter than a word
        if 0 not in firsts:
            return None
        zero = [i for i, w in enumerate(firsts)
                if not w and _ZEROS.startswith(plain[i * SPARSE_BLOCK : (i + 1) * SPARSE_BLOCK])]
        if not zero:
            return None
        bits = (1 << nbits) - 1
        runs: list[tuple[int, int]] = []
        start = 0
        for i in zero:
            bits ^= 1 << i
            o = i * SPARSE_BLOCK
            if o > start:
                runs.append((start, o))
            start = min(o + SPARSE_BLOCK, n)
        if start < n:
            runs.append((start, n))
        blen = bitmap_len(n)
        bitmap = bits.to_bytes(blen, "little")
        if pieces:
            return [memoryview(bitmap)] + [plain[a:b] for a, b in runs]
        out = self._scratch(n + blen)
        out[:blen] = bitmap
        pos = blen
        for a, b in runs:
            out[pos : pos + b - a] = plain[a:b]
            pos += b - a
        return memoryview(out)[:pos]

    def _zstd(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = zstandard.ZstdCompressor(level=self.mode.level, write_content_size=True)
            self._local.c = c
        return c

    def encode(self, plain: memoryview, compress: bool | None = None, pieces: bool = False
               ) -> tuple[Encoding, memoryview | bytes | list[memoryview]]:
        """The chunk's encoding and payload (``plain`` itself when raw).

        ``compress`` overrides the mode (``auto`` decides per window).  ``pieces``: a
        sparse payload may come as a list of views (no compaction copy)."""
        if is_zero(plain):
            return Encoding.ZERO, b""
        if compress if compress is not None else self.mode.name == "zstd":
            t0 = time.thread_time()
            packed = self._zstd().compress(plain)
            cpu = time.thread_time() - t0
            with self._stats_lock:
                self._stats[0] += cpu
                self._stats[1] += len(plain)
                self._stats[2] += len(packed)
            if len(packed) < len(plain) * _MIN_GAIN:
                return Encoding.ZSTD, packed
        sparse = self._sparse(plain, pieces) if self.sparse else None
        if sparse is not None:
            return Encoding.SPARSE, sparse
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
        elif encoding == Encoding.SPARSE:
            self._unsparse(payload, out)
        else:
            raise ProtocolError(f"unknown chunk encoding {encoding}")

    @staticmethod
    def sparse_segments(payload: memoryview, n: int) -> list[memoryview]:
        """The ``n`` plain bytes of a sparse chunk as pieces, without copying them:
        non-zero runs are views of ``payload``, zero runs views of a shared zero page."""
        blen = bitmap_len(n)
        if len(payload) < blen:
            raise DecompressionError("sparse chunk shorter than its bitmap")
        segs: list[memoryview] = []
        pos = blen
        zeros = memoryview(_ZEROS)
        for carried, k in sparse_runs(payload[:blen], n, len(payload) - blen):
            if carried:
                segs.append(payload[pos : pos + k])
                pos += k
            else:
                segs.append(zeros[:k])
        return segs

    @classmethod
    def _unsparse(cls, payload: memoryview, out: memoryview) -> None:
        pos = 0
        for seg in cls.sparse_segments(payload, len(out)):
            out[pos : pos + len(seg)] = seg
            pos += len(seg)

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
