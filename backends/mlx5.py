"""``mlx5``: a VF whose state moves only by PF admin commands, like ConnectX VFs.

:class:`Mlx5Device` is the host driver (mlx5_vfio_pci); the PF firmware it
drives is emulated apart, in :mod:`backends.emulated.mlx5_firmware`.  The driver maps FSM arcs to
  admin commands and frames the saved images for the data stream the way the
  driver does: 16-byte little-endian records ``{u64 size; u32 flags; u32 tag}``,
  STOP_COPY_SIZE first, then FW_DATA chunks of at most 8 MiB, at most two saved
  ahead of the reader.  Pre-copy dirty state is fetched only when pre-copy info
  is asked for after the reader drained the stream; an empty PRE_COPY read is
  ENOMSG ("no data for now").

The firmware image inside FW_DATA is the firmware's own business; the driver
never parses it, the loading firmware validates it.
"""

from __future__ import annotations

import collections
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any

from migd.errors import ConfigError, DeviceError, IncompatibleDevice, LentOut, NoDataNow

from .base import REGISTRY, Device, Lease, PrecopyInfo, gather
from .emulated.mlx5_firmware import (
    CHUNK,
    LOAD_VHCA_STATE,
    PF,
    QUERY_VHCA_MIGRATION_STATE,
    RESUME_INITIATOR,
    RESUME_RESPONDER,
    RESUME_VHCA,
    SAVE_VHCA_STATE,
    SEG,
    SUSPEND_INITIATOR,
    SUSPEND_RESPONDER,
    SUSPEND_VHCA,
    AdminError,
    GuestVf,
    Mlx5Firmware,
)
from .memory import PAGE, DeviceMemory, check_options
from .states import PRECOPY_STATES, SAVING_STATES, DeviceState, MigCap

# driver stream framing
REC = struct.Struct("<QII")
REC_OPTIONAL = 1
TAG_FW_DATA = 0
TAG_STOP_COPY_SIZE = 1
READ_AHEAD = 2
#: Host buffers beyond the read-ahead, for chunks lent to the pipeline and held
#: until the destination acknowledges them (a resume may send them again): the
#: firmware saves into the others meanwhile.  Made when first needed (a VF that
#: only loads never has them), and no more than the pipeline would otherwise copy
#: those chunks into (its pool of kept chunks).
LENT_BUFFERS = 4
#: The largest record a loader takes: LOAD_VHCA_STATE's size field is 32 bits (a
#: device not in chunk mode sends its whole image as one record).
MAX_LOAD_SIZE = (1 << 32) - 1


