"""``sim``: a simulated VF, the built-in device for demos, benchmarks and tests.

Its state is :class:`~backends.memory.DeviceMemory` (a mapped file with a
dirtying guest).  The saving stream is the device's own record format (opaque
to migd, like mlx5's): 24-byte little-endian headers ``{magic 'SIMR', u32 type,
u64 offset, u64 length}``; a HEADER record announcing the state size, DATA
records of at most 8 MiB, and an END record closing a complete image.
RESUMING->STOP fails unless the loaded stream was complete and well formed.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Mapping
from typing import Any

from migd.errors import ConfigError, DeviceError, IncompatibleDevice, NoDataNow

from .base import REGISTRY, Device, PrecopyInfo, gather
from .memory import PAGE, DeviceMemory, check_options
from .states import PRECOPY_STATES, RUNNING_STATES, SAVING_STATES, DeviceState, MigCap

__all__ = ["MAX_RECORD", "PAGE", "RECORD", "SimDevice", "parse_caps"]

RECORD = struct.Struct("<4sIQQ")
MAGIC = b"SIMR"
REC_HEADER, REC_DATA, REC_END = 0, 1, 2
MAX_RECORD = 8 << 20
FORMAT_VERSION = 1

_CAP_NAMES = {"stop_copy": MigCap.STOP_COPY, "p2p": MigCap.P2P, "pre_copy": MigCap.PRE_COPY}


def parse_caps(text: str) -> MigCap:
    caps = MigCap.STOP_COPY
    for part in filter(None, (p.strip().lower() for p in text.split("+"))):
        if part not in _CAP_NAMES:
            raise ConfigError(f"caps: unknown capability {part!r}; use stop_copy+p2p+pre_copy")
        caps |= _CAP_NAMES[part]
    return caps


class SimDevice(Device):
    kind = "sim"
    blocking_io = False
    lends_memory = True
    lends_saved = True

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        check_options(name, "sim", options, {"caps", "model"})
        super().__init__(name, parse_caps(options.get("caps", "stop_copy+p2p+pre_copy")))
        self.model = options.get("model", "sim-vf")
        self.mem = DeviceMemory(name, options)
        self._size = self.mem.size
        # saving stream
        self._queue: collections.deque[tuple[int, int, int]] = collections.deque()
        self._cur_hdr = b""
        self._cur_hdr_pos = 0
        self._cur_off = 0
        self._cur_left = 0
        self._initial_left = 0
        self._queued_bytes = 0
        # resuming stream
        self._rx_hdr = bytearray(RECORD.size)  # a record header being assembled
        self._rx_have = 0  # ... bytes of it so far
        self._sink_len = 0  # what the last sink() lent
        self._rx_off = 0
        self._rx_left = 0
        self._rx_seen_header = False
        self._rx_seen_end = False
        self._loading = False
        #: Validated incoming loads (RESUMING->STOP accepted a complete stream).
        self.loads_committed = 0
        if options.get("dir"):
            self._keep_state_in(options["dir"])

    def _saved_extra(self) -> dict[str, Any]:
        return {"loading": self._loading, "loads_committed": self.loads_committed}

    def _restore(self, state: DeviceState, extra: dict[str, Any]) -> None:
        # A saving or resuming stream does not survive the daemon; the memory does.
        self._loading = bool(extra.get("loading"))
        self.loads_committed = int(extra.get("loads_committed", 0))
        self.mem.set_running(state in RUNNING_STATES)

    # --- guest side ----------------------------------------------------------

    def guest_write(self, off: int, data: bytes | bytearray) -> None:
        self.mem.guest_write(off, data)

    @property
    def guest_pages_written(self) -> int:
        return self.mem.guest_pages_written

    # --- FSM arcs ------------------------------------------------------------

    def _arc(self, cur: DeviceState, nxt: DeviceState) -> None:
        S = DeviceState
        if nxt not in RUNNING_STATES:
            self.mem.set_running(False)
        if (cur, nxt) == (S.RUNNING, S.PRE_COPY):
            self._open_saving(tracking=True)
        elif (cur, nxt) == (S.STOP, S.STOP_COPY):
            self._open_saving(tracking=False)
            self._queue_record(REC_END, 0, 0)
        elif nxt == S.STOP_COPY:  # from PRE_COPY(_P2P): the final delta
            self._snapshot_dirty()
            self.mem.stop_tracking()
            self._queue_record(REC_END, 0, 0)
        elif cur in SAVING_STATES and nxt not in SAVING_STATES:
            self._close_saving()
        elif (cur, nxt) == (S.STOP, S.RESUMING):
            self._loading = True
            self._rx_have = self._rx_left = self._sink_len = 0
            self._rx_seen_header = self._rx_seen_end = False
        elif (cur, nxt) == (S.RESUMING, S.STOP):
            if not (self._rx_seen_header and self._rx_seen_end) or self._rx_have or self._rx_left:
                raise DeviceError(f"{self.name}: loaded state is incomplete")
            self.loads_committed += 1
        if nxt == S.RUNNING:
            # Loaded state stays provisional until the VF runs it: a reset before
            # then (a failed or cancelled migration) must not leave it behind.
            self._loading = False
        if nxt in RUNNING_STATES:
            self.mem.set_running(True)

    def _reset(self) -> None:
        if self._loading:
            # Function-level reset of a VF that was loading: whatever arrived is gone.
            self.mem.wipe()
            self._loading = False
        self._close_saving()
        self._rx_have = self._rx_left = self._sink_len = 0
        self._rx_seen_header = self._rx_seen_end = False
        self.mem.set_running(True)

    def _queue_record(self, typ: int, off: int, length: int) -> None:
        self._queue.append((typ, off, length))
        self._queued_bytes += RECORD.size + (length if typ == REC_DATA else 0)

    def _open_saving(self, tracking: bool) -> None:
        self._close_saving()
        if tracking:
            self.mem.start_tracking()
        self._queue_record(REC_HEADER, 0, self._size)
        for off in range(0, self._size, MAX_RECORD):
            self._queue_record(REC_DATA, off, min(MAX_RECORD, self._size - off))
        self._initial_left = self._queued_bytes

    def _close_saving(self) -> None:
        self._queue.clear()
        self._cur_left = 0
        self._cur_hdr = b""
        self.mem.stop_tracking()
        self._initial_left = 0
        self._queued_bytes = 0

    def _snapshot_dirty(self) -> None:
        """Queue every dirty page (coalesced into runs) and clear its bit."""
        for off, length in self.mem.take_dirty(MAX_RECORD):
            self._queue_record(REC_DATA, off, length)

    # --- saving --------------------------------------------------------------

    def read_into(self, buf: memoryview) -> int:
        return gather(self._take(len(buf)), buf)

    def read_views(self, limit: int) -> list[memoryview]:
        # Record payloads are views of device memory; only the record headers are new bytes.
        return self._take(limit)

    def _take(self, want: int) -> list[memoryview]:
        """Advance the saving stream by up to ``want`` bytes, returned as pieces."""
        with self._lock:
            self._require(*SAVING_STATES, op="read")
            pieces: list[memoryview] = []
            n = 0
            mv = self.mem.mv
            while n < want:
                if self._cur_hdr_pos < len(self._cur_hdr):
                    k = min(want - n, len(self._cur_hdr) - self._cur_hdr_pos)
                    pieces.append(memoryview(self._cur_hdr)[self._cur_hdr_pos : self._cur_hdr_pos + k])
                    self._cur_hdr_pos += k
                elif self._cur_left:
                    k = min(want - n, self._cur_left)
                    pieces.append(mv[self._cur_off : self._cur_off + k])
                    self._cur_off += k
                    self._cur_left -= k
                elif self._queue:
                    typ, off, length = self._queue.popleft()
                    self._cur_hdr = RECORD.pack(MAGIC, typ, off, length)
                    self._cur_hdr_pos = 0
                    self._cur_off = off
                    self._cur_left = length if typ == REC_DATA else 0
                    continue
                elif self._state != DeviceState.STOP_COPY and self.mem.dirty_count:
                    self._snapshot_dirty()
                    continue
                else:
                    break
                n += k
            self._queued_bytes -= n
            self._initial_left = max(0, self._initial_left - n)
            if n == 0 and self._state != DeviceState.STOP_COPY:
                raise NoDataNow(f"{self.name}: no pre-copy data for now")
            return pieces

    def precopy_info(self) -> PrecopyInfo:
        with self._lock:
            self._require(*PRECOPY_STATES, op="precopy-info")
            pending = self._queued_bytes + self.mem.dirty_count * (PAGE + RECORD.size)
            return PrecopyInfo(self._initial_left, max(0, pending - self._initial_left))

    def stop_copy_size(self) -> int:
        if self._state in PRECOPY_STATES:
            return self._queued_bytes + self.mem.dirty_count * (PAGE + RECORD.size) + RECORD.size
        return self._size + (-(-self._size // MAX_RECORD) + 2) * RECORD.size

    # --- resuming ------------------------------------------------------------

    def write(self, data: memoryview) -> int:
        pos = 0
        while pos < len(data):
            view = self.sink(len(data) - pos)
            view[:] = data[pos : pos + len(view)]
            self.sunk(len(view))
            pos += len(view)
        return pos

    def sink(self, limit: int) -> memoryview:
        # Inside a data record the bytes go straight to device memory; else to the
        # record header being assembled.
        with self._lock:
            self._require(DeviceState.RESUMING, op="write")
            if self._rx_left:
                k = min(limit, self._rx_left)
                view = self.mem.mv[self._rx_off : self._rx_off + k]
            else:
                k = min(limit, RECORD.size - self._rx_have)
                view = memoryview(self._rx_hdr)[self._rx_have : self._rx_have + k]
            self._sink_len = k
            return view

    def sunk(self, n: int) -> None:
        with self._lock:
            self._require(DeviceState.RESUMING, op="write")
            if not 0 < n <= self._sink_len:
                raise DeviceError(f"{self.name}: {n} bytes committed, {self._sink_len} were lent")
            self._sink_len = 0
            if self._rx_left:
                self._rx_off += n
                self._rx_left -= n
                return
            self._rx_have += n
            if self._rx_have == RECORD.size:
                self._rx_have = 0
                self._take_record(bytes(self._rx_hdr))

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
        return self.mem.digest()

    def dump(self, path: str) -> None:
        self.mem.dump(path)

    def close(self) -> None:
        self.mem.close()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["model"] = self.model
        d["loads_committed"] = self.loads_committed
        d["loading"] = self._loading
        return d


REGISTRY.register("sim", SimDevice)
