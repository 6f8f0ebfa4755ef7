"""``sim``: a simulated VF whose state lives in device memory outside the daemon's heap.

Device memory is a memory-mapped file (a ``/dev/shm`` file unlinked at once, or
a private copy-on-write mapping of ``state-file``), so a 4 GiB device costs the
daemon no heap.  A guest workload thread dirties pages while the device runs, so
pre-copy has real dirty data to chase.

The saving stream is the device's own record format (opaque to migd, like
mlx5's): 24-byte little-endian headers ``{magic 'SIMR', u32 type, u64 offset,
u64 length}``; a HEADER record announcing the state size, DATA records of at
most 8 MiB, and an END record closing a complete image.  RESUMING->STOP fails
unless the loaded stream was complete and well formed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import mmap
import os
import random
import struct
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

from migd.errors import ConfigError, DeviceError, IncompatibleDevice, NoDataNow
from migd.units import parse_size

from .base import REGISTRY, Device, PrecopyInfo
from .states import RUNNING_STATES, DeviceState, MigCap

PAGE = 4096
RECORD = struct.Struct("<4sIQQ")
MAGIC = b"SIMR"
REC_HEADER, REC_DATA, REC_END = 0, 1, 2
MAX_RECORD = 8 << 20
FORMAT_VERSION = 1
# <linux/mman.h>, Linux >= 5.14; older kernels answer EINVAL and we fault lazily.
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23

_CAP_NAMES = {"stop_copy": MigCap.STOP_COPY, "p2p": MigCap.P2P, "pre_copy": MigCap.PRE_COPY}


def parse_caps(text: str) -> MigCap:
    caps = MigCap.STOP_COPY
    for part in filter(None, (p.strip().lower() for p in text.split("+"))):
        if part not in _CAP_NAMES:
            raise ConfigError(f"caps: unknown capability {part!r}; use stop_copy+p2p+pre_copy")
        caps |= _CAP_NAMES[part]
    return caps


def fill_mixed(mv: memoryview, seed: int) -> None:
    """Fill device memory with the benchmark page mix: runs of 1..64 pages,
    ~35% zero, 25% structured records, 20% text log lines, 20% random."""
    rng = random.Random(seed)
    pages = len(mv) // PAGE
    rec = struct.Struct("<IHHQIIQII24x")
    done = 0
    seq = rng.getrandbits(20)
    while done < pages:
        kind = rng.choices(("zero", "struct", "text", "random"), (35, 25, 20, 20))[0]
        n = min(rng.randint(1, 64), pages - done)
        off = done * PAGE
        if kind == "random":
            mv[off : off + n * PAGE] = rng.randbytes(n * PAGE)
        elif kind == "struct":
            page = bytearray(PAGE)
            hi = (0x7F00 | rng.getrandbits(8)) << 32
            for i in range(PAGE // rec.size):
                seq += 1
                rec.pack_into(page, i * rec.size, seq & 0xFFFFFFFF, rng.randrange(16),
                              rng.choice((1, 3, 0x11, 0x81)), hi | rng.getrandbits(20) << 12,
                              rng.choice((512, 4096, 65536)), 0, rng.getrandbits(40), i, 1)
            for p in range(n):
                struct.pack_into("<I", page, 0, (seq + p) & 0xFFFFFFFF)
                mv[off + p * PAGE : off + (p + 1) * PAGE] = page
        elif kind == "text":
            lines = []
            size = 0
            while size < PAGE:
                line = (f"ts={rng.random() * 1e9:.6f} lvl=INFO dev=vf{rng.randrange(8)} "
                        f"q={rng.randrange(64)} op=WRITE lba=0x{rng.getrandbits(32):x} "
                        f"lat_us={rng.randrange(900)} status=OK\n")
                lines.append(line)
                size += len(line)
            page = bytearray("".join(lines).encode()[:PAGE])
            for p in range(n):
                rot = (p * 61) % PAGE
                mv[off + p * PAGE : off + (p + 1) * PAGE] = page[rot:] + page[:rot]
        done += n


class _Workload:
    """The guest: dirties pages at ``rate`` bytes/s while the device runs."""

    def __init__(self, dev: SimDevice, rate: int, seed: int) -> None:
        self._dev = dev
        self._rate = rate
        self._rng = random.Random(seed ^ 0x5EED)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pages_written = 0

    def start(self) -> None:
        if self._rate > 0 and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"guest-{self._dev.name}",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Quiesce: when this returns the guest writes nothing more."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        tick = 0.002
        per_tick = max(1, int(self._rate * tick) // PAGE)
        pages = self._dev.pages
        stamp = bytearray(64)
        while not self._stop.wait(tick):
            for _ in range(per_tick):
                page = self._rng.randrange(pages)
                self.pages_written += 1
                struct.pack_into("<QQ", stamp, 0, self.pages_written, time.monotonic_ns())
                off = page * PAGE + self._rng.randrange(PAGE // 64) * 64
                self._dev.guest_write(off, stamp)


class SimDevice(Device):
    kind = "sim"
    blocking_io = False

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        known = {"size", "state-file", "dirty-rate", "seed", "caps", "model", "dir", "content",
                 "prefault"}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(
                f"device {name}: unknown sim option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        super().__init__(name, parse_caps(options.get("caps", "stop_copy+p2p+pre_copy")))
        self.model = options.get("model", "sim-vf")
        self._seed = int(options.get("seed", "42"))
        state_file = options.get("state-file")
        if state_file:
            try:
                fd = os.open(state_file, os.O_RDONLY)
            except OSError as exc:
                raise ConfigError(f"device {name}: state-file {state_file}: {exc.strerror}") from None
            size = os.fstat(fd).st_size
            if size == 0 or size % PAGE:
                os.close(fd)
                raise ConfigError(f"device {name}: state-file size {size} is not a multiple of {PAGE}")
            # Private copy-on-write: the guest's writes never reach the user's file.
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fd)
        else:
            size = parse_size(options.get("size", "64M"), f"device {name}: size")
            if size == 0 or size % PAGE:
                raise ConfigError(f"device {name}: size must be a positive multiple of {PAGE}")
            where = options.get("dir") or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
            fd, tmp = tempfile.mkstemp(prefix=f"migd-{name}-", dir=where)
            os.unlink(tmp)
            try:
                os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        if options.get("prefault", "yes") not in ("yes", "no"):
            raise ConfigError(f"device {name}: prefault must be yes or no")
        if options.get("prefault", "yes") == "yes":
            # Device memory exists before a migration touches it: fault it in now,
            # so first-touch page faults are not billed to the migration.
            with contextlib.suppress(OSError):
                self._map.madvise(_MADV_POPULATE_READ if state_file else _MADV_POPULATE_WRITE)
        self._mv = memoryview(self._map)
        self._size = size
        self.pages = size // PAGE
        if not state_file and options.get("content", "mixed") == "mixed":
            fill_mixed(self._mv, self._seed)
        elif not state_file and options.get("content") not in ("zero", "mixed"):
            raise ConfigError(f"device {name}: content must be mixed or zero")
        self._dirty = bytearray(self.pages)
        self._dirty_count = 0
        self._track = False
        self._guest_lock = threading.Lock()
        self._workload = _Workload(self, parse_size(options.get("dirty-rate", "0"), "dirty-rate"),
                                   self._seed)
        # saving stream
        self._queue: collections.deque[tuple[int, int, int]] = collections.deque()
        self._cur_hdr = b""
        self._cur_hdr_pos = 0
        self._cur_off = 0
        self._cur_left = 0
        self._initial_left = 0
        self._queued_bytes = 0
        # resuming stream
        self._rx_hdr = bytearray()
        self._rx_off = 0
        self._rx_left = 0
        self._rx_seen_header = False
        self._rx_seen_end = False
        self._loading = False
        #: Validated incoming loads (RESUMING->STOP accepted a complete stream).
        self.loads_committed = 0
        self._workload.start()

    # --- guest side ----------------------------------------------------------

    def guest_write(self, off: int, data: bytes | bytearray) -> None:
        """A write by the guest's workload: data first, then the dirty bit."""
        with self._guest_lock:
            if self._state not in RUNNING_STATES:
                return
            self._mv[off : off + len(data)] = data
            if self._track:
                p = off // PAGE
                if not self._dirty[p]:
                    self._dirty[p] = 1
                    self._dirty_count += 1

    @property
    def guest_pages_written(self) -> int:
        return self._workload.pages_written

    # --- FSM arcs ------------------------------------------------------------

    def _arc(self, cur: DeviceState, nxt: DeviceState) -> None:
        S = DeviceState
        if nxt not in RUNNING_STATES and cur in RUNNING_STATES:
            self._workload.stop()
        if (cur, nxt) == (S.RUNNING, S.PRE_COPY):
            self._open_saving(tracking=True)
        elif (cur, nxt) == (S.STOP, S.STOP_COPY):
            self._open_saving(tracking=False)
            self._queue.append((REC_END, 0, 0))
            self._queued_bytes += RECORD.size
        elif nxt == S.STOP_COPY:  # from PRE_COPY(_P2P): the final delta
            self._snapshot_dirty()
            self._track = False
            self._queue.append((REC_END, 0, 0))
            self._queued_bytes += RECORD.size
        elif cur in (S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY) and nxt not in (
            S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY
        ):
            self._close_saving()
        elif (cur, nxt) == (S.STOP, S.RESUMING):
            self._loading = True
            self._rx_hdr.clear()
            self._rx_left = 0
            self._rx_seen_header = self._rx_seen_end = False
        elif (cur, nxt) == (S.RESUMING, S.STOP):
            if not (self._rx_seen_header and self._rx_seen_end) or self._rx_hdr or self._rx_left:
                raise DeviceError(f"{self.name}: loaded state is incomplete")
            self.loads_committed += 1
        if nxt == S.RUNNING:
            # Loaded state stays provisional until the VF runs it: a reset before
            # then (a failed or cancelled migration) must not leave it behind.
            self._loading = False
        if nxt in RUNNING_STATES and cur not in RUNNING_STATES:
            self._workload.start()

    def _reset(self) -> None:
        if self._loading:
            # Function-level reset of a VF that was loading: whatever arrived is gone.
            self._wipe()
            self._loading = False
        self._close_saving()
        self._rx_hdr.clear()
        self._rx_left = 0
        self._rx_seen_header = self._rx_seen_end = False
        self._workload.start()

    def _open_saving(self, tracking: bool) -> None:
        with self._guest_lock:
            self._queue.clear()
            self._cur_left = 0
            self._cur_hdr = b""
            self._dirty[:] = bytes(self.pages)
            self._dirty_count = 0
            self._track = tracking
            self._queue.append((REC_HEADER, 0, self._size))
            for off in range(0, self._size, MAX_RECORD):
                self._queue.append((REC_DATA, off, min(MAX_RECORD, self._size - off)))
            records = -(-self._size // MAX_RECORD) + 1
            self._queued_bytes = self._size + records * RECORD.size
            self._initial_left = self._queued_bytes

    def _wipe(self) -> None:
        with self._guest_lock:
            zeros = bytes(8 << 20)
            for off in range(0, self._size, len(zeros)):
                n = min(len(zeros), self._size - off)
                self._mv[off : off + n] = zeros[:n]

    def _close_saving(self) -> None:
        with self._guest_lock:
            self._queue.clear()
            self._cur_left = 0
            self._cur_hdr = b""
            self._track = False
            self._initial_left = 0
            self._queued_bytes = 0

    def _snapshot_dirty(self) -> None:
        """Queue every dirty page (coalesced into runs) and clear its bit."""
        with self._guest_lock:
            if not self._dirty_count:
                return
            dirty = self._dirty
            p = dirty.find(1)
            while p != -1:
                end = dirty.find(0, p)
                if end == -1:
                    end = self.pages
                end = min(end, p + MAX_RECORD // PAGE)
                self._queue.append((REC_DATA, p * PAGE, (end - p) * PAGE))
                self._queued_bytes += RECORD.size + (end - p) * PAGE
                dirty[p:end] = bytes(end - p)
                p = dirty.find(1, end)
            self._dirty_count = 0

    # --- saving --------------------------------------------------------------

    def read_into(self, buf: memoryview) -> int:
        with self._lock:
            self._require(DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P, DeviceState.STOP_COPY,
                          op="read")
            n = 0
            want = len(buf)
            while n < want:
                if self._cur_hdr_pos < len(self._cur_hdr):
                    k = min(want - n, len(self._cur_hdr) - self._cur_hdr_pos)
                    buf[n : n + k] = self._cur_hdr[self._cur_hdr_pos : self._cur_hdr_pos + k]
                    self._cur_hdr_pos += k
                elif self._cur_left:
                    k = min(want - n, self._cur_left)
                    buf[n : n + k] = self._mv[self._cur_off : self._cur_off + k]
                    self._cur_off += k
                    self._cur_left -= k
                elif self._queue:
                    typ, off, length = self._queue.popleft()
                    self._cur_hdr = RECORD.pack(MAGIC, typ, off, length)
                    self._cur_hdr_pos = 0
                    self._cur_off = off
                    self._cur_left = length if typ == REC_DATA else 0
                    continue
                elif self._state != DeviceState.STOP_COPY and self._dirty_count:
                    self._snapshot_dirty()
                    continue
                else:
                    break
                n += k
            self._queued_bytes -= n
            self._initial_left = max(0, self._initial_left - n)
            if n == 0 and self._state != DeviceState.STOP_COPY:
                raise NoDataNow(f"{self.name}: no pre-copy data for now")
            return n

    def precopy_info(self) -> PrecopyInfo:
        with self._lock:
            self._require(DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P, op="precopy-info")
            pending = self._queued_bytes + self._dirty_count * (PAGE + RECORD.size)
            return PrecopyInfo(self._initial_left, max(0, pending - self._initial_left))

    def stop_copy_size(self) -> int:
        if self._state in (DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P):
            return self._queued_bytes + self._dirty_count * (PAGE + RECORD.size) + RECORD.size
        return self._size + (-(-self._size // MAX_RECORD) + 2) * RECORD.size

    # --- resuming ------------------------------------------------------------

    def write(self, data: memoryview) -> int:
        with self._lock:
            self._require(DeviceState.RESUMING, op="write")
            pos = 0
            total = len(data)
            while pos < total:
                if self._rx_left:
                    k = min(self._rx_left, total - pos)
                    self._mv[self._rx_off : self._rx_off + k] = data[pos : pos + k]
                    self._rx_off += k
                    self._rx_left -= k
                    pos += k
                    continue
                k = min(RECORD.size - len(self._rx_hdr), total - pos)
                self._rx_hdr += data[pos : pos + k]
                pos += k
                if len(self._rx_hdr) == RECORD.size:
                    self._take_record(bytes(self._rx_hdr))
                    self._rx_hdr.clear()
            return total

    def _take_record(self, hdr: bytes) -> None:
        magic, typ, off, length = RECORD.unpack(hdr)
        if magic != MAGIC:
            raise DeviceError(f"{self.name}: bad record magic in loaded state")
        if self._rx_seen_end:
            raise DeviceError(f"{self.name}: data after the end record")
        if typ == REC_HEADER:
            if length != self._size:
                raise IncompatibleDevice(
                    f"{self.name}: stream is for a {length}-byte device, this one has {self._size}"
                )
            self._rx_seen_header = True
        elif not self._rx_seen_header:
            raise DeviceError(f"{self.name}: record before the stream header")
        elif typ == REC_DATA:
            if length > MAX_RECORD or off + length > self._size:
                raise DeviceError(f"{self.name}: record [{off}, +{length}) outside device memory")
            self._rx_off, self._rx_left = off, length
        elif typ == REC_END:
            self._rx_seen_end = True
        else:
            raise DeviceError(f"{self.name}: unknown mandatory record type {typ}")

    # --- identity and verification ------------------------------------------

    def state_size(self) -> int:
        return self._size

    def compat(self) -> dict[str, Any]:
        return {"model": self.model, "state_size": self._size, "format": FORMAT_VERSION,
                "caps": int(self.caps)}

    def check_compat(self, source: Mapping[str, Any]) -> None:
        if source.get("model") != self.model:
            raise IncompatibleDevice(
                f"source model {source.get('model')!r} cannot load into {self.model!r}"
            )
        if source.get("format") != FORMAT_VERSION:
            raise IncompatibleDevice(f"stream format {source.get('format')!r} unsupported")
        if source.get("state_size") != self._size:
            raise IncompatibleDevice(
                f"source state is {source.get('state_size')} bytes, destination VF has {self._size}"
            )

    def digest(self) -> str:
        with self._guest_lock:
            h = hashlib.sha256()
            for off in range(0, self._size, 8 << 20):
                h.update(self._mv[off : off + (8 << 20)])
            return h.hexdigest()

    def dump(self, path: str) -> None:
        with self._guest_lock, open(path, "wb") as f:
            f.write(self._mv)

    def close(self) -> None:
        self._workload.stop()
        self._mv.release()
        self._map.close()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["model"] = self.model
        d["loads_committed"] = self.loads_committed
        d["loading"] = self._loading
        return d


REGISTRY.register("sim", SimDevice)