class Mlx5Device(Device):
    kind = "mlx5"
    blocking_io = True  # SAVE/LOAD wait for the firmware
    #: The host buffers are the host's (PF admin commands, no data_fd): the pipeline
    #: seals from them, and the firmware saves into a buffer again only once every
    #: lease on it is released.
    lends_saved = True

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        check_options(name, "mlx5", options, {"pf", "vhca-id", "model"})
        super().__init__(name, MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY)
        try:
            self.vhca_id = int(options.get("vhca-id", "1"), 0)
        except ValueError:
            raise ConfigError(f"device {name}: vhca-id must be a number") from None
        self.model = options.get("model", "mlx5-cx7-vf")
        self.fw = Mlx5Firmware.get(options.get("pf", "pf0"))
        self.mem = DeviceMemory(name, options, default_size="256M")
        self.fw.create_vf(self.vhca_id, self.mem)
        # Host buffers the PF DMAs into: for saving (two read ahead, and up to
        # LENT_BUFFERS more while chunks are lent to the pipeline), and one for loading.
        self._bufs = [bytearray(CHUNK) for _ in range(READ_AHEAD)]
        self._mkeys = [self.fw.register_mkey(PF, b) for b in self._bufs]
        # The loading buffer, sized (like the driver's) from the source's
        # STOP_COPY_SIZE record and the record at hand.
        self._load_buf = bytearray(0)
        self._load_mkey = self.fw.register_mkey(PF, self._load_buf)
        self._prep_size = 0
        self._stream: collections.deque[memoryview | bytes] = collections.deque()
        self._buf_order: collections.deque[int] = collections.deque()
        self._save_args: dict[str, bool] = {}
        self._stream_bytes = 0
        self._in_initial = False
        self._image_remaining = 0
        self._incremental = False
        self._free_bufs: collections.deque[int] = collections.deque(range(len(self._bufs)))
        #: Leases are released from any thread: this lock guards only the counts and
        #: never waits for the firmware (the device lock may).
        self._lend_lock = threading.Lock()
        self._lent = [0] * len(self._bufs)  # live leases on each buffer
        self._spent = [False] * len(self._bufs)  # read to its end, waiting for its leases
        self._lend_gen = 0  # a lease of a closed stream gives nothing back
        self._rx = bytearray()
        self._rx_need = REC.size
        self._rx_hdr: tuple[int, int, int] | None = None
        #: Bytes of the current FW_DATA record already in the load buffer.
        self._rx_got = 0
        self._loading = False
        self.loads_committed = 0
        if options.get("dir"):
            self._keep_state_in(options["dir"])

    def _saved_extra(self) -> dict[str, Any]:
        return {"loading": self._loading, "loads_committed": self.loads_committed}

    def _restore(self, state: DeviceState, extra: dict[str, Any]) -> None:
        # The firmware's suspend state follows the VF's (a real PF keeps it across a
        # daemon restart); images being saved or loaded do not survive the daemon.
        S = DeviceState
        self._loading = bool(extra.get("loading"))
        self.loads_committed = int(extra.get("loads_committed", 0))
        self.fw.restore_vf(self.vhca_id,
                           initiator=state not in (S.RUNNING, S.PRE_COPY),
                           responder=state in (S.STOP, S.STOP_COPY, S.RESUMING))

    def guest(self) -> GuestVf:
        return GuestVf(self.fw, self.vhca_id)

    def _cmd(self, opcode: int, **args: Any) -> Any:
        return self.fw.call(PF, opcode, vhca_id=self.vhca_id, **args)

    # --- FSM arcs ------------------------------------------------------------------

    def _arc(self, cur: DeviceState, nxt: DeviceState) -> None:
        S = DeviceState
        arc = (cur, nxt)
        if arc in ((S.RUNNING, S.RUNNING_P2P), (S.PRE_COPY, S.PRE_COPY_P2P)):
            self._cmd(SUSPEND_VHCA, op_mod=SUSPEND_INITIATOR)
        elif arc == (S.RUNNING_P2P, S.STOP):
            self._cmd(SUSPEND_VHCA, op_mod=SUSPEND_RESPONDER)
        elif arc == (S.STOP, S.RUNNING_P2P):
            self._cmd(RESUME_VHCA, op_mod=RESUME_RESPONDER)
        elif arc in ((S.RUNNING_P2P, S.RUNNING), (S.PRE_COPY_P2P, S.PRE_COPY)):
            self._cmd(RESUME_VHCA, op_mod=RESUME_INITIATOR)
            if nxt == S.RUNNING:
                self._loading = False
        elif arc in ((S.RUNNING, S.PRE_COPY), (S.RUNNING_P2P, S.PRE_COPY_P2P)):
            self._open_stream()
            self._start_image(set_track=True)
        elif arc == (S.STOP, S.STOP_COPY):
            self._open_stream()
            self._start_image(set_track=False)
        elif arc == (S.PRE_COPY_P2P, S.STOP_COPY):
            self._cmd(SUSPEND_VHCA, op_mod=SUSPEND_RESPONDER)
            self._start_image(incremental=True, final=True)
        elif arc in ((S.PRE_COPY, S.RUNNING), (S.PRE_COPY_P2P, S.RUNNING_P2P)):
            # The driver's pre-copy cleanup: the firmware ends the tracking session,
            # and the next session starts from a full image.
            self._cmd(QUERY_VHCA_MIGRATION_STATE, incremental=True, cleanup=True)
            self._close_stream()
            self._cmd(SAVE_VHCA_STATE, mkey=self._mkeys[0], size=CHUNK, incremental=False,
                      set_track=False)
        elif arc == (S.STOP_COPY, S.STOP):
            self._close_stream()
        elif arc == (S.STOP, S.RESUMING):
            self._rx.clear()
            self._rx_hdr = None
            self._rx_need = REC.size
            self._rx_got = 0
            self._prep_size = 0
            self._loading = True
        elif arc == (S.RESUMING, S.STOP):
            if self._rx or self._rx_hdr is not None:
                raise DeviceError(f"{self.name}: loaded stream ends inside a record")
            self.loads_committed += 1

    def _reset(self) -> None:
        self._close_stream()
        self.fw.reset_vf(self.vhca_id, wipe=self._loading)
        self._loading = False
        self._rx.clear()
        self._rx_hdr = None
        self._rx_got = 0

    # --- saving: images into host buffers, framed into the stream ---------------------------

    def _open_stream(self) -> None:
        self._close_stream()
        q = self._cmd(QUERY_VHCA_MIGRATION_STATE)
        # What the driver pre-allocates for stop-copy (in chunk mode: one chunk, or the
        # whole image when smaller), in pages; the target sizes its buffer from it.
        size = -(-max(q["required_umem_size"], min(CHUNK, q["remaining_total_size"])) // PAGE)
        size *= PAGE
        self._stream.append(REC.pack(8, REC_OPTIONAL, TAG_STOP_COPY_SIZE) + struct.pack("<Q", size))
        self._stream_bytes = REC.size + 8

    def _close_stream(self) -> None:
        self._stream.clear()
        self._buf_order.clear()
        self._stream_bytes = self._image_remaining = 0
        self._in_initial = False
        with self._lend_lock:
            self._lend_gen += 1
            self._lent = [0] * len(self._bufs)
            self._spent = [False] * len(self._bufs)
            self._free_bufs = collections.deque(range(len(self._bufs)))

    def _read_through(self, i: int) -> None:
        """The reader passed the end of buffer ``i``'s record: the firmware may save
        into it again, once no lease holds it."""
        with self._lend_lock:
            if self._lent[i]:
                self._spent[i] = True
            else:
                self._free_bufs.append(i)

    def _releaser(self, bufs: list[int]) -> Callable[[], None]:
        gen = self._lend_gen

        def release() -> None:
            with self._lend_lock:
                if gen != self._lend_gen:
                    return
                for i in bufs:
                    self._lent[i] -= 1
                    if not self._lent[i] and self._spent[i]:
                        self._spent[i] = False
                        self._free_bufs.append(i)
        return release

    def _start_image(self, set_track: bool = False, incremental: bool = False,
                     final: bool = False) -> None:
        self._save_args = {"set_track": set_track, "incremental": incremental, "final": final}
        self._image_remaining = 1  # unknown until the first chunk says
        self._in_initial = not incremental and self._state != DeviceState.STOP
        self._save_ahead()

    def _queued(self) -> int:
        """Stream bytes not yet read, counting the framing of chunks not yet saved."""
        return (self._stream_bytes + self._image_remaining
                + REC.size * -(-self._image_remaining // (CHUNK - SEG.size)))

    def _initial_bytes(self) -> int:
        if self._in_initial and self._queued() == 0:
            self._in_initial = False
        return self._queued() if self._in_initial else 0

    def _save_buffer(self) -> int | None:
        """A host buffer to save into: a free one, or a new one while fewer than
        LENT_BUFFERS are held by leases; None: every one is."""
        if self._free_bufs:
            return self._free_bufs.popleft()
        if len(self._bufs) >= READ_AHEAD + LENT_BUFFERS:
            return None
        buf = bytearray(CHUNK)
        mkey = self.fw.register_mkey(PF, buf)
        with self._lend_lock:
            self._bufs.append(buf)
            self._mkeys.append(mkey)
            self._lent.append(0)
            self._spent.append(False)
        return len(self._bufs) - 1

    def _save_ahead(self) -> None:
        """Chunk mode: keep up to two saved chunks queued ahead of the reader."""
        while self._image_remaining and len(self._buf_order) < READ_AHEAD:
            i = self._save_buffer()
            if i is None:
                break
            r = self._cmd(SAVE_VHCA_STATE, mkey=self._mkeys[i], size=CHUNK, **self._save_args)
            self._image_remaining = r["remaining"]
            # The image's further chunks continue it (a full SAVE would start over).
            self._save_args["set_track"] = False
            self._save_args["incremental"] = True
            if r["actual_size"]:
                self._stream.append(REC.pack(r["actual_size"], 0, TAG_FW_DATA))
                self._stream.append(memoryview(self._bufs[i])[: r["actual_size"]])
                self._stream.append(b"")  # marks the end of buffer i's record
                self._stream_bytes += REC.size + r["actual_size"]
                self._buf_order.append(i)
            else:
                self._free_bufs.append(i)

    def read_into(self, buf: memoryview) -> int:
        # Lent for the copy: a buffer read through during the call may be saved into
        # again before the copy is made otherwise.
        lease = self.lend(len(buf))
        n = gather(lease.views, buf)
        lease.release()
        return n

    def lend(self, limit: int) -> Lease:
        """The saving stream as :meth:`read_into` reads it, as views: the saved chunks'
        bytes are the host buffers the firmware saved into (only record headers are
        new bytes)."""
        with self._lock:
            self._require(*SAVING_STATES, op="read")
            views: list[memoryview] = []
            held: list[int] = []
            n = 0
            while n < limit:
                if not self._stream:
                    self._save_ahead()
                    if not self._stream:
                        break
                    continue
                head = self._stream[0]
                if not len(head):
                    self._stream.popleft()
                    self._read_through(self._buf_order.popleft())
                    continue
                k = min(limit - n, len(head))
                views.append(memoryview(head)[:k])
                if isinstance(head, memoryview):  # a record's image: the oldest buffer's
                    i = self._buf_order[0]
                    with self._lend_lock:  # held before its record can be read through
                        self._lent[i] += 1
                    held.append(i)
                n += k
                if k == len(head):
                    self._stream.popleft()
                else:
                    self._stream[0] = head[k:]
            self._stream_bytes -= n
            if n == 0:
                if self._image_remaining:  # _save_ahead found no buffer to save into
                    raise LentOut(f"{self.name}: every host buffer is lent")
                if self._state != DeviceState.STOP_COPY:
                    raise NoDataNow(f"{self.name}: ENOMSG, no pre-copy data for now")
            return Lease(views, self._releaser(held) if held else None)

    def precopy_info(self) -> PrecopyInfo:
        with self._lock:
            self._require(*PRECOPY_STATES, op="precopy-info")
            # A suspended VF cannot be saved: in PRE_COPY_P2P the driver answers from
            # what it holds, without asking the firmware.
            if self._queued() == 0 and self._state == DeviceState.PRE_COPY:
                # The reader drained everything: only now fetch what changed.
                self._in_initial = False
                if self._cmd(QUERY_VHCA_MIGRATION_STATE)["incremental_size"]:
                    self._start_image(incremental=True)
            initial = self._initial_bytes()
            return PrecopyInfo(initial, self._queued() - initial)

    def stop_copy_size(self) -> int:
        """MIG_DATA_SIZE: the firmware's remaining total, in every state."""
        return int(self._cmd(QUERY_VHCA_MIGRATION_STATE)["remaining_total_size"])

    # --- resuming: records in, LOAD per complete FW_DATA record ------------------------------

    def write(self, data: memoryview) -> int:
        with self._lock:
            self._require(DeviceState.RESUMING, op="write")
            pos = 0
            while pos < len(data):
                if self._rx_hdr is not None and self._rx_hdr[2] == TAG_FW_DATA:
                    # A record's image goes straight into the buffer the firmware loads
                    # from, as the kernel's resume_write copies into its DMA pages.
                    size = self._rx_hdr[0]
                    k = min(size - self._rx_got, len(data) - pos)
                    self._load_buf[self._rx_got : self._rx_got + k] = data[pos : pos + k]
                    self._rx_got += k
                    pos += k
                    if self._rx_got < size:
                        break
                    self._take_record()
                    continue
                k = min(self._rx_need - len(self._rx), len(data) - pos)
                self._rx += data[pos : pos + k]
                pos += k
                if len(self._rx) < self._rx_need:
                    break
                if self._rx_hdr is None:
                    size, flags, tag = REC.unpack(self._rx)
                    self._rx.clear()
                    if size > MAX_LOAD_SIZE:
                        raise DeviceError(f"{self.name}: ENOMEM, record of {size} bytes")
                    if tag not in (TAG_FW_DATA, TAG_STOP_COPY_SIZE) and not flags & REC_OPTIONAL:
                        raise DeviceError(f"{self.name}: EOPNOTSUPP, unknown mandatory record "
                                          f"tag {tag}")
                    self._rx_hdr = (size, flags, tag)
                    self._rx_need = size
                    self._rx_got = 0
                    if tag == TAG_FW_DATA and len(self._load_buf) < size:
                        self._load_buffer(max(size, self._prep_size))
                    if size == 0:
                        self._take_record()
                else:
                    self._take_record()
            return len(data)

    def _take_record(self) -> None:
        assert self._rx_hdr is not None
        size, _, tag = self._rx_hdr
        if tag == TAG_FW_DATA:
            try:
                self._cmd(LOAD_VHCA_STATE, mkey=self._load_mkey, size=size)
            except AdminError as exc:
                raise DeviceError(f"{self.name}: LOAD_VHCA_STATE failed: {exc.message}") from None
        elif tag == TAG_STOP_COPY_SIZE:
            if size != 8:
                raise DeviceError(f"{self.name}: EINVAL, STOP_COPY_SIZE record of {size} bytes")
            self._prep_size = min(struct.unpack("<Q", self._rx)[0], MAX_LOAD_SIZE)
        # unknown optional tags are skipped
        self._rx.clear()
        self._rx_hdr = None
        self._rx_need = REC.size
        self._rx_got = 0

    def _load_buffer(self, size: int) -> None:
        """A host buffer the firmware loads from, of ``size`` bytes (it replaces the old)."""
        self.fw.unregister_mkey(self._load_mkey)
        self._load_buf = bytearray(size)
        self._load_mkey = self.fw.register_mkey(PF, self._load_buf)

    # --- identity --------------------------------------------------------------------------

    def state_size(self) -> int:
        return self.mem.size

    def compat(self) -> dict[str, Any]:
        return {"model": self.model, "state_size": self.mem.size}

    def check_compat(self, source: Mapping[str, Any]) -> None:
        if source.get("model") != self.model or source.get("state_size") != self.mem.size:
            raise IncompatibleDevice(
                f"source {source.get('model')!r} with {source.get('state_size')} bytes cannot "
                f"load into {self.model!r} with {self.mem.size}"
            )

    def digest(self) -> str:
        return self.fw.debug_digest(self.vhca_id)

    def dump(self, path: str) -> None:
        self.mem.dump(path)

    def close(self) -> None:
        self.fw.destroy_vf(self.vhca_id)
        self.mem.close()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(model=self.model, pf=self.fw.name, vhca_id=self.vhca_id,
                 loads_committed=self.loads_committed, loading=self._loading)
        return d


REGISTRY.register("mlx5", Mlx5Device)
